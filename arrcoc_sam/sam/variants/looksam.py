"""LookSAM (Liu et al., "Towards Efficient and Scalable Sharpness-Aware Minimization", CVPR 2022)."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from arrcoc_sam.sam import perturbation
from arrcoc_sam.sam.variants._base import VariantSAM, check_interval, check_nonnegative

__all__ = ["LookSAM"]

logger = logging.getLogger(__name__)


class LookSAM(VariantSAM):
    """SAM every k-th step; in between, the clean gradient plus the last stored sharpness direction.

    On a SAM step (optimizer step t with t mod k = 0), with g = ∇L(w) and g_s = ∇L(w + ε)::

        g_v = g_s − (⟨g, g_s⟩ / ‖g‖²) g            # the part of g_s orthogonal to g
        store ĝ_v = g_v / ‖g_v‖; update with g_s

    On the other steps, from the clean gradient g alone::

        g_s ≈ g + α ‖g‖ ĝ_v                         # = g + α (‖g‖/‖g_v‖) g_v of the paper

    All inner products and norms are over the global flattened vector of the perturbed tensors (every
    group with ρ > 0), never per tensor. The stored unit vector is scale-free, so a GradScaler's scale
    cancels. ε is SAM's (or ASAM's with ``adaptive=True``).

    Cost: ``1 + 1/k`` forward+backward passes per step. Memory: one gradient-sized persistent buffer
    (ĝ_v, saved in the checkpoint) plus, on SAM steps, SAM's backup and one transient copy of g.

    Args:
        interval: k ≥ 1 (``--sam_interval``).
        alpha: α ≥ 0, the strength of the reused direction (the paper uses 0.7).
        rho, adaptive, eta, base_kwargs: as for :class:`~arrcoc_sam.sam.optimizer.SAM`.
    """

    buffer_names = ("direction",)
    stashes_clean_gradient = True
    supports_microbatch_scope = False  # its combination is defined on the window gradient

    @property
    def supports_per_device_scope(self) -> bool:
        return self.interval == 1  # a direction stored from a rank-local g would differ between replicas

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        interval: int = 5,
        alpha: float = 0.7,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        interval = check_interval(interval)
        alpha = check_nonnegative(alpha, "alpha")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        self.interval = interval
        self.alpha = alpha

    @property
    def needs_window_hooks(self) -> bool:
        return self.interval > 1

    @property
    def passes_per_step(self) -> float:
        return 1.0 + 1.0 / self.interval

    def ascent_this_step(self) -> bool:
        return self.optimizer_steps % self.interval == 0

    @torch.no_grad()
    def after_first_pass(self) -> None:
        """On a reuse step: g ← g + α‖g‖ĝ_v over the tensors that have a stored direction."""
        super().after_first_pass()
        if self.ascent_this_step() or not self.buffers["direction"]:
            return
        params, grads, _ = self._ascent_candidates()
        if not params:
            return
        norm = perturbation.squared_norm(grads).sqrt()
        pairs = [(g, self.buffers["direction"][p]) for p, g in zip(params, grads) if p in self.buffers["direction"]]
        if not pairs:
            return
        targets = [g for g, _ in pairs]
        for group_grads, group_dirs in perturbation.group_by_device_and_dtype(targets, [d for _, d in pairs]):
            if group_grads[0].dtype == torch.float16:  # ‖g‖ and 1/‖g‖ may leave float16's range: in float32
                wide, step = [g.float() for g in group_grads], [d.float() for d in group_dirs]
                torch._foreach_mul_(step, (self.alpha * norm).to(device=group_grads[0].device, dtype=torch.float32))
                torch._foreach_add_(wide, step)
                torch._foreach_copy_(group_grads, wide)
                continue
            # g + α‖g‖ĝ_v = ‖g‖·(g/‖g‖ + α ĝ_v): three in-place foreach ops, no temporary and no host sync
            scale = norm.to(device=group_grads[0].device, dtype=group_grads[0].dtype)
            torch._foreach_mul_(group_grads, scale.clamp_min(torch.finfo(scale.dtype).tiny).reciprocal())
            torch._foreach_add_(group_grads, group_dirs, alpha=self.alpha)
            torch._foreach_mul_(group_grads, scale)

    @torch.no_grad()
    def restore(self) -> None:
        """Restore the weights (SAM), then store ĝ_v from the stashed g and the current (pass-2) gradient g_s;
        a non-finite g_s (or ĝ_v) leaves the previous direction in place."""
        params, clean = self.restore_with_clean_gradient()
        if not clean:
            return
        perturbed = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        ratio = perturbation.dot(clean, perturbed) / perturbation.squared_norm(clean)
        # g_v = g_s − ratio·g, computed in the stash (which becomes the stored direction)
        for group_clean, group_perturbed in perturbation.group_by_device_and_dtype(clean, perturbed):
            _scale_(group_clean, -ratio)
            torch._foreach_add_(group_clean, group_perturbed)
        squared = perturbation.squared_norm(clean)
        if not bool(torch.isfinite(ratio) & torch.isfinite(squared)):  # one more host sync per SAM step (every k)
            # e.g. a GradScaler overflow in pass 2: keep the previous direction rather than store inf/NaN,
            # which would poison the k − 1 reuse steps that follow
            logger.warning("looksam: non-finite pass-2 gradient; keeping the previous stored direction")
            return
        inv_norm = squared.sqrt().clamp_min(1e-30).reciprocal()
        for (group_clean,) in perturbation.group_by_device_and_dtype(clean):
            _scale_(group_clean, inv_norm)
        self.buffers["direction"] = dict(zip(params, clean, strict=True))


def _scale_(tensors: list[Tensor], factor: Tensor) -> None:
    """``tensors *= factor`` (a 0-dim tensor; the list on one device and dtype). float16 tensors are scaled in
    float32 and rounded once, since the factor itself (1/‖g_v‖ above 65504) may not fit float16's range; the
    float32 copies exist for one group at a time (bfloat16 has float32's range and is scaled in place)."""
    if tensors[0].dtype == torch.float16:
        wide = [t.float() for t in tensors]
        torch._foreach_mul_(wide, factor.to(device=tensors[0].device, dtype=torch.float32))
        torch._foreach_copy_(tensors, wide)
    else:
        torch._foreach_mul_(tensors, factor.to(device=tensors[0].device, dtype=tensors[0].dtype))
