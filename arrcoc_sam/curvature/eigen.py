"""Top eigenvalues of a symmetric operator: Lanczos with locking and verification, power iteration with deflation.

Both return the k *largest algebraic* eigenvalues (descending, repeated eigenvalues as often as their
multiplicity). A Ritz/power pair (θ, v) is converged when ‖A v − θ v‖ ≤ max(tol·|θ|, floor), where the
absolute floor = max(1e-3·tol, 64·eps)·ρ̂ (ρ̂ the largest |θ| seen, eps of the operator dtype) lets pairs at
(near-)zero eigenvalues converge at the rounding level of the products. For a symmetric matrix the residual
bounds the eigenvalue error by ‖r‖²/gap, so tol=1e-6 typically gives ~1e-10 relative accuracy on a
well-separated λ.

* Lanczos (Lanczos 1950; full reorthogonalisation as in Golub & Van Loan §10.1; locking as in thick-restart
  methods): one product per step, Ritz residuals |β_j s_{j,i}| at no extra cost. A single Krylov space holds
  one direction per eigenspace, so a repeated eigenvalue appears in it once. Hence: run 1 converges the top k
  Ritz pairs and *locks* them; each further (verification) run starts from a fresh random vector orthogonal
  to all locked vectors, i.e. works on the operator deflated by them, whose top eigenvalue is the largest
  one not yet found. It stops when its top Ritz pair (μ, r) converges, or, after at least half the steps
  run 1 took, when μ + r < θ_k (the k-th largest locked value): the eigenvalue it approximates lies below.
  If μ ≤ θ_k (within the tolerance) the top k are settled; otherwise μ's pair is locked and another run
  follows (one per missing copy of a repeated eigenvalue). A Krylov breakdown (an invariant subspace: its
  Ritz pairs are exact) ends a run and locks all its pairs. ``converged`` is True only once a verification
  has settled the top k. For k = 1 there is no verification run (multiplicity does not change the top value),
  so the cost is that of plain Lanczos. Like any Krylov method this certificate is probabilistic: an eigenvector with a
  negligible component in the random start can be missed; the half-steps rule assumes a missing eigenvalue
  ≥ θ_k shows in the Ritz values about as fast as θ_k did in run 1. Cost for k > 1: ~1.5x the products of
  plain Lanczos on non-degenerate spectra (the verification run). Memory: ``max_iter`` flat vectors for the
  basis plus the locked ones.
* Power iteration with deflation (the PyHessian approach, Yao et al. 2020): one product per step, iterates
  kept orthogonal to the eigenvectors found so far. Plain power iteration converges to the largest-*magnitude*
  eigenvalue and stalls when −λ_min ≈ λ_max (common for Hessians away from a minimum): the iterate then
  alternates between u₊ + c·u₋ and u₊ − c·u₋, its Rayleigh quotient θ stalls and its residual stays large.
  Such an iterate v is nearly an eigenvector of A² but not of A, which is tested at every step for free from
  the next product (A²v = ‖Av‖·A v_next): ‖A²v − ‖Av‖²v‖ < 0.1·‖Av‖·‖Av − θv‖ means the error of v lies
  mostly along eigenvalues within 10% of −θ. Then, and also after 20 steps if θ < 0.99‖Av‖ (a dominant
  negative eigenvalue, or strong mixing), it restarts from a fresh random vector on A + ρ̂·I with ρ̂ = ‖Av‖ ≈
  the spectral radius, whose dominant eigenvalue is the largest algebraic one (the old iterate, near the
  negative eigenvector, would pass the residual test at once on the shifted operator); a run that converges
  to a negative λ restarts on A + |λ|·I. ``max_iter`` counts every product of one eigenpair, restarts
  included.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from arrcoc_sam.curvature._checks import check_integer
from arrcoc_sam.curvature.operators import LinearOperator

__all__ = ["EigenResult", "lanczos", "power_iteration"]

_MIXING_CHECK = 20  # power iteration: step at which a Rayleigh quotient well below ‖Av‖ triggers the shift
_MIXING_RATIO = 0.1  # power iteration: shift when ‖(A² − ‖Av‖²)v‖ < this · ‖Av‖ · ‖Av − θv‖ (module docstring)


@dataclass
class EigenResult:
    """``values [k]`` descending (float64, CPU), ``vectors [k, P]`` (row i pairs with values[i]),
    ``residuals [k]`` = ‖A v_i − λ_i v_i‖ (Lanczos: Ritz estimates on the deflated operator of the run that
    found the pair), ``num_matvecs``, ``converged`` (every pair met the residual test and, for Lanczos, a
    verification run (k > 1) found no further eigenvalue above ``values[-1]``)."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    num_matvecs: int
    converged: bool


