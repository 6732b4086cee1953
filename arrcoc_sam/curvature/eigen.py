"""Top eigenvalues of a symmetric operator: Lanczos with full reorthogonalisation, power iteration with deflation.

Both return the k *largest algebraic* eigenvalues (descending) and stop when every requested pair meets
the residual test ‖A v − λ v‖ ≤ tol·|λ|. For a symmetric matrix this residual bounds the eigenvalue error by
‖r‖²/gap, so tol=1e-6 typically gives ~1e-10 relative accuracy on a well-separated λ.

* Lanczos (Lanczos 1950; full reorthogonalisation as in Golub & Van Loan §10.1): one product per step, Ritz
  residuals |β_j s_{j,i}| at no extra cost; memory: one flat vector per step (``max_iter × P``). A repeated
  eigenvalue is found once per Krylov space; on breakdown the iteration restarts on a fresh random vector
  orthogonal to the basis.
* Power iteration with deflation (the PyHessian approach, Yao et al. 2020): one product per step, iterates
  kept orthogonal to the eigenvectors found so far. Plain power iteration converges to the largest-*magnitude*
  eigenvalue and stalls when −λ_min ≈ λ_max (common for Hessians away from a minimum). So after 20 steps, if
  the Rayleigh quotient θ is below 0.99‖Av‖ (a dominant negative eigenvalue, or ± mixing), it continues on
  A + ρ̂·I with ρ̂ = ‖Av‖ ≈ the spectral radius, whose dominant eigenvalue is the largest algebraic one;
  a run that converges to a negative λ restarts on A + |λ|·I.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from arrcoc_sam.curvature.operators import LinearOperator

__all__ = ["EigenResult", "lanczos", "power_iteration"]

_MIXING_CHECK = 20  # power iteration: step at which a Rayleigh quotient well below ‖Av‖ triggers the shift


@dataclass
class EigenResult:
    """``values [k]`` descending (float64, CPU), ``vectors [k, P]`` (row i pairs with values[i]),
    ``residuals [k]`` = ‖A v_i − λ_i v_i‖ (Lanczos: Ritz estimates), ``num_matvecs``, ``converged``."""

    values: Tensor
    vectors: Tensor
    residuals: Tensor
    num_matvecs: int
    converged: bool


def _random_unit(op: LinearOperator, generator: torch.Generator, basis: Tensor | None = None) -> Tensor:
    vector = torch.randn(op.numel, generator=generator, dtype=op.dtype, device=op.device)
    if basis is not None and basis.shape[0]:
        for _ in range(2):
            vector -= basis.T @ (basis @ vector)
    return vector / vector.norm()


def _check_args(op: LinearOperator, k: int, tol: float) -> None:
    if not 1 <= k <= op.numel:
        raise ValueError(f"k must be in [1, {op.numel}] (the operator size), got {k}")
    if tol <= 0:
        raise ValueError(f"tol must be > 0, got {tol}")


def lanczos(
    op: LinearOperator, k: int = 1, tol: float = 1e-6, max_iter: int | None = None, generator: torch.Generator | None = None
) -> EigenResult:
    """Top-k eigenpairs of ``op`` by Lanczos with full reorthogonalisation; ``max_iter`` (default
    ``min(P, max(64, 4k))``) caps the Lanczos steps, i.e. the products."""
    _check_args(op, k, tol)
    steps = min(op.numel, max_iter or max(64, 4 * k))
    generator = generator or torch.Generator(device=op.device).manual_seed(0)
    basis = torch.empty(steps, op.numel, dtype=op.dtype, device=op.device)
    alphas: list[float] = []
    betas: list[float] = []
    vector = _random_unit(op, generator)
    theta = ritz = residuals = None
    for step in range(steps):
        basis[step] = vector
        product = op.matvec(vector)
        alpha = float(vector @ product)
        product -= alpha * vector
        if step:
            product -= betas[-1] * basis[step - 1]
        active = basis[: step + 1]
        for _ in range(2):
            product -= active.T @ (active @ product)
        beta = float(product.norm())
        alphas.append(alpha)
        tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
        if step:
            off = torch.tensor(betas, dtype=torch.float64)
            tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
        theta, ritz = torch.linalg.eigh(tridiagonal)
        count = min(k, step + 1)
        residuals = (beta * ritz[-1, -count:]).abs().flip(0)
        scale = theta.abs().max().clamp_min(torch.finfo(torch.float64).tiny)
        top = theta[-count:].flip(0)
        if count == k and bool((residuals <= tol * top.abs()).all()):
            break
        if beta <= 1e3 * torch.finfo(op.dtype).eps * float(scale):
            if step + 1 == op.numel:
                break
            vector = _random_unit(op, generator, basis[: step + 1])
            betas.append(0.0)
        else:
            vector = product / beta
            betas.append(beta)
    used = len(alphas)
    count = min(k, used)
    coefficients = ritz[:, -count:].flip(1).to(op.dtype).to(op.device)
    vectors = coefficients.T @ basis[:used]
    values = theta[-count:].flip(0)
    converged = count == k and bool((residuals <= tol * values.abs()).all())
    return EigenResult(values, vectors, residuals, used, converged)


def power_iteration(
    op: LinearOperator, k: int = 1, tol: float = 1e-6, max_iter: int | None = None, generator: torch.Generator | None = None
) -> EigenResult:
    """Top-k eigenpairs by power iteration with deflation; ``max_iter`` (default 1000) caps steps per eigenpair."""
    _check_args(op, k, tol)
    limit = max_iter or 1000
    generator = generator or torch.Generator(device=op.device).manual_seed(0)
    found = torch.empty(0, op.numel, dtype=op.dtype, device=op.device)
    values: list[float] = []
    residuals: list[float] = []
    matvecs = 0
    converged = True
    for _ in range(k):
        shift = 0.0
        while True:
            vector = _random_unit(op, generator, found)
            done = False
            for step in range(limit):
                product = op.matvec(vector) + shift * vector
                matvecs += 1
                for _ in range(2):
                    product -= found.T @ (found @ product)
                estimate = float(vector @ product)
                growth = float(product.norm())
                residual = float((product - estimate * vector).norm())
                if residual <= tol * abs(estimate - shift):
                    done = True
                    break
                if shift == 0.0 and step + 1 == _MIXING_CHECK and estimate < 0.99 * growth:
                    shift = growth  # ±λ mixing or a dominant negative λ: iterate on A + ρ̂·I from here
                vector = product / growth
            if done and estimate < 0 and shift == 0.0:
                shift = -estimate
                continue
            break
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
