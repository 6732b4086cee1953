"""Curvature matrices as linear operators over a list of tensors (weights, or inputs/token features).

A ``CurvatureOperator`` is the symmetric P×P matrix (P = total elements of ``params``) of the data-averaged
objective L(θ) = Σ_b w_b L_b(θ) (weights from :mod:`arrcoc_sam.curvature._data`), applied to flat vectors:

* :class:`HessianOperator`: H = ∇²L, by double backward (one forward, one backward, one
  backward-of-backward per batch: ~2-3 gradients' cost).
* :class:`GGNOperator`: G = Σ_b w_b J_bᵀ Λ_b J_b for a likelihood on the outputs (``cross_entropy``,
  ``bce``, ``mse``; None: from the HF ``config.problem_type``, see :mod:`.likelihoods`); equal to the Fisher
  for these canonical-link likelihoods. J v comes from the
  double-backward trick, so it works for any module and any leaf tensor. ``sample_factor`` draws u with
  E[u uᵀ] = G (``sampling="labels"``: sampled labels, the sampled Fisher; ``"rademacher"``: a square root
  of Λ times Rademacher signs), for non-negative diagonal estimates.

``params`` may be model parameters or any leaf tensors the loss depends on, e.g. token features
``[B, N, C]`` that the batch holds: the same estimators then give curvature w.r.t. inputs. Operators do
not change the model state themselves; the public functions run them inside :func:`probe_context`.
Vectors are flat tensors ``[P]`` in ``self.dtype`` (the widest dtype of ``params`` and float32: bf16/fp16
models get float32 vectors, cast to each parameter's dtype for the products) on ``self.device``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from arrcoc_sam.curvature._data import (
    LossFn,
    OutputFn,
    as_batches,
    batch_weights,
    default_loss,
    default_outputs,
    iter_weighted,
)
from arrcoc_sam.curvature.likelihoods import (
    LIKELIHOODS,
    SAMPLINGS,
    output_hessian_product,
    resolve_likelihood,
    sample_output_factor,
    select_rows,
)
from arrcoc_sam.curvature.probe import ProbeSampler, check_params

__all__ = ["LinearOperator", "MatrixOperator", "CurvatureOperator", "HessianOperator", "GGNOperator"]


def _grad(outputs, inputs: list[Tensor], grad_outputs=None, **kwargs) -> list[Tensor]:
    """``torch.autograd.grad`` returning zeros (not None) for inputs the outputs do not depend on."""
    return list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True, materialize_grads=True, **kwargs))


class LinearOperator(Protocol):
    """What every estimator needs: a symmetric operator on flat vectors ``[numel]``."""

    numel: int
    dtype: torch.dtype
    device: torch.device

    def matvec(self, vector: Tensor) -> Tensor: ...


class MatrixOperator:
    """An explicit symmetric ``[P, P]`` matrix as a :class:`LinearOperator` (references, benchmarks)."""

    def __init__(self, matrix: Tensor) -> None:
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(f"matrix must be square [P, P], got {tuple(matrix.shape)}")
        self.matrix = matrix
        self.numel = matrix.shape[0]
        self.dtype = matrix.dtype
        self.device = matrix.device

    def matvec(self, vector: Tensor) -> Tensor:
        return self.matrix @ vector


class CurvatureOperator:
    """Base class: data, weights, and flat <-> list conversion for a symmetric curvature matrix."""

    def __init__(self, model: nn.Module, params: Sequence[Tensor], data: Any, weighting: str = "auto") -> None:
        self.model = model
        self.params = list(params)
        if not self.params:
            raise ValueError("params is empty: pass at least one tensor")
        check_params(self.params)
        self.batches = as_batches(data)
        self.weights = batch_weights(self.batches, weighting, model)
        self.shapes = [p.shape for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        self.numel = sum(self.sizes)
        dtype = torch.float32  # at least: bf16/fp16 flat vectors would ruin orthogonalisation and sums
        for p in self.params:
            dtype = torch.promote_types(dtype, p.dtype)
        self.dtype = dtype
        self.device = self.params[0].device

    def flatten(self, tensors: Sequence[Tensor]) -> Tensor:
        """List shaped like ``params`` -> flat ``[P]`` vector in ``self.dtype``."""
        return torch.cat([t.reshape(-1).to(self.dtype) for t in tensors])

    def unflatten(self, vector: Tensor) -> list[Tensor]:
        """Flat ``[P]`` vector -> list of views shaped (and typed) like ``params``."""
        if vector.shape != (self.numel,):
            raise ValueError(f"vector must have shape ({self.numel},), got {tuple(vector.shape)}")
        return [
            chunk.view(shape).to(p.dtype)
            for chunk, shape, p in zip(vector.split(self.sizes), self.shapes, self.params, strict=True)
        ]

    def unflatten_batch(self, vectors: Tensor) -> list[Tensor]:
        """``[K, P]`` flat vectors -> list of ``[K, *shape]`` tensors shaped (and typed) like ``params``."""
        return [
            chunk.reshape(vectors.shape[0], *shape).to(p.dtype)
            for chunk, shape, p in zip(vectors.split(self.sizes, dim=1), self.shapes, self.params, strict=True)
        ]

    def matvec(self, vector: Tensor) -> Tensor:
        """A·v for a flat ``[P]`` vector."""
        raise NotImplementedError

    def to_dense(self, max_params: int = 4096) -> Tensor:
        """The full ``[P, P]`` matrix, column by column (P products); refused above ``max_params``."""
        self._check_dense(max_params)
        eye = torch.eye(self.numel, dtype=self.dtype, device=self.device)
        return torch.stack([self.matvec(column) for column in eye], dim=1)

    def _check_dense(self, max_params: int) -> None:
        if self.numel > max_params:
            raise ValueError(
                f"dense curvature needs {self.numel} products and a {self.numel}x{self.numel} matrix, more than "
                f"max_params={max_params}; raise max_params or use the iterative estimators"
            )


class HessianOperator(CurvatureOperator):
    """Hessian of L(θ) = Σ_b w_b loss_fn(model, batch_b) w.r.t. ``params``."""

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        data: Any,
        loss_fn: LossFn | None = None,
        weighting: str = "auto",
    ) -> None:
        super().__init__(model, params, data, weighting)
        self.loss_fn = loss_fn or default_loss
        self.loss_dtype: torch.dtype | None = None  # dtype of the last loss computed (sharpness warns on bf16/fp16)

    def _loss(self, batch: Any) -> Tensor:
        loss = self.loss_fn(self.model, batch)
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
        self.loss_dtype = loss.dtype
        return loss.reshape(())

    def _differentiable_loss(self, batch: Any) -> Tensor:
        """``_loss`` for the gradient paths: refuses a loss outside the autograd graph with a clear message."""
        loss = self._loss(batch)
        if not loss.requires_grad:
            raise ValueError(
                "loss_fn returned a loss that does not require grad, so it cannot be differentiated w.r.t. params: "
                "it was detached (.detach(), .item(), a new tensor) or computed under torch.no_grad() inside "
                "loss_fn, or it depends on no tensor that requires grad; return the loss tensor the model computed"
            )
        return loss

    def loss(self) -> float:
        """L(θ) at the current values of ``params`` (no graph kept)."""
        with torch.no_grad():
            total = sum(weight * self._loss(batch).double() for batch, weight in iter_weighted(self.batches, self.weights))
        return float(total)

    def loss_and_gradient(self) -> tuple[float, Tensor]:
        """(L(θ), ∇L(θ) as a flat ``[P]`` vector)."""
        total = torch.zeros((), dtype=torch.float64)
        gradient = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        for batch, weight in iter_weighted(self.batches, self.weights):
            loss = self._differentiable_loss(batch)
            gradient.add_(self.flatten(_grad(loss, self.params)), alpha=weight)
            total += weight * loss.detach().double().cpu()
        return float(total), gradient

    def matvec(self, vector: Tensor) -> Tensor:
        vectors = self.unflatten(vector)
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        for batch, weight in iter_weighted(self.batches, self.weights):
            grads = _grad(self._differentiable_loss(batch), self.params, create_graph=True)
            live = [i for i, g in enumerate(grads) if g.requires_grad]
            if not live:
                continue
            products = _grad([grads[i] for i in live], self.params, [vectors[i] for i in live])
            out.add_(self.flatten(products), alpha=weight)
        return out

    def to_dense(self, max_params: int = 4096) -> Tensor:
        """The full ``[P, P]`` Hessian: per batch one gradient graph, differentiated for all P unit vectors at
        once (``is_grads_batched``, vmap over the backward); refused above ``max_params``."""
        self._check_dense(max_params)
        eye = torch.eye(self.numel, dtype=self.dtype, device=self.device)
        units = self.unflatten_batch(eye)
        dense = torch.zeros(self.numel, self.numel, dtype=self.dtype, device=self.device)
        for batch, weight in iter_weighted(self.batches, self.weights):
            grads = _grad(self._differentiable_loss(batch), self.params, create_graph=True)
            live = [i for i, g in enumerate(grads) if g.requires_grad]
            if not live:
                continue
            rows = torch.autograd.grad(
                [grads[i] for i in live], self.params, [units[i] for i in live], is_grads_batched=True, allow_unused=True
            )  # None (not materialised zeros, which would lack the batch dim) for a param the gradient skips
            blocks = [
                torch.zeros(self.numel, size, dtype=self.dtype, device=self.device)
                if r is None
                else r.reshape(self.numel, -1).to(self.dtype)
                for r, size in zip(rows, self.sizes, strict=True)
            ]
            dense.add_(torch.cat(blocks, dim=1), alpha=weight)
        return dense


class GGNOperator(CurvatureOperator):
    """Generalised Gauss-Newton (= Fisher) of a likelihood on ``output_fn``'s outputs w.r.t. ``params``."""

    def __init__(
        self,
        model: nn.Module,
        params: Sequence[Tensor],
        data: Any,
        output_fn: OutputFn | None = None,
        likelihood: str | None = None,
        weighting: str = "auto",
        sampling: str = "rademacher",
    ) -> None:
        super().__init__(model, params, data, weighting)
        if sampling not in SAMPLINGS:
            raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
        if likelihood is not None and likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS} or None (from config.problem_type), got {likelihood!r}")
        self.output_fn = output_fn or default_outputs
        self.likelihood = likelihood
        self.sampling = sampling

    def _outputs(self, batch: Any) -> Tensor:
        outputs, targets = self.output_fn(self.model, batch)
        if not isinstance(outputs, Tensor):
            raise TypeError(f"output_fn must return (outputs tensor, targets or None), got outputs of type {type(outputs).__name__}")
        if not outputs.requires_grad:
            raise ValueError(
                "output_fn returned outputs that do not require grad, so the GGN cannot differentiate them w.r.t. "
                "params: they were detached or computed under torch.no_grad() inside output_fn, or depend on no "
                "tensor that requires grad"
            )
        # resolved after the first forward: an HF head with problem_type=None sets it there (num_labels=1: regression)
        self.likelihood = resolve_likelihood(self.likelihood, self.model)
        return select_rows(self.likelihood, outputs, targets)

    def matvec(self, vector: Tensor) -> Tensor:
        vectors = self.unflatten(vector)
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        for batch, weight in iter_weighted(self.batches, self.weights):
            outputs = self._outputs(batch)
            if outputs.numel() == 0:
                continue
            dummy = torch.zeros_like(outputs, requires_grad=True)
            transposed = _grad(outputs, self.params, dummy, create_graph=True)  # Jᵀ·dummy, linear in dummy
            live = [i for i, g in enumerate(transposed) if g.requires_grad]
            if not live:
                continue
            jvp = _grad([transposed[i] for i in live], [dummy], [vectors[i] for i in live], retain_graph=True)[0]
            weighted = output_hessian_product(self.likelihood, outputs.detach(), jvp)
            out.add_(self.flatten(_grad(outputs, self.params, weighted)), alpha=weight)
        return out

    def sample_factor(self, probes: torch.Generator | ProbeSampler) -> Tensor:
        """A flat u = Σ_b √w_b J_bᵀ s_b with E[u uᵀ] = G (one forward and one backward per batch); the output-space
        s_b come from ``probes``, a generator or a :class:`~arrcoc_sam.curvature.probe.ProbeSampler`."""
        out = torch.zeros(self.numel, dtype=self.dtype, device=self.device)
        for batch, weight in iter_weighted(self.batches, self.weights):
            outputs = self._outputs(batch)
            if outputs.numel() == 0:
                continue
            factor = sample_output_factor(self.likelihood, outputs.detach(), probes, self.sampling)
            out.add_(self.flatten(_grad(outputs, self.params, factor)), alpha=math.sqrt(weight))
        return out
