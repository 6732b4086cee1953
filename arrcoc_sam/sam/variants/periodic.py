"""Periodic SAM: a SAM step every k-th optimizer step, a plain base-optimizer step otherwise."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import Tensor
from torch.optim import Optimizer

from arrcoc_sam.sam.optimizer import check_rho
from arrcoc_sam.sam.variants._base import VariantSAM, check_interval

__all__ = ["PeriodicSAM"]

_RHO_SCALINGS = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}


class PeriodicSAM(VariantSAM):
    """SAM on optimizer steps 0, k, 2k, …; the base optimizer alone on the others.

    Cost: ``1 + 1/k`` forward+backward passes per optimizer step (two on every k-th step, one otherwise).
    No memory beyond SAM's backup.

    Args:
        interval: k ≥ 1 (``--sam_interval``). k = 1 is SAM.
        rho_scaling: ``"none"`` | ``"sqrt"`` | ``"linear"``: the perturbation radius becomes ρ·k^s with
            s = 0, ½, 1, so the rarer ascents push harder. Applied once to every group's ``rho`` at
            construction, so ``param_groups`` (and the checkpoint) hold the radius actually used.
        rho, adaptive, eta, base_kwargs: as for :class:`~arrcoc_sam.sam.optimizer.SAM`.
    """

    supports_sharding = True  # it only chooses which steps ascend

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        interval: int = 5,
        rho_scaling: str = "none",
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        interval = check_interval(interval)
        if rho_scaling not in _RHO_SCALINGS:
            raise ValueError(f"rho_scaling must be one of {', '.join(_RHO_SCALINGS)}, got {rho_scaling!r}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        self.interval = interval
        self._rho_factor = float(interval) ** _RHO_SCALINGS[rho_scaling]
        for group in self.param_groups:
            group["rho"] = group["rho"] * self._rho_factor
        self.defaults["rho"] = self.defaults["rho"] * self._rho_factor

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As SAM's; an explicit ``rho`` is scaled by k^s like the constructor's groups (the default already is)."""
        if "rho" in param_group:
            check_rho(param_group["rho"], "new param group: ")
            param_group["rho"] = param_group["rho"] * self._rho_factor
        super().add_param_group(param_group)

    def _adopt_group(self, group: dict[str, Any], index: int) -> None:
        """As SAM's, for a group added to the base optimizer directly; its explicit ``rho`` is scaled by k^s."""
        if "rho" in group:
            check_rho(group["rho"], f"param group {index} (added to the base optimizer directly): ")
            group["rho"] = group["rho"] * self._rho_factor
        super()._adopt_group(group, index)

    @property
    def needs_window_hooks(self) -> bool:
        return self.interval > 1

    @property
    def passes_per_step(self) -> float:
        return 1.0 + 1.0 / self.interval

    def ascent_this_step(self) -> bool:
        return self.optimizer_steps % self.interval == 0
