"""Sharpness measures and a PAC-Bayes flatness bound.

Notation: L is the data-averaged loss (weighting as in :mod:`arrcoc_sam.curvature._data`), w the probed
tensors, T = |w| + η element-wise for adaptive (ASAM) measures and T = 1 otherwise.

* SAM sharpness (Foret et al. 2021): max_{‖T⁻¹ε‖ ≤ ρ} L(w + ε) − L(w), approximated by projected ascent in
  the normalised coordinates δ = T⁻¹ε: δ ← Π_ρ(δ + ρ·T∇L / ‖T∇L‖), ``steps`` times from δ = 0. One step is
  the first-order SAM ε = ρ T²∇L/‖T∇L‖; more steps approach the worst case (on a quadratic at its
  minimum, ½ρ²λ_max). Every iterate is a feasible perturbation, so the value returned is the largest
  L(w + ε_i) − L(w) over the iterates i = 1..steps: never below the one-step value (projected ascent need
  not increase the loss monotonically), and NaN if any of these losses is NaN. Where the gradient vanishes
  the step goes along a random direction (``seed``).
* Adaptive sharpness (Kwon et al. 2021; Andriushchenko et al. 2023): the same with η = 0 by default, which
  makes it invariant to rescalings that leave the function unchanged (ReLU layers w₁·α, w₂/α). Weights
  that are exactly zero are then never perturbed; if *all* probed weights are zero (e.g. a zero-initialised
  LoRA B) the perturbation set is {0} and the sharpness is exactly 0.0 (use ``eta > 0`` to probe them).
* Average-case sharpness: E_{δ~N(0, σ²T²)}[L(w + δ)] − L(w) by Monte Carlo over antithetic pairs:
  each pair gives ½(L(w + δ) + L(w − δ)) − L(w), unbiased because δ and −δ are equally likely, and free of
  the first-order term g·δ (whose noise, σ‖g‖, swamps the ½σ² tr(H) signal away from a minimum). The
  standard error is that of the i.i.d. pair means (≈ ½σ² tr(H) for small σ, non-adaptive).
* Loss precision: a bf16/fp16 loss is quantised to its dtype's resolution (bf16: 2⁻⁸ relative), which
  hides small loss differences; the sharpness measures warn (once) when the loss has such a dtype.
* ``pac_bayes_bound``: see its docstring.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from arrcoc_sam.curvature._checks import check_integer, check_non_negative, check_positive
from arrcoc_sam.curvature._data import LossFn
from arrcoc_sam.curvature.estimators import Estimate
from arrcoc_sam.curvature.operators import HessianOperator
from arrcoc_sam.curvature.probe import default_params, probe_context
from arrcoc_sam.sam.perturbation import copy_

__all__ = ["sam_sharpness", "adaptive_sharpness", "average_sharpness", "PacBayesBound", "pac_bayes_bound"]


def _objective(model, loss_fn, data, params, weighting) -> HessianOperator:
    params = default_params(model) if params is None else list(params)
    return HessianOperator(model, params, data, loss_fn, weighting)


def _warn_low_precision(op: HessianOperator, measure: str) -> None:
    if op.loss_dtype in (torch.bfloat16, torch.float16):
        warnings.warn(
            f"{measure}: the loss is {op.loss_dtype}, so loss differences are quantised to its resolution "
            f"(eps={torch.finfo(op.loss_dtype).eps:g} relative to the loss); return a float32 loss from loss_fn "
            "(e.g. cross_entropy(logits.float(), labels)) or probe a float32 copy of the model",
            UserWarning,
            stacklevel=3,
        )


def _set(op: HessianOperator, flat: Tensor) -> None:
    with torch.no_grad():
        copy_(op.params, op.unflatten(flat))


def sam_sharpness(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    rho: float = 0.05,
    adaptive: bool = False,
    steps: int = 1,
    params: Sequence[Tensor] | None = None,
    *,
    eta: float = 0.01,
    weighting: str = "auto",
    seed: int = 0,
) -> float:
    """max_i L(w + ε_i) − L(w) over the ascent iterates ε_1..ε_steps of radius ``rho`` (1 = first-order SAM);
    0.0 when no weight can be perturbed (``adaptive`` with η = 0 and all probed weights zero). NaN when L(w) or
    any L(w + ε_i) is NaN (the loss is undefined there; NaN is never dropped by the max), +inf when a
    perturbed loss is +inf. ``eta`` (used with ``adaptive``) must be finite and >= 0."""
    check_positive("rho", rho)
    check_integer("steps", steps)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    check_non_negative("eta", eta)
    op = _objective(model, loss_fn, data, params, weighting)
    with probe_context(model, op.params, restore_values=True):
        origin = op.flatten([p.detach() for p in op.params])
        scale = origin.abs() + eta if adaptive else torch.ones_like(origin)
        generator = torch.Generator(device=op.device).manual_seed(seed)
        base, gradient = op.loss_and_gradient()
        _warn_low_precision(op, "sam_sharpness")
        delta = torch.zeros_like(origin)
        losses = []  # L(w + ε_i) over the iterates ε_1..ε_steps (ε = 0 is not one of them)
        for step in range(steps):
            if step:
                loss, gradient = op.loss_and_gradient()
                losses.append(loss)
            direction = scale * gradient
            norm = direction.norm()
            if float(norm) == 0.0:
                direction = torch.randn(op.numel, generator=generator, dtype=op.dtype, device=op.device) * (scale > 0)
                norm = direction.norm()
                if float(norm) == 0.0:  # every scale is 0: the only feasible perturbation is ε = 0
                    return base - base  # 0.0 (NaN for a non-finite L(w))
            delta += rho / norm * direction
            delta *= (rho / delta.norm()).clamp(max=1.0)
            _set(op, origin + scale * delta)
        losses.append(op.loss())
        return float(torch.tensor(losses, dtype=torch.float64).max()) - base  # torch's max keeps NaN; Python's drops it


def adaptive_sharpness(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    rho: float = 0.5,
    steps: int = 1,
    params: Sequence[Tensor] | None = None,
    *,
    eta: float = 0.0,
    weighting: str = "auto",
    seed: int = 0,
) -> float:
    """Scale-invariant (η = 0) ASAM sharpness: ``sam_sharpness(..., adaptive=True, eta=eta)``."""
    return sam_sharpness(
        model, loss_fn, data, rho, adaptive=True, steps=steps, params=params, eta=eta, weighting=weighting, seed=seed
    )


def average_sharpness(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    sigma: float = 0.01,
    num_samples: int = 10,
    adaptive: bool = False,
    params: Sequence[Tensor] | None = None,
    *,
    eta: float = 0.0,
    weighting: str = "auto",
    seed: int = 0,
) -> Estimate:
    """E[L(w + δ)] − L(w) for δ ~ N(0, σ² T²) over ``num_samples`` antithetic pairs (δ, −δ) (module
    docstring): ``.value`` and ``.stderr`` floats, ``.num_matvecs`` = 2·``num_samples`` perturbed forwards
    (plus one at w)."""
    check_positive("sigma", sigma)
    check_integer("num_samples", num_samples)
    check_non_negative("eta", eta)
    if num_samples < 2:
        raise ValueError(f"num_samples (antithetic pairs) must be >= 2 for a standard error, got {num_samples}")
    op = _objective(model, loss_fn, data, params, weighting)
    with probe_context(model, op.params, restore_values=True):
        origin = op.flatten([p.detach() for p in op.params])
        scale = sigma * (origin.abs() + eta) if adaptive else torch.full_like(origin, sigma)
        generator = torch.Generator(device=op.device).manual_seed(seed)
        base = op.loss()
        _warn_low_precision(op, "average_sharpness")
        gaps = []
        for _ in range(num_samples):
            step = scale * torch.randn(op.numel, generator=generator, dtype=op.dtype, device=op.device)
            _set(op, origin + step)
            plus = op.loss()
            _set(op, origin - step)
            gaps.append(0.5 * (plus + op.loss()) - base)
    values = torch.tensor(gaps, dtype=torch.float64)
    return Estimate(float(values.mean()), float(values.std() / math.sqrt(num_samples)), 2 * num_samples)


@dataclass
class PacBayesBound:
    """``bound`` on the expected loss of the posterior N(w, σ²I); its parts at the chosen ``sigma``."""

    bound: float
    sigma: float
    perturbed_loss: float
    kl: float
    complexity: float


def pac_bayes_bound(
    trace: float,
    loss: float,
    distance_sq: float,
    num_examples: int,
    delta: float = 0.05,
    sigmas: Sequence[float] | None = None,
) -> PacBayesBound:
    """PAC-Bayes flatness bound from the Hessian trace (McAllester 1999 in Maurer's 2004 form).

    With prior P = N(w₀, σ²I) and posterior Q = N(w, σ²I): KL(Q‖P) = ‖w − w₀‖²/(2σ²). With probability
    ≥ 1 − δ over n training examples, simultaneously for every σ in a grid S (union bound),

        E_Q[L_D] ≤ E_Q[L_S] + √((KL + ln(2√n·|S|/δ)) / (2n)),   E_Q[L_S] ≈ L_S(w) + ½σ² tr(H),

    and the bound returned is the minimum over S. Assumptions: the loss lies in [0, 1] (true for the 0-1
    loss; for cross-entropy clip or rescale it, else the bound is a heuristic flatness score); w₀ is fixed
    before seeing the data (e.g. the initialisation); the second-order Taylor term is accurate at scale σ
    (a local, flat-enough region); ``trace`` is tr(H) of the training loss at w (e.g. ``hessian_trace``).

    A negative ``trace`` is refused: tr(H) < 0 (a saddle, or a noisy estimate of a near-zero trace) makes the
    Taylor term reward large σ without limit, and the "bound" could drop below zero. Pass ``max(trace, 0)``
    to treat an estimate that is not significantly positive as flat.

    Args:
        trace: tr(H) at w, finite and >= 0. loss: L_S(w), finite and >= 0. distance_sq: ‖w − w₀‖², finite, >= 0.
        num_examples: n. delta: confidence parameter in (0, 1). sigmas: the grid S (default: 41 values
        log-spaced in [1e-4, 1]).
    """
    for name, value in (("trace", trace), ("loss", loss), ("distance_sq", distance_sq)):
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value}")
    if trace < 0:
        raise ValueError(
            f"trace must be >= 0, got {trace}: with negative curvature the second-order bound does not hold (the "
            "Taylor term would reward ever larger sigma); pass max(trace, 0) to treat the estimate as flat"
        )
    if loss < 0:
        raise ValueError(f"loss must be >= 0 (the bound assumes a loss in [0, 1]), got {loss}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if num_examples < 1:
        raise ValueError(f"num_examples must be >= 1, got {num_examples}")
    if distance_sq < 0:
        raise ValueError(f"distance_sq must be >= 0, got {distance_sq}")
    grid = list(sigmas) if sigmas is not None else [10 ** (-4 + 0.1 * i) for i in range(41)]
    if not grid or not all(sigma > 0 and math.isfinite(sigma) for sigma in grid):
        raise ValueError(f"sigmas must be a non-empty list of finite positive values, got {grid}")
    confidence = math.log(2 * math.sqrt(num_examples) * len(grid) / delta)
    best = None
    for sigma in grid:
        perturbed = loss + 0.5 * sigma**2 * trace
        kl = distance_sq / (2 * sigma**2)
        complexity = math.sqrt((kl + confidence) / (2 * num_examples))
        candidate = PacBayesBound(perturbed + complexity, sigma, perturbed, kl, complexity)
        if best is None or candidate.bound < best.bound:
            best = candidate
    return best
