"""Model-level curvature probes (DESIGN §3b): build an operator, run an estimator inside ``probe_context``.

Common arguments: ``model``; ``loss_fn(model, batch) -> scalar`` (None: ``model(**batch).loss``); ``data``
(one batch or an iterable of batches, see :mod:`arrcoc_sam.curvature._data` for the weighting); ``params``
(default: the trainable parameters; any leaf tensors the loss depends on, e.g. token features held by the
batch, give the curvature w.r.t. those); ``curvature`` = ``"hessian"`` or ``"ggn"`` (then ``output_fn`` and
``likelihood`` define it; ``loss_fn`` is unused); ``seed`` for the probe vectors (a private generator: the
global RNG is never touched; :func:`hessian_diagonal` also takes a ``sampler`` that draws them instead).
Every function leaves mode, weights, grads, RNG and attention as found.

GGN defaults: ``likelihood=None`` follows the HF head's ``config.problem_type`` (``"regression"`` → ``"mse"``,
``"multi_label_classification"`` → ``"bce"``, else ``"cross_entropy"``; see :mod:`.likelihoods`);
``output_fn=None`` runs ``model(**batch)`` with its labels and, for causal LMs, pairs ``logits[..., :-1, :]``
with ``labels[..., 1:]`` (:func:`~arrcoc_sam.curvature._data.default_outputs`).

A tensor in ``params`` that the loss does not depend on (an unused layer, a frozen branch) has an all-zero row
and column: that is its exact curvature, not an error. Probes need autograd: they run under
``torch.no_grad()`` but refuse ``torch.inference_mode()``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from arrcoc_sam.curvature._data import LossFn, OutputFn
from arrcoc_sam.curvature.eigen import EigenResult, lanczos, power_iteration
from arrcoc_sam.curvature.estimators import (
    Estimate,
    control_variate_diagonal,
    ggn_diagonal,
    hutchinson_diagonal,
    hutchinson_trace,
    hutchpp_trace,
)
from arrcoc_sam.curvature.operators import CurvatureOperator, GGNOperator, HessianOperator
from arrcoc_sam.curvature.probe import ProbeSampler, default_params, probe_context

__all__ = [
    "curvature_operator",
    "exact_hessian",
    "hessian_vector_product",
    "top_eigenvalues",
    "hessian_trace",
    "hessian_diagonal",
]

CURVATURES = ("hessian", "ggn")


def curvature_operator(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    params: Sequence[Tensor] | None = None,
    *,
    curvature: str = "hessian",
    output_fn: OutputFn | None = None,
    likelihood: str | None = None,
    weighting: str = "auto",
    sampling: str = "rademacher",
) -> CurvatureOperator:
    """The operator for ``curvature`` (use it inside :func:`probe_context` when calling it directly)."""
    params = default_params(model) if params is None else list(params)
    if curvature == "hessian":
        return HessianOperator(model, params, data, loss_fn, weighting)
    if curvature == "ggn":
        return GGNOperator(model, params, data, output_fn, likelihood, weighting, sampling)
    raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")


def _generator(op: CurvatureOperator, seed: int) -> torch.Generator:
    return torch.Generator(device=op.device).manual_seed(seed)


def exact_hessian(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    params: Sequence[Tensor] | None = None,
    *,
    max_params: int = 4096,
    weighting: str = "auto",
) -> Tensor:
    """The dense Hessian ``[P, P]`` of the data-averaged loss (P products); refused for P > ``max_params``."""
    op = curvature_operator(model, loss_fn, data, params, weighting=weighting)
    with probe_context(model, op.params):
        return op.to_dense(max_params)


def hessian_vector_product(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    vector: Sequence[Tensor],
    params: Sequence[Tensor] | None = None,
    *,
    curvature: str = "hessian",
    output_fn: OutputFn | None = None,
    likelihood: str | None = None,
    weighting: str = "auto",
) -> list[Tensor]:
    """H·v (or G·v) with ``vector`` a list of tensors shaped like ``params``; returns the same structure."""
    op = curvature_operator(
        model, loss_fn, data, params, curvature=curvature, output_fn=output_fn, likelihood=likelihood, weighting=weighting
    )
    if len(vector) != len(op.params):
        raise ValueError(f"vector has {len(vector)} tensors for {len(op.params)} params")
    for index, (tensor, param) in enumerate(zip(vector, op.params, strict=True)):
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"vector[{index}] has shape {tuple(tensor.shape)}, but params[{index}] has shape {tuple(param.shape)}")
    with probe_context(model, op.params):
        return [t.clone() for t in op.unflatten(op.matvec(op.flatten(vector)))]


def top_eigenvalues(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    k: int = 1,
    method: str = "lanczos",
    tol: float = 1e-6,
    max_iter: int | None = None,
    params: Sequence[Tensor] | None = None,
    *,
    curvature: str = "hessian",
    output_fn: OutputFn | None = None,
    likelihood: str | None = None,
    weighting: str = "auto",
    seed: int = 0,
    max_matvecs: int | None = None,
) -> EigenResult:
    """The k largest eigenvalues (``.values`` descending, repeated ones as often as their multiplicity),
    eigenvectors ``.vectors [k, P]`` (flat; split with ``curvature_operator(...).unflatten``), ``.num_matvecs``
    and ``.converged``; ``method`` = ``"lanczos"`` | ``"power"``. ``max_iter``: Lanczos steps per run (the basis
    memory: that many flat vectors; default ``min(P, max(64, 4k))``), or power products per eigenpair (default
    1000). ``max_matvecs`` caps the operator products over everything (each costs ~2-3 gradients; default:
    Lanczos ``4·max_iter``, power ``k·max_iter``); ``.converged`` is False when a cap stopped the solver early."""
    solvers = {"lanczos": lanczos, "power": power_iteration}
    if method not in solvers:
        raise ValueError(f"method must be one of {tuple(solvers)}, got {method!r}")
    op = curvature_operator(
        model, loss_fn, data, params, curvature=curvature, output_fn=output_fn, likelihood=likelihood, weighting=weighting
    )
    with probe_context(model, op.params):
        return solvers[method](op, k, tol, max_iter, _generator(op, seed), max_matvecs)


def hessian_trace(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    num_probes: int = 30,
    method: str = "hutchinson",
    params: Sequence[Tensor] | None = None,
    *,
    curvature: str = "hessian",
    output_fn: OutputFn | None = None,
    likelihood: str | None = None,
    weighting: str = "auto",
    seed: int = 0,
) -> Estimate:
    """tr(H) (or tr(G)) with ``.value`` and ``.stderr`` floats; ``method`` = ``"hutchinson"`` | ``"hutch++"``."""
    estimators = {"hutchinson": hutchinson_trace, "hutch++": hutchpp_trace}
    if method not in estimators:
        raise ValueError(f"method must be one of {tuple(estimators)}, got {method!r}")
    op = curvature_operator(
        model, loss_fn, data, params, curvature=curvature, output_fn=output_fn, likelihood=likelihood, weighting=weighting
    )
    with probe_context(model, op.params):
        return estimators[method](op, num_probes, _generator(op, seed))


def hessian_diagonal(
    model: nn.Module,
    loss_fn: LossFn | None,
    data: Any,
    num_probes: int = 30,
    method: str = "hutchinson",
    params: Sequence[Tensor] | None = None,
    *,
    output_fn: OutputFn | None = None,
    likelihood: str | None = None,
    weighting: str = "auto",
    sampling: str = "rademacher",
    seed: int = 0,
    sampler: ProbeSampler | None = None,
) -> Estimate:
    """The curvature diagonal as ``.value`` / ``.stderr``: lists of tensors shaped like ``params``.

    ``method``: ``"hutchinson"`` (diag H, Rademacher; unbiased, may be negative), ``"ggn"`` (diag of the
    GGN/Fisher; ≥ 0; uses ``output_fn``/``likelihood``, not ``loss_fn``; ``sampling="rademacher"``
    (default: square-root factor of Λ, lower variance near one-hot predictions) or ``"labels"`` (sampled
    Fisher)) or
    ``"hutchinson_cv"`` (diag H with the GGN diagonal as control variate). With ``params=[features]`` for
    token features ``[B, N, C]`` the value is ``[B, N, C]``; sum over C for a per-token precision ``[B, N]``.

    ``sampler`` (default: one generator seeded with ``seed``, which is then unused) draws every probe:
    feature-space signs for Hutchinson, output-space signs for the GGN factors. A
    :class:`~arrcoc_sam.curvature.probe.BlockSampler` with one generator per sample, on a leaf ``[B, ...]``
    and a loss that combines independent per-sample losses (block-diagonal curvature), gives block b of
    ``.value`` and ``.stderr`` equal to sample b's estimate alone with generator b times the weight w_b of its
    loss in the batch loss: w_b = 1 for a sum of per-sample losses, 1/B for a mean over the B samples
    (multiply by B to recover the solo estimate), n_b/Σn for a mean over labelled tokens; in one batched pass
    per probe.
    """
    methods = ("hutchinson", "ggn", "hutchinson_cv")
    if method not in methods:
        raise ValueError(f"method must be one of {methods}, got {method!r}")
    params = default_params(model) if params is None else list(params)
    with probe_context(model, params):
        ggn = GGNOperator(model, params, data, output_fn, likelihood, weighting, sampling) if method != "hutchinson" else None
        hessian = HessianOperator(model, params, data, loss_fn, weighting) if method != "ggn" else None
        op = hessian or ggn
        generator = _generator(op, seed) if sampler is None else None
        if method == "hutchinson":
            estimate = hutchinson_diagonal(hessian, num_probes, generator, sampler=sampler)
        elif method == "ggn":
            estimate = ggn_diagonal(ggn, num_probes, generator, sampler=sampler)
        else:
            estimate = control_variate_diagonal(hessian, ggn, num_probes, generator, sampler=sampler)
        return Estimate(
            [t.clone() for t in op.unflatten(estimate.value)],
            [t.clone() for t in op.unflatten(estimate.stderr)],
            estimate.num_matvecs,
        )