def _random_unit(op: LinearOperator, generator: torch.Generator, *bases: Tensor) -> Tensor:
    """A random unit vector orthogonal to the rows of every (orthonormal) basis in ``bases``."""
    vector = torch.randn(op.numel, generator=generator, dtype=op.dtype, device=op.device)
    _project_out(vector, *bases)
    return vector / vector.norm()


def _project_out(vector: Tensor, *bases: Tensor) -> None:
    """In place: remove the components along the rows of ``bases`` (twice, for numerical orthogonality)."""
    for _ in range(2):
        for basis in bases:
            if basis.shape[0]:
                vector -= basis.T @ (basis @ vector)


def _floor(op: LinearOperator, tol: float, scale: float) -> float:
    """Absolute residual floor for the convergence test (module docstring)."""
    return max(1e-3 * tol, 64 * torch.finfo(op.dtype).eps) * scale


def _check_args(op: LinearOperator, k: int, tol: float, max_iter: int | None, max_matvecs: int | None) -> None:
    check_integer("k", k)
    if not 1 <= k <= op.numel:
        raise ValueError(f"k must be in [1, {op.numel}] (the operator size), got {k}")
    if not (tol > 0 and math.isfinite(tol)):
        raise ValueError(f"tol must be a finite number > 0, got {tol}")
    if max_iter is not None:
        check_integer("max_iter", max_iter)
        if max_iter < 1:
            raise ValueError(f"max_iter must be >= 1 (or None for the default), got {max_iter}")
    if max_matvecs is not None:
        check_integer("max_matvecs", max_matvecs)
        if max_matvecs < k:
            raise ValueError(f"max_matvecs={max_matvecs} is below k={k}: each eigenpair needs at least one product")


@dataclass
class _Run:
    """One Lanczos run on the operator deflated by the locked vectors: Ritz pairs, best first."""

    values: Tensor  # [m] float64 CPU, descending
    vectors: Tensor  # [m, P]
    residuals: Tensor  # [m] float64 CPU
    steps: int
    invariant: bool  # breakdown: the Krylov space is invariant, every pair is exact
    settled_below: bool = False  # verification: its top Ritz value + residual fell below the threshold


def _lanczos_run(
    op: LinearOperator,
    want: int,
    locked: Tensor,
    basis: Tensor,
    tol: float,
    scale: float,
    generator: torch.Generator,
    below: float | None = None,
    min_steps: int = 1,
) -> _Run:
    """Lanczos from a random start orthogonal to ``locked`` until its top ``want`` Ritz pairs converge, the
    Krylov space becomes invariant, the ``basis`` buffer (``[steps, P]``) is full, or (verification, with
    ``below``) after ``min_steps`` steps the top Ritz value plus its residual is below ``below``."""
    limit = min(basis.shape[0], op.numel - locked.shape[0])
    alphas: list[float] = []
    betas: list[float] = []
    vector = _random_unit(op, generator, locked)
    for step in range(limit):
        basis[step] = vector
        product = op.matvec(vector)
        alpha = float(vector @ product)
        product -= alpha * vector
        if step:
            product -= betas[-1] * basis[step - 1]
        _project_out(product, locked, basis[: step + 1])
        beta = float(product.norm())
        _check_finite(alpha + beta, step + 1)
        alphas.append(alpha)
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if step:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        theta, ritz = torch.linalg.eigh(tridiagonal)
        theta, ritz = theta.flip(0), ritz.flip(1)
        residuals = (beta * ritz[-1]).abs()
        scale = max(scale, float(theta.abs().max()))
        invariant = beta <= 1e3 * torch.finfo(op.dtype).eps * scale or step + 1 == op.numel - locked.shape[0]
        count = min(want, step + 1)
        bound = torch.clamp(tol * theta[:count].abs(), min=_floor(op, tol, scale))
        if invariant or (count == want and bool((residuals[:count] <= bound).all())):
            break
        if below is not None and step + 1 >= min_steps and float(theta[0] + residuals[0]) < below:
            return _Run(theta[:1], ritz[:, :1].T.to(dtype=op.dtype, device=op.device) @ basis[: step + 1],
                        residuals[:1], step + 1, False, settled_below=True)
        vector = product / beta
        betas.append(beta)
    used = len(alphas)
    keep = used if invariant else min(want, used)
    vectors = ritz[:, :keep].T.to(dtype=op.dtype, device=op.device) @ basis[:used]
    return _Run(theta[:keep], vectors, residuals[:keep], used, invariant)


