"""Friendly-SAM (Li et al., "Friendly Sharpness-Aware Minimization", CVPR 2024)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from arrcoc_sam.sam import perturbation
from arrcoc_sam.sam.variants._base import VariantSAM, check_fraction, check_nonnegative, grads_replaced

__all__ = ["FriendlySAM"]


class FriendlySAM(VariantSAM):
    """SAM whose ascent removes the full-gradient component, estimated by an EMA of past gradients.

    With g_t = ∇L(w_t) (pass 1)::

        m_t = λ m_{t−1} + (1 − λ) g_t        (m_{−1} = 0)
        d_t = g_t − σ m_t
        ε_t = ρ d_t / ‖d_t‖                  (ASAM's metric with ``adaptive=True``)
        update with ∇L(w_t + ε_t)            (pass 2), as SAM

    Norms are global over the perturbed tensors. m is committed at :meth:`restore`, and only when the ascent is
    finite, so one overflowing step does not poison it; a step whose *pass 2* then turns out non-finite (skipped by
    the update check) keeps the finite g_t, as the gradient of the weights it was taken at, and one whose pass 2
    raises (:meth:`abort_perturbation`) does not, so a retried step folds g_t in once. This is the paper's
    formula; the authors' released code differs: it starts m at g_0 and removes the previous average
    (d_t = g_t − σ m_{t−1}), which for σ = 1 differs only by a start-up bias decaying like λ^t.

    g and m must be in the same units: :attr:`gradient_units` is what ``.grad`` holds per unit of the window's
    mean gradient, and g is divided by it. SAMTrainer and AcceleratedSAM set it each window (a GradScaler's
    scale, times m/k for a short last window of m < k micro-batches, whose gradient Accelerate divides by the k
    accumulation steps); a loop of one's own leaves it at 1, and under an fp16 GradScaler m then averages the
    *scaled* gradients (a change of scale is absorbed within ~1/(1 − λ) steps). ``stats["grad_norm"]`` is ‖d‖ in
    the units of ``.grad`` (times ``gradient_units``), as every method reports it.

    Cost: two forward+backward passes per step. Memory: one persistent gradient-sized buffer (m, saved in
    the checkpoint) plus one transient one beside SAM's backup (d, then the new m until :meth:`restore`).

    Args:
        sigma: σ ≥ 0, how much of the EMA to remove (the paper's experiments use 1). σ = 0 is SAM.
        ema_decay: λ in [0, 1) (default 0.6).
        rho, adaptive, eta, base_kwargs: as for :class:`~arrcoc_sam.sam.optimizer.SAM`.
    """

    buffer_names = ("ema",)
    supports_microbatch_scope = False  # its combination is defined on the window gradient

    @property
    def supports_per_device_scope(self) -> bool:
        return self.sigma == 0  # each rank would average its own gradients; a checkpoint keeps rank 0's only

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        base_optimizer: type[Optimizer] | Optimizer,
        rho: float = 0.05,
        sigma: float = 1.0,
        ema_decay: float = 0.6,
        adaptive: bool = False,
        eta: float = 0.01,
        **base_kwargs: Any,
    ) -> None:
        sigma = check_nonnegative(sigma, "sigma")
        ema_decay = check_fraction(ema_decay, "ema_decay", allow_zero=True)
        if ema_decay == 1:
            raise ValueError("ema_decay must be < 1 (λ = 1 never lets a gradient into the average), got 1")
        if ema_decay == 0 and sigma >= 1:
            raise ValueError(
                f"ema_decay=0 makes the average the current gradient, so sigma={sigma} leaves an ascent direction of "
                f"(1 − sigma)·g: zero or against the gradient; use sigma < 1 or ema_decay > 0"
            )
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, **base_kwargs)
        self.sigma = sigma
        self.ema_decay = ema_decay
        #: ``.grad`` per unit of the window's mean gradient at the next ascent (see the class docstring)
        self.gradient_units = 1.0
        self._pending_ema: dict[Tensor, Tensor] = {}  # m after this step, from perturb() until restore()

    @torch.no_grad()
    def perturb(self) -> bool:
        """Ascent along d = (1 − σ(1 − λ)) g − σλ m_{t−1}; λ m + (1 − λ) g, unless g was non-finite, becomes m at
        :meth:`restore` (a step whose pass 2 raises keeps the old m)."""
        self._check_groups()
        if not self.is_perturbed:  # (a second perturb() is refused below and keeps the first one's average)
            self._pending_ema = {}
        params, grads, _ = self._ascent_candidates()
        if not params:
            return False
        ema = self.buffers["ema"]
        previous = [ema[p] if p in ema else torch.zeros_like(p) for p in params]
        lam, sigma, units = self.ema_decay, self.sigma, float(self.gradient_units)
        if not (math.isfinite(units) and units > 0):
            raise ValueError(f"gradient_units must be a finite number > 0, got {self.gradient_units!r}")
        if all(g.dtype == p.dtype for p, g in zip(params, grads, strict=True)):
            direction = perturbation.clone_all(grads)
        else:
            direction = [g.to(p.dtype, copy=True) for p, g in zip(params, grads, strict=True)]
        for group_dir, group_prev in perturbation.group_by_device_and_dtype(direction, previous):
            torch._foreach_mul_(group_dir, (1.0 - sigma * (1.0 - lam)) / units)
            torch._foreach_add_(group_dir, group_prev, alpha=-sigma * lam)
        with grads_replaced(params, direction):
            ok = super().perturb()
        if units != 1.0 and "grad_norm" in self.stats:  # ‖d‖ in the units of .grad, as every method reports it
            self.stats["grad_norm"] = self.stats["grad_norm"] * units
        if ok or not self._skip_next_step:
            updated = direction  # d has served the ascent; its memory takes the new m, m itself stays as it is
            perturbation.copy_(updated, previous)
            for group_new, group_grads in perturbation.group_by_device_and_dtype(updated, list(grads)):
                if units == 1.0:
                    torch._foreach_lerp_(group_new, group_grads, 1.0 - lam)
                else:  # m ← λ m + (1 − λ) g/u
                    torch._foreach_mul_(group_new, lam)
                    torch._foreach_add_(group_new, group_grads, alpha=(1.0 - lam) / units)
            self._pending_ema = dict(zip(params, updated, strict=True))
        return ok

    @torch.no_grad()
    def restore(self) -> None:
        """SAM's; then the average :meth:`perturb` computed becomes m (the step's pass 2 has run)."""
        pending, self._pending_ema = self._pending_ema, {}
        super().restore()
        if pending:
            self.buffers["ema"] = {**self.buffers["ema"], **pending}

    @torch.no_grad()
    def abort_perturbation(self) -> None:
        """SAM's error path; the average :meth:`perturb` computed is dropped, so a retried step folds g in once."""
        self._pending_ema = {}
        super().abort_perturbation()

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({"_pending_ema": {}, **state})  # pickles from before the average was held back
