"""Keep BatchNorm-style running statistics to one update per optimizer step.

SAM runs the forward pass twice. Without care, running means/variances (and ``num_batches_tracked``) move
twice per step, the second time with statistics of the perturbed network. We snapshot every floating or
integer buffer of normalisation layers before the second pass and copy it back afterwards. Snapshot/restore
is exact and independent of the layer's momentum rule (including cumulative averaging with
``momentum=None``), which a momentum-toggle trick is not; its cost is one copy of the (small) buffers.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase
from torch.nn.parameter import is_lazy

from arrcoc_sam.sam import perturbation

__all__ = ["fewest_examples_per_batch", "preserve_running_stats", "running_stat_buffers"]


def running_stat_buffers(model: nn.Module) -> list[torch.Tensor]:
    """The running-statistics buffers of every BatchNorm/InstanceNorm-style layer (``_NormBase``) in ``model``
    (a lazy layer's buffers once its first forward has materialised them)."""
    buffers: list[torch.Tensor] = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            buffers.extend(b for b in module.buffers(recurse=False) if b is not None and not is_lazy(b))
    return buffers


def fewest_examples_per_batch(model: nn.Module | None) -> int:
    """2 where ``model`` holds a BatchNorm layer in training mode, which normalises over the batch and so cannot
    take a batch of one example (of one value per channel); 1 otherwise (also for no model)."""
    if model is None:
        return 1
    return 2 if any(isinstance(module, _BatchNorm) and module.training for module in model.modules()) else 1


@contextlib.contextmanager
def preserve_running_stats(model: nn.Module) -> Iterator[None]:
    """Run the block (normally SAM's second pass) without changing running statistics, even if it raises."""
    buffers = running_stat_buffers(model)
    if not buffers:
        yield
        return
    with torch.no_grad():
        snapshot = perturbation.clone_all(buffers)
    try:
        yield
    finally:
        with torch.no_grad():
            perturbation.copy_(buffers, snapshot)
