"""GSAM (Zhuang et al., "Surrogate Gap Guided Sharpness-Aware Minimization", ICLR 2022)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from arrcoc_sam.sam import perturbation
from arrcoc_sam.sam.optimizer import is_real
from arrcoc_sam.sam.variants._base import VariantSAM, check_nonnegative

__all__ = ["GSAM"]


# The largest learning rate a group has had since GSAM took it (kept in the group, so it rides in checkpoints).
LR_SEEN_KEY = "gsam_lr_seen"


def _peak_lr(group: dict[str, Any]) -> float:
    """The learning rate a group's schedule peaks at: OneCycleLR's ``max_lr``, else ``initial_lr`` (set by every
    ``LRScheduler``: the lr before a warm-up lowered it), and at least the largest lr the group has had since GSAM
    took it (what remains where no scheduler records a peak: ReduceLROnPlateau, a loop setting the lr by hand)."""
    seen = max(float(group.get(LR_SEEN_KEY, group["lr"])), float(group["lr"]))
    for key in ("max_lr", "initial_lr"):
        if key in group:
            return max(float(group[key]), seen)
    return seen


class GSAM(VariantSAM):
    """SAM's perturbed gradient minus α times the part of the clean gradient orthogonal to it.

    With g = ∇f(w) (pass 1), ε = ρ_t g/‖g‖ and g_p = ∇f(w + ε) (pass 2)::

        g_⊥ = g − (⟨g, g_p⟩ / ‖g_p‖²) g_p           # global flattened vectors of the perturbed tensors
        update direction d = g_p − α g_⊥            # descends f_p while lowering the surrogate gap

    ρ_t follows the learning rate of each group linearly (the paper's schedule)::

        ρ_t = ρ_min + (ρ − ρ_min) (lr_t − lr_min) / (lr_max − lr_min)     (ρ_t = ρ when lr_max = lr_min)

    ``rho_min``, ``lr_min`` and ``lr_max`` are per-group keys (set here as defaults, saved in the checkpoint).
    ``lr_max=None`` (the default) reads each group's peak learning rate at every ascent, as torch's schedulers
    record it in the group (OneCycleLR's ``max_lr``, else ``initial_lr``), and at least the largest lr the group
    has had since GSAM took it (kept in the group as ``gsam_lr_seen``; all there is under ReduceLROnPlateau or a
    loop that sets the lr by hand). So a scheduler built before GSAM (the usual HF order, whose warm-up has
    already lowered ``lr``) or after it (OneCycleLR attached to the optimizer) does not shift the schedule
    (:meth:`lr_max_of`). Outside [lr_min, lr_max], ρ_t stays at rho_min or rho.

    A tensor with a pass-1 gradient and none from pass 2 (a branch only the clean forward took) has g_p = 0 in
    these vectors, so its update direction is −α g_⊥ = −α g: it moves, unlike under SAM, where it gets no
    gradient and the base optimizer skips it.

    Cost: two forward+backward passes per step. Memory: SAM's backup plus one transient copy of g.

    Args:
        alpha: α ≥ 0 (the paper searches 0.01–0.3). α = 0 is SAM with the scheduled ρ_t.
        rho: ρ_max, the radius at the peak learning rate.
        rho_min: ρ at ``lr_min`` (0 ≤ rho_min ≤ rho; a group with ρ = 0 is never perturbed and may keep any
            rho_min ≥ 0).
        lr_max, lr_min: the learning-rate range the schedule spans (``lr_max`` None: each group's peak lr as its
            scheduler records it, read at each ascent; see above).
        adaptive, eta, base_kwargs: as for :class:`~arrcoc_sam.sam.optimizer.SAM`.
    """

    stashes_clean_gradient = True
    supports_microbatch_scope = False  # its combination is defined on the window gradient

    @property
    def supports_per_device_scope(self) -> bool:
        return self.alpha == 0  # g_p − α g_⊥ with a rank-local g would differ between replicas
    _group_keys = (*VariantSAM._group_keys, "rho_min", "lr_min", "lr_max")
    _bookkeeping_keys = (LR_SEEN_KEY,)

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        alpha: float = 0.1,
        rho_min: float = 0.0,
        lr_max: float | None = None,
        lr_min: float = 0.0,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        alpha = check_nonnegative(alpha, "alpha")
        self._schedule_defaults = {"rho_min": rho_min, "lr_min": lr_min, "lr_max": lr_max}
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        self.alpha = alpha

    def _check_group(self, group: dict[str, Any], where: str) -> None:
        """SAM's checks plus the schedule's: 0 ≤ rho_min ≤ rho and finite 0 ≤ lr_min ≤ lr_max (``lr_max`` None:
        read at each ascent, checked there). Missing schedule keys are filled from the constructor's."""
        for key, value in self._schedule_defaults.items():
            group.setdefault(key, value)
        super()._check_group(group, where)
        for key in self._schedule_defaults:
            value = group[key]
            if key == "lr_max" and value is None:
                continue
            if not is_real(value) or not math.isfinite(value):
                raise ValueError(f"{where}{key} must be a finite number, got {value!r}")
            group[key] = float(value)  # a NumPy scalar would not load with weights_only=True
        if group["rho_min"] < 0 or (group["rho"] > 0 and group["rho_min"] > group["rho"]):  # ρ = 0: never perturbed
            raise ValueError(f"{where}rho_min must be in [0, rho={group['rho']}], got {group['rho_min']!r}")
        lr_max = group["lr_max"] if group["lr_max"] is not None else _peak_lr(group) if "lr" in group else math.inf
        if not 0 <= group["lr_min"] <= lr_max:
            raise ValueError(f"{where}need 0 <= lr_min <= lr_max, got lr_min={group['lr_min']!r}, lr_max={lr_max!r}"
                             + (" (the group's peak learning rate)" if group["lr_max"] is None else ""))

    @staticmethod
    def lr_max_of(group: dict[str, Any]) -> float:
        """The ``lr_max`` ρ_t is scheduled against: the group's own, or (None) its peak learning rate as its
        scheduler records it and at least the largest it has had (see the class docstring)."""
        return _peak_lr(group) if group["lr_max"] is None else float(group["lr_max"])

    @classmethod
    def scheduled_rho(cls, group: dict[str, Any]) -> float:
        """ρ_t of ``group`` at its current learning rate, held within [rho_min, rho] outside [lr_min, lr_max].

        Raises:
            ValueError: lr_min lies above the peak learning rate the group's scheduler records (``lr_max`` None).
        """
        lr_max = cls.lr_max_of(group)
        span = lr_max - group["lr_min"]
        if span < 0:
            raise ValueError(f"gsam: lr_min={group['lr_min']!r} is above the peak learning rate {lr_max!r} of the "
                             "group's schedule; lower lr_min or set lr_max")
        if span == 0:
            return float(group["rho"])
        fraction = min(max((float(group["lr"]) - group["lr_min"]) / span, 0.0), 1.0)
        return group["rho_min"] + (group["rho"] - group["rho_min"]) * fraction

    @torch.no_grad()
    def perturb(self) -> bool:
        """SAM's ascent with ρ_t in place of each group's ρ; stashes a copy of the clean gradient."""
        self._check_groups()
        radii = [group["rho"] for group in self.param_groups]
        try:
            for group in self.param_groups:
                group[LR_SEEN_KEY] = max(float(group.get(LR_SEEN_KEY, group["lr"])), float(group["lr"]))
                if group["rho"] > 0:
                    group["rho"] = max(self.scheduled_rho(group), 0.0)
            return super().perturb()
        finally:
            for group, rho in zip(self.param_groups, radii, strict=True):
                group["rho"] = rho

    @torch.no_grad()
    def restore(self) -> None:
        """Restore the weights (SAM), then set the gradient to g_p − α g_⊥ on the perturbed tensors."""
        params, clean = self.restore_with_clean_gradient()
        if not clean or self.alpha == 0:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        ratio = perturbation.dot(clean, grads) / perturbation.squared_norm(grads).clamp_min(1e-30)
        # d = (1 + α·ratio) g_p − α g
        for group_grads, group_clean in perturbation.group_by_device_and_dtype(grads, clean):
            scale = (1.0 + self.alpha * ratio).to(device=group_grads[0].device, dtype=group_grads[0].dtype)
            torch._foreach_mul_(group_grads, scale)
            torch._foreach_add_(group_grads, group_clean, alpha=-self.alpha)
