"""The update check without a host sync, for base optimizers that can skip their own step on the device.

torch's fused Adam and AdamW (``fused=True``; transformers' default ``optim="adamw_torch_fused"``) read a
``found_inf`` tensor, the way ``GradScaler`` hands it to them, and leave the weights and their state as they are
where it is non-zero (the step counter included). :func:`step_with_flag` steps the base optimizer with the
:func:`non_finite_flag` of the current gradients: the skip is decided on the device, and :class:`SkipCounter` adds
the flags up there until the host next syncs. The base step still runs on a skipped step (its kernels change
nothing), so its step hooks run too, as under a GradScaler that hands such an optimizer its ``found_inf``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.optim import Optimizer

from arrcoc_sam.sam import perturbation

# torch optimizers whose step() passes ``self.found_inf`` to its fused kernels (exact classes: a subclass may
# override step() and drop it)
_SKIPS_ON_FOUND_INF = (torch.optim.Adam, torch.optim.AdamW)


def skips_on_device(base: Optimizer) -> bool:
    """Whether ``base`` is torch's Adam or AdamW with ``fused`` on in every param group, so that its step honours
    ``found_inf`` (a group without it would refuse the flag)."""
    return type(base) in _SKIPS_ON_FOUND_INF and all(group.get("fused") for group in base.param_groups)


def checkable_on_device(grads: Sequence[Tensor]) -> bool:
    """Whether every gradient is a plain dense tensor, which the non-finite kernel takes (sharded DTensor and
    sparse gradients go through the host check)."""
    return all(type(grad) is Tensor and grad.layout is torch.strided for grad in grads)


def non_finite_flag(grads: Sequence[Tensor]) -> Tensor:
    """A 0-dim float32 tensor on the first gradient's device: 1.0 where any element of ``grads`` is
    inf or NaN, else 0.0. One ``_amp_foreach_non_finite_check_and_unscale_`` per device and dtype with scale 1,
    which leaves every value as it is; no host sync. Raises RuntimeError for a gradient whose elements share
    memory (an expanded tensor set by hand), which that in-place kernel refuses."""
    flags: dict[torch.device, tuple[Tensor, Tensor]] = {}
    for (group,) in perturbation.group_by_device_and_dtype(grads):
        device = group[0].device
        if device not in flags:
            flags[device] = (torch.zeros((), device=device, dtype=torch.float32),
                             torch.ones((), device=device, dtype=torch.float32))
        found, scale = flags[device]
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, scale)
    founds = [found for found, _ in flags.values()]
    flag = founds[0]
    for other in founds[1:]:
        flag = torch.maximum(flag, other.to(flag.device))
    return flag


def step_with_flag(base: Optimizer, found: Tensor) -> None:
    """``base.step()`` with ``found_inf`` = ``found``: the fused kernels skip the update where it is non-zero."""
    base.found_inf = found
    try:
        base.step()
    finally:
        del base.found_inf


class SkipCounter:
    """The steps skipped on the device since the host last looked, added up there (a 0-dim float32 tensor, or
    None before the first): reading it is a host sync, which :meth:`read_with` shares with another reading."""

    def __init__(self) -> None:
        self._pending: Tensor | None = None

    def add(self, found: Tensor) -> None:
        """Count one step's flag (no host sync)."""
        pending = self._pending
        self._pending = found if pending is None else pending + found.to(pending.device)

    def read(self) -> int:
        """The steps skipped since the last reading (one host sync where any step was counted)."""
        pending, self._pending = self._pending, None
        return 0 if pending is None else int(pending.item())

    def read_with(self, value: Tensor) -> tuple[float, int]:
        """``float(value)`` of a 0-dim floating tensor and :meth:`read`, in one host sync."""
        pending, self._pending = self._pending, None
        if pending is None:
            return float(value), 0
        value_read, count = torch.stack((value, pending.to(device=value.device, dtype=value.dtype))).tolist()
        return value_read, int(count)
