"""Stochastic trace and diagonal estimators over any :class:`~arrcoc_sam.curvature.operators.LinearOperator`.

Every estimator returns an :class:`Estimate` with the estimate, its standard error (the sample standard
deviation of the per-probe values divided by √n: the estimators are means of i.i.d. probes) and the
number of operator products used.

* Hutchinson trace (Hutchinson 1990): z ~ Rademacher, tr(A) = E[zᵀ A z]; variance 2 Σ_{i≠j} A_ij².
* Hutch++ (Meyer, Musco, Musco & Woodruff 2021): with m products, k = ⌊(m − 2)/3⌋ (at least 1) go to a sketch
  Q = orth(A S), k to the exact trace of Qᵀ A Q, and the m − 2k left (at least 2) to Hutchinson on
  (I − QQᵀ) A (I − QQᵀ). Unbiased; exact when rank(A) ≤ k. Its standard error is that of the deflated Hutchinson part *given* the sketch: the
  randomness of the sketch itself (which part of the spectrum was deflated) is not in it, so over repeated
  runs it under-covers the spread of the estimate (most with few probes and a slowly decaying spectrum);
  use Hutchinson where a calibrated error bar matters more than a small one.
* Hutchinson diagonal (Bekas, Kokiopoulou & Saad 2007): diag(A) = E[z ⊙ A z]; coordinate i has variance
  Σ_{j≠i} A_ij². Unbiased but noisy and can be negative.
* GGN/Fisher diagonal: diag(G) = E[u ⊙ u] with u = Jᵀ s, E[s sᵀ] = Λ (Rademacher square-root factor, or
  sampled labels: the sampled Fisher); unbiased for the GGN diagonal and never negative. One
  forward+backward per probe. On a fitted MLP (``scripts/bench/curvature.py``) the Rademacher factor had
  ~4x lower error than sampled labels at equal probes: near one-hot predictions a sampled label rarely
  differs from the argmax, so that estimator is heavy-tailed.
* Control-variate diagonal: diag(H) = diag(G) + diag(H − G), the first term by the GGN estimator, the second
  by Hutchinson on H − G, whose off-diagonal mass (hence variance) is small when H ≈ G. Unbiased for diag(H);
  the standard errors of the two independent parts add in quadrature.

Probes come from ``generator`` (one stream; seed 0 when None) or, for the diagonal estimators, from a
``sampler`` (:class:`~arrcoc_sam.curvature.probe.ProbeSampler`) that structures them, e.g. a
:class:`~arrcoc_sam.curvature.probe.BlockSampler` drawing each sample's block from its own generator: for a
block-diagonal operator (stacked samples, a sum of per-sample losses) each block of the diagonal and of its
standard error is then that sample's own estimate, whatever else is in the batch. The GGN estimators pass the
source to ``sample_factor``, which draws its signs in output space.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from arrcoc_sam.curvature._checks import check_integer
from arrcoc_sam.curvature.operators import GGNOperator, LinearOperator
from arrcoc_sam.curvature.probe import ProbeSampler, as_sampler

__all__ = [
    "Estimate",
    "hutchinson_trace",
    "hutchpp_trace",
    "hutchinson_diagonal",
    "ggn_diagonal",
    "control_variate_diagonal",
]


@dataclass
class Estimate:
    """``value`` and ``stderr``: floats for traces and sharpness, flat ``[P]`` tensors (or lists shaped like
    params, from the model-level API) for diagonals; ``num_matvecs`` products (or probes) used."""

    value: float | Tensor | list[Tensor]
    stderr: float | Tensor | list[Tensor]
    num_matvecs: int


def _rademacher(op: LinearOperator, probes: torch.Generator | ProbeSampler, *shape: int) -> Tensor:
    """Rademacher probes ``[*shape, op.numel]`` from a generator or a sampler."""
    return as_sampler(probes).rademacher((*shape, op.numel), op.dtype, op.device)


def _check_probes(num_probes: int, minimum: int = 2, reason: str = "a standard error needs two probes") -> None:
    check_integer("num_probes", num_probes)
    if num_probes < minimum:
        raise ValueError(f"num_probes must be >= {minimum} ({reason}), got {num_probes}")


def _scalar_mean(samples: list[Tensor]) -> tuple[float, float]:
    values = torch.stack(samples).double()
    return float(values.mean()), float(values.std(unbiased=True) / math.sqrt(len(samples)))


def _generator(op: LinearOperator, generator: torch.Generator | None) -> torch.Generator:
    return generator or torch.Generator(device=op.device).manual_seed(0)


def _probe_source(
    op: LinearOperator, generator: torch.Generator | None, sampler: ProbeSampler | None
) -> torch.Generator | ProbeSampler:
    """``sampler`` when given (``generator`` must then be None), else ``generator`` (seed 0 when None)."""
    if sampler is None:
        return _generator(op, generator)
    if generator is not None:
        raise ValueError("pass generator or sampler, not both: the sampler draws every probe")
    return sampler


def hutchinson_trace(op: LinearOperator, num_probes: int = 30, generator: torch.Generator | None = None) -> Estimate:
    """tr(A) by ``num_probes`` Rademacher probes (``num_probes`` products)."""
    _check_probes(num_probes)
    generator = _generator(op, generator)
    samples = []
    for _ in range(num_probes):
        probe = _rademacher(op, generator)
        samples.append(probe @ op.matvec(probe))
    value, stderr = _scalar_mean(samples)
    return Estimate(value, stderr, num_probes)


def hutchpp_trace(op: LinearOperator, num_probes: int = 30, generator: torch.Generator | None = None) -> Estimate:
    """tr(A) by Hutch++ with ``num_probes`` products in all (at least 4: sketch, its trace, two residual probes)."""
    _check_probes(num_probes, 4, "Hutch++ spends them on a sketch, its exact trace and >= 2 residual probes")
    generator = _generator(op, generator)
    sketch_size = min((num_probes - 2) // 3 or 1, op.numel)
    residual_probes = num_probes - 2 * sketch_size
    sketch = _rademacher(op, generator, sketch_size)
    images = torch.stack([op.matvec(row) for row in sketch])
    basis = torch.linalg.qr(images.T).Q.T  # [s, P], orthonormal rows
    low_rank = sum(float(row @ op.matvec(row)) for row in basis)
    samples = []
    for probe in _rademacher(op, generator, residual_probes):
        deflated = probe - basis.T @ (basis @ probe)
        samples.append(deflated @ op.matvec(deflated))
    value, stderr = _scalar_mean(samples)
    return Estimate(low_rank + value, stderr, num_probes)


def _mean_and_stderr(draw: Callable[[], Tensor], num_probes: int) -> tuple[Tensor, Tensor]:
    """Welford mean and standard error of ``num_probes`` i.i.d. flat samples from ``draw``."""
    mean = draw()
    spread = torch.zeros_like(mean)
    for count in range(2, num_probes + 1):
        sample = draw()
        delta = sample - mean
        mean += delta / count
        spread += delta * (sample - mean)
    return mean, (spread / ((num_probes - 1) * num_probes)).sqrt()


def hutchinson_diagonal(
    op: LinearOperator,
    num_probes: int = 30,
    generator: torch.Generator | None = None,
    *,
    sampler: ProbeSampler | None = None,
) -> Estimate:
    """diag(A) as a flat ``[P]`` tensor by Rademacher probes ``[P]`` from ``generator`` or ``sampler``
    (``num_probes`` products)."""
    _check_probes(num_probes)
    source = _probe_source(op, generator, sampler)

    def draw() -> Tensor:
        probe = _rademacher(op, source)
        return probe * op.matvec(probe)

    value, stderr = _mean_and_stderr(draw, num_probes)
    return Estimate(value, stderr, num_probes)


def _ggn_mean(op: GGNOperator, num_probes: int, source: torch.Generator | ProbeSampler) -> tuple[Tensor, Tensor]:
    return _mean_and_stderr(lambda: op.sample_factor(source).square(), num_probes)


def ggn_diagonal(
    op: GGNOperator,
    num_probes: int = 30,
    generator: torch.Generator | None = None,
    *,
    sampler: ProbeSampler | None = None,
) -> Estimate:
    """diag(G) ≥ 0 as a flat ``[P]`` tensor by sampled factors u = Jᵀ s, s drawn in output space from
    ``generator`` or ``sampler`` (``num_probes`` backward passes)."""
    _check_probes(num_probes)
    value, stderr = _ggn_mean(op, num_probes, _probe_source(op, generator, sampler))
    return Estimate(value, stderr, num_probes)


def control_variate_diagonal(
    hessian: LinearOperator,
    ggn: GGNOperator,
    num_probes: int = 30,
    generator: torch.Generator | None = None,
    *,
    sampler: ProbeSampler | None = None,
) -> Estimate:
    """diag(H) = diag(G) + diag(H − G): ``num_probes`` GGN samples, then ``num_probes`` probes of H − G, all
    from ``generator`` or ``sampler`` (3·``num_probes`` operator products/backward passes in all)."""
    _check_probes(num_probes)
    if hessian.numel != ggn.numel:
        raise ValueError(f"hessian and ggn act on different sizes: {hessian.numel} vs {ggn.numel}")
    source = _probe_source(hessian, generator, sampler)
    base, base_stderr = _ggn_mean(ggn, num_probes, source)

    def draw() -> Tensor:
        probe = _rademacher(hessian, source)
        return probe * (hessian.matvec(probe) - ggn.matvec(probe))

    correction, correction_stderr = _mean_and_stderr(draw, num_probes)
    return Estimate(base + correction, torch.hypot(base_stderr, correction_stderr), 3 * num_probes)