def lanczos(
    op: LinearOperator,
    k: int = 1,
    tol: float = 1e-6,
    max_iter: int | None = None,
    generator: torch.Generator | None = None,
    max_matvecs: int | None = None,
) -> EigenResult:
    """Top-k eigenpairs of ``op`` (with multiplicity) by Lanczos with locking and a verification run (module
    docstring). ``max_iter`` (default ``min(P, max(64, 4k))``) caps the steps of one run, i.e. the basis
    memory (``max_iter`` flat vectors ``[P]``); ``max_matvecs`` (default ``4·max_iter``) caps the products
    over all runs. ``converged`` is False when a cap stopped it before the top k were settled."""
    _check_args(op, k, tol, max_iter, max_matvecs)
    steps = min(op.numel, max_iter if max_iter is not None else max(64, 4 * k))
    if steps < k:
        raise ValueError(f"max_iter={max_iter} is below k={k}: one Lanczos run needs at least k steps for k eigenpairs")
    budget = max_matvecs if max_matvecs is not None else 4 * steps
    generator = generator or torch.Generator(device=op.device).manual_seed(0)
    basis = torch.empty(steps, op.numel, dtype=op.dtype, device=op.device)
    locked = torch.empty(0, op.numel, dtype=op.dtype, device=op.device)
    values = residuals = torch.empty(0, dtype=torch.float64)
    pending: _Run | None = None  # the unconverged pairs of a run cut short by the budget
    matvecs, scale, settled, first_steps = 0, 0.0, False, 0
    while locked.shape[0] < op.numel and matvecs < budget:
        verifying = values.numel() >= k
        if verifying and k == 1:
            settled = True  # a repeated top eigenvalue is still the top value: no verification run for k = 1
            break
        kth = float(values.topk(k).values[-1]) if verifying else None
        try:
            run = _lanczos_run(
                op, 1 if verifying else k - values.numel(), locked, basis[: budget - matvecs], tol, scale, generator,
                below=kth, min_steps=max(1, (first_steps + 1) // 2),
            )
        except _NonFinite as stop:
            return _undefined(op, k, matvecs + stop.products)
        matvecs += run.steps
        first_steps = first_steps or run.steps
        if run.settled_below:
            settled = True  # the top Ritz interval of the deflated operator lies below θ_k
            break
        scale = max(scale, float(run.values.abs().max()))
        good = run.residuals <= torch.clamp(tol * run.values.abs(), min=_floor(op, tol, scale))
        good |= run.invariant
        if verifying and bool(good[0]) and float(run.values[0]) <= kth + max(tol * abs(kth), _floor(op, tol, scale)):
            settled = True  # the largest eigenvalue not yet locked does not enter the top k
            break
        locked = torch.cat([locked, run.vectors[good]])
        values = torch.cat([values, run.values[good]])
        residuals = torch.cat([residuals, run.residuals[good]])
        if not bool(good.all()):
            bad = ~good
            pending = _Run(run.values[bad], run.vectors[bad], run.residuals[bad], 0, False)
            break
    settled |= locked.shape[0] == op.numel  # every eigenpair is locked
    if pending is not None:
        locked = torch.cat([locked, pending.vectors])
        values = torch.cat([values, pending.values])
        residuals = torch.cat([residuals, pending.residuals])
    order = values.argsort(descending=True)[:k]
    return EigenResult(values[order], locked[order.to(op.device)], residuals[order], matvecs, settled)


def power_iteration(op: LinearOperator, k: int = 1, tol: float = 1e-6, max_iter: int | None = None,
                    generator: torch.Generator | None = None, max_matvecs: int | None = None) -> EigenResult:
    """Top-k eigenpairs by power iteration with deflation (module docstring). ``max_iter`` (default 1000) caps
    the products spent on one eigenpair, shifted restarts included; ``max_matvecs`` (default ``k·max_iter``)
    caps them over all k (each later eigenpair keeps at least one). ``converged`` is False when a cap stopped
    any eigenpair before its residual test passed."""
    _check_args(op, k, tol, max_iter, max_matvecs)
    limit = 1000 if max_iter is None else max_iter
    budget = k * limit if max_matvecs is None else min(max_matvecs, k * limit)
    generator = generator or torch.Generator(device=op.device).manual_seed(0)
    found = torch.empty(0, op.numel, dtype=op.dtype, device=op.device)
    values: list[float] = []
    residuals: list[float] = []
    matvecs, scale = 0, 0.0
    converged = True
    for index in range(k):
        allowance = min(limit, budget - matvecs - (k - 1 - index))
        shift, done = 0.0, False
        previous: tuple[Tensor, float, float] | None = None  # (v, ‖Av‖, ‖Av − θv‖) of the last unshifted step
        vector = _random_unit(op, generator, found)
        for step in range(allowance):
            product = op.matvec(vector) + shift * vector
            matvecs += 1
            _project_out(product, found)
            estimate = float(vector @ product)
            growth = float(product.norm())
            residual = float((product - estimate * vector).norm())
            if not math.isfinite(estimate + residual):
                return _undefined(op, k, matvecs)
            scale = max(scale, abs(estimate - shift))
            if residual <= max(tol * abs(estimate - shift), _floor(op, tol, scale)):
                done = estimate >= 0 or shift != 0.0
                if done:
                    break
                restart = -estimate  # converged to a dominant negative λ: the top of A + |λ|·I is the one wanted
            elif shift == 0.0 and _mixing(step, product, estimate, growth, previous):
                restart = growth  # ±λ mixing or a dominant negative λ: A + ρ̂·I (module docstring)
            else:
                restart = None
            if step + 1 == allowance:
                break  # out of products: report v with its own θ and residual (not converged)
            if restart is None:
                previous = (vector, growth, residual) if shift == 0.0 else None
                vector = product / growth
            else:  # a fresh start: the old iterate, near −λ, is ≈ 0 on the shifted operator
                shift, previous = restart, None
                vector = _random_unit(op, generator, found)
        converged &= done
        found = torch.cat([found, vector[None]])
        values.append(estimate - shift)
        residuals.append(residual)
    order = torch.argsort(torch.tensor(values, dtype=torch.float64), descending=True)
    return EigenResult(
        torch.tensor(values, dtype=torch.float64)[order],
        found[order.to(found.device)],
        torch.tensor(residuals, dtype=torch.float64)[order],
        matvecs,
        converged,
    )


class _NonFinite(Exception):
    """A product of the operator held inf/NaN after ``products`` products of the current run."""

    def __init__(self, products: int) -> None:
        super().__init__(products)
        self.products = products


def _check_finite(value: float, products: int) -> None:
    """Raise :class:`_NonFinite` unless ``value`` (a sum of figures of the latest product) is finite."""
    if not math.isfinite(value):
        raise _NonFinite(products)


def _undefined(op: LinearOperator, k: int, matvecs: int) -> EigenResult:
    """The result where the operator's products are not finite: NaN pairs, not converged, with a warning."""
    warnings.warn(
        f"curvature: operator product {matvecs} is not finite (inf/NaN): the loss or its gradient is non-finite "
        "at these weights or on this data; the eigenvalues are NaN", RuntimeWarning, stacklevel=3)
    nan = math.nan
    return EigenResult(torch.full((k,), nan, dtype=torch.float64),
                       torch.full((k, op.numel), nan, dtype=op.dtype, device=op.device),
                       torch.full((k,), nan, dtype=torch.float64), matvecs, False)


def _mixing(step: int, product: Tensor, estimate: float, growth: float, previous: tuple[Tensor, float, float] | None) -> bool:
    """Whether the unshifted power iterate mixes ±λ (or tends to a dominant negative λ), so that the shift
    pays: at step ``_MIXING_CHECK`` its Rayleigh quotient lags ‖Av‖ by over 1%, or, at any step, the previous
    iterate v was nearly an eigenvector of A² but not of A. ``product`` = A v_next with v_next = A v / ‖Av‖, so
    A²v = ‖Av‖·product and ‖(A² − ‖Av‖²) v‖ / ‖Av‖ = ‖product − ‖Av‖·v‖."""
    if step + 1 == _MIXING_CHECK and estimate < 0.99 * growth:
        return True
    if previous is None:
        return False
    vector, previous_growth, previous_residual = previous
    return float((product - previous_growth * vector).norm()) < _MIXING_RATIO * previous_residual
