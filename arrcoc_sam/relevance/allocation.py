"""Token allocation: which K of N visual tokens to keep, and how many VLM tokens each one gets.

Three allocators share one call, ``allocator(relevance [B, N], precision [B, N]) -> (selected_indices
[B, K] int64, token_budgets [B, K] int64)``, with selected tokens in descending order of their score (equal
scores in ascending token index, `arrcoc_sam.relevance.rank_metrics.top_k_indices`):

* ``PrecisionAwareAllocator``: score s = relevance^α · precision^(±β) (+β for ``favor="precise"``, −β for
  ``favor="uncertain"``); the top-K scores are kept; each gets ``min_tokens`` plus a share of the remaining
  budget proportional to s, capped at ``max_tokens`` (water-filling: capped shares go back to the pool),
  rounded with the largest-remainder method. The budgets sum to exactly ``min(total_budget, K·max_tokens)``.
* ``RelevanceAllocator``: ARR-COC's plain mode, tokens = floor(min + (max − min)·relevance) for the top-K
  relevance, granted greedily in that order while always reserving ``min_tokens`` for every later token.
* ``PrecisionAwareAllocation``: the knowledge file's top-k rule, adjusted = relevance − penalty ·
  relu(p̂ − target_precision) with p̂ the precision divided by its per-sample maximum (or relevance / its
  maximum when no precision is given), every kept token getting the same budget.

``token_precision`` estimates the per-token precision: the diagonal of the loss's curvature with respect
to each token's features, summed over its channels (see its docstring).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arrcoc_sam.curvature import hessian_diagonal
from arrcoc_sam.curvature.probe import BlockSampler
from arrcoc_sam.relevance.rank_metrics import top_k_indices
from arrcoc_sam.relevance.seeding import sample_generator

__all__ = [
    "PrecisionAwareAllocation",
    "PrecisionAwareAllocator",
    "RelevanceAllocator",
    "largest_remainder_round",
    "token_precision",
    "water_fill",
]


def _check_limits(min_tokens: int, max_tokens: int, k: int, total_budget: int | None) -> int:
    """Validate the shared settings; return the total budget (default: K · (min + max) // 2)."""
    if min_tokens < 0:
        raise ValueError(f"min_tokens must be >= 0, got {min_tokens}")
    if min_tokens > max_tokens:
        raise ValueError(f"min_tokens ({min_tokens}) must not exceed max_tokens ({max_tokens})")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    budget = k * (min_tokens + max_tokens) // 2 if total_budget is None else int(total_budget)
    if budget < k * min_tokens:
        raise ValueError(
            f"total_budget={budget} cannot give k={k} tokens min_tokens={min_tokens} each "
            f"(needs >= {k * min_tokens}); raise total_budget or lower k or min_tokens"
        )
    return budget


def _check_scores(name: str, scores: Tensor, k: int, shape: torch.Size | None = None) -> None:
    if scores.ndim != 2:
        raise ValueError(f"{name} must be [B, N], got shape {tuple(scores.shape)}")
    if shape is not None and scores.shape != shape:
        raise ValueError(f"{name} must match relevance's shape {tuple(shape)}, got {tuple(scores.shape)}")
    if k > scores.shape[1]:
        raise ValueError(f"k={k} exceeds the number of tokens N={scores.shape[1]} in {name}")
    if not torch.isfinite(scores).all():
        raise ValueError(f"{name} contains NaN or infinite values; fix the scores before allocating")
    if (scores < 0).any():
        raise ValueError(
            f"{name} must be >= 0, got a minimum of {float(scores.min())} "
            "(use method='ggn' for a non-negative precision, or clamp it)"
        )


def water_fill(weights: Tensor, total: Tensor, cap: float) -> Tensor:
    """Split ``total [B]`` over ``weights [B, K] >= 0`` proportionally, no share above ``cap``.

    Returns real shares ``x [B, K]`` with x_i = min(cap, λ·w_i) and Σ x_i = min(total, K·cap). Rows whose
    uncapped weights are all zero share equally. At most K rounds, each capping at least one more token.
    """
    weights = weights.double()
    total = total.double().clamp(max=cap * weights.shape[1])
    capped = torch.zeros_like(weights, dtype=torch.bool)
    while True:
        free_total = total - (capped.double() * cap).sum(dim=1)
        free_weights = torch.where(capped, 0.0, weights)
        weight_sum = free_weights.sum(dim=1, keepdim=True)
        free_count = (~capped).sum(dim=1, keepdim=True).clamp_min(1)
        equal = torch.where(capped, 0.0, 1.0 / free_count)
        fractions = torch.where(weight_sum > 0, free_weights / weight_sum.clamp_min(1e-300), equal)
        shares = torch.where(capped, cap, fractions * free_total[:, None])
        over = (shares > cap) & ~capped
        if not over.any():
            return shares.clamp(max=cap)
        capped |= over


def largest_remainder_round(shares: Tensor) -> Tensor:
    """Round real ``shares [B, K] >= 0`` to integers with the same row sums (rounded to the nearest integer).

    Each share is floored, then the row's missing units go one each to the largest fractional parts.
    No integer exceeds ceil(share), so integer caps on the shares still hold.
    """
    floors = torch.floor(shares + 1e-9)
    remainders = (shares - floors).clamp_min(0)
    missing = torch.round(shares.sum(dim=1) - floors.sum(dim=1)).long()
    order = remainders.argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(shares.shape[1], device=shares.device).expand_as(order))
    return (floors + (rank < missing[:, None]).double()).long()


class _Allocator:
    """Shared settings and validation; subclasses implement ``_allocate``."""

    def __init__(self, min_tokens: int, max_tokens: int, total_budget: int | None, k: int) -> None:
        self.total_budget = _check_limits(min_tokens, max_tokens, k, total_budget)
        self.min_tokens, self.max_tokens, self.k = min_tokens, max_tokens, k

    def __call__(self, relevance: Tensor, precision: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``relevance [B, N] >= 0``, ``precision [B, N] >= 0`` -> ``(selected_indices [B, K], token_budgets [B, K])``."""
        _check_scores("relevance", relevance, self.k)
        if precision is not None:
            _check_scores("precision", precision, self.k, relevance.shape)
        return self._allocate(relevance.detach().double(), None if precision is None else precision.detach().double())

    def _allocate(self, relevance: Tensor, precision: Tensor | None) -> tuple[Tensor, Tensor]:
        raise NotImplementedError


class PrecisionAwareAllocator(_Allocator):
    """Top-K by relevance^α · precision^(±β), budgets ∝ that score in [min_tokens, max_tokens] (see module doc).

    ``favor="precise"`` spends more where the loss is sharply curved in the token's features (the model is
    confident there); ``favor="uncertain"`` spends more where it is flat. ``eps`` keeps precision^(−β)
    finite for zero-precision tokens. The budgets sum to exactly ``min(total_budget, K · max_tokens)``.
    """

    def __init__(
        self,
        min_tokens: int = 64,
        max_tokens: int = 400,
        total_budget: int | None = None,
        k: int = 200,
        favor: Literal["precise", "uncertain"] = "precise",
        alpha: float = 1.0,
        beta: float = 1.0,
        eps: float = 1e-12,
    ) -> None:
        super().__init__(min_tokens, max_tokens, total_budget, k)
        if favor not in ("precise", "uncertain"):
            raise ValueError(f"favor must be 'precise' or 'uncertain', got {favor!r}")
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        if eps <= 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        self.favor, self.alpha, self.beta, self.eps = favor, alpha, beta, eps

    def log_scores(self, relevance: Tensor, precision: Tensor) -> Tensor:
        """log(relevance^α · (precision + eps)^(±β)) ``[B, N]``, in log space so large β cannot overflow
        (α = 0 with zero relevance gives log 1 = 0, not NaN)."""
        exponent = self.beta if self.favor == "precise" else -self.beta
        return torch.xlogy(torch.tensor(self.alpha, dtype=relevance.dtype), relevance) + exponent * torch.log(precision + self.eps)

    def _allocate(self, relevance: Tensor, precision: Tensor | None) -> tuple[Tensor, Tensor]:
        if precision is None:
            raise ValueError("PrecisionAwareAllocator needs precision [B, N]; see token_precision()")
        scores = self.log_scores(relevance, precision)
        selected = top_k_indices(scores, self.k)
        log_scores = scores.gather(1, selected)
        top = log_scores[:, :1]
        weights = torch.exp(log_scores - torch.where(torch.isfinite(top), top, 0.0))  # in [0, 1]: no overflow
        spare = relevance.new_full((relevance.shape[0],), float(self.total_budget - self.k * self.min_tokens))
        shares = water_fill(weights, spare, float(self.max_tokens - self.min_tokens))
        return selected, self.min_tokens + largest_remainder_round(shares)


class RelevanceAllocator(_Allocator):
    """ARR-COC's plain mode: top-K relevance, tokens = floor(min + (max − min)·relevance), greedy under the budget.

    ``relevance`` must lie in [0, 1]. Token i (in descending relevance) gets min(wanted_i, what is left after
    reserving ``min_tokens`` for each later token), so the cumulative grant is min(cumsum(wanted), budget −
    min · (tokens after i)). ``precision`` is accepted and ignored, for a drop-in comparison.
    """

    def __init__(self, min_tokens: int = 64, max_tokens: int = 400, total_budget: int | None = None, k: int = 200) -> None:
        super().__init__(min_tokens, max_tokens, total_budget, k)

    def _allocate(self, relevance: Tensor, precision: Tensor | None) -> tuple[Tensor, Tensor]:
        if (relevance > 1).any():
            raise ValueError(f"relevance must lie in [0, 1] for the plain mode, got a maximum of {float(relevance.max())}")
        selected = top_k_indices(relevance, self.k)
        values = relevance.gather(1, selected)
        wanted = torch.floor(self.min_tokens + (self.max_tokens - self.min_tokens) * values + 1e-9).long()
        later = torch.arange(self.k - 1, -1, -1, device=relevance.device)
        granted = torch.minimum(wanted.cumsum(dim=1), self.total_budget - self.min_tokens * later)
        budgets = torch.diff(granted, dim=1, prepend=torch.zeros_like(granted[:, :1]))
        return selected, budgets


@dataclass
class PrecisionAwareAllocation:
    """The knowledge file's rule: top-K of relevance − penalty · relu(p̂ − target_precision), equal budgets.

    p̂ is the precision divided by its per-sample maximum (relevance / its maximum when no precision is
    given), so ``target_precision`` is a fraction of the sample's sharpest token, in [0, 1] (1 penalises no
    token); ``penalty`` is a finite number >= 0. Every kept token gets ``clamp(total_budget // k, min_tokens,
    max_tokens)`` tokens.
    """

    target_precision: float = 1.0
    penalty: float = 0.1
    k: int = 200
    min_tokens: int = 64
    max_tokens: int = 400
    total_budget: int | None = None

    def __post_init__(self) -> None:
        self.total_budget = _check_limits(self.min_tokens, self.max_tokens, self.k, self.total_budget)
        if not (math.isfinite(self.target_precision) and 0 <= self.target_precision <= 1):
            raise ValueError(f"target_precision must be a fraction in [0, 1] of the sample's sharpest token "
                             f"(1 penalises no token), got {self.target_precision}")
        if not math.isfinite(self.penalty):
            raise ValueError(f"penalty must be a finite number, got {self.penalty}")
        if self.penalty < 0:
            raise ValueError(f"penalty must be >= 0, got {self.penalty}")

    def __call__(self, relevance: Tensor, precision: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``relevance [B, N]``, optional ``precision [B, N]`` -> ``(selected_indices [B, K], token_budgets [B, K])``."""
        _check_scores("relevance", relevance, self.k)
        source = relevance if precision is None else precision
        if precision is not None:
            _check_scores("precision", precision, self.k, relevance.shape)
        source = source.detach().double()
        relative = source / source.amax(dim=1, keepdim=True).clamp_min(1e-300)
        adjusted = relevance.detach().double() - self.penalty * torch.relu(relative - self.target_precision)
        selected = top_k_indices(adjusted, self.k)
        per_token = min(max(self.total_budget // self.k, self.min_tokens), self.max_tokens)
        return selected, torch.full_like(selected, per_token)


def _relevance_outputs(model: nn.Module, batch: Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    """GGN outputs: relevance ``[B, N]`` and the target relevance (or None; the MSE GGN does not need it)."""
    relevance = model.compute_relevance(batch["token_features"], batch["query_embedding"])
    labels = batch.get("labels")
    return relevance, None if labels is None else labels.reshape(relevance.shape).to(relevance.dtype)


def _relevance_mse(model: nn.Module, batch: Mapping[str, Tensor]) -> Tensor:
    relevance, labels = _relevance_outputs(model, batch)
    if labels is None:
        raise ValueError("method='hutchinson'/'hutchinson_cv' needs target relevance 'labels' in the batch "
                         "(or pass loss_fn); method='ggn' does not")
    return F.mse_loss(relevance, labels)


def token_precision(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    method: Literal["ggn", "hutchinson", "hutchinson_cv"] = "ggn",
    num_probes: int = 16,
    loss_fn: Callable[[nn.Module, Mapping[str, Tensor]], Tensor] | None = None,
    seed: int = 0,
    return_stderr: bool = False,
    sample_offset: int = 0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Per-token precision ``[B, N]``: the curvature diagonal of the relevance loss w.r.t. each token's
    features ``[B, N, C]``, summed over the C channels, from `arrcoc_sam.curvature.hessian_diagonal`.

    The loss is the MSE between ``model.compute_relevance(token_features, query_embedding)`` and the
    batch's ``labels``, averaged over the batch's B·N tokens; the result is multiplied by B, so it is the
    curvature of each sample's own loss (the mean over its N tokens), which does not depend on the batch.
    ``method``:

    * ``"ggn"`` (default): the Gauss-Newton/Fisher diagonal, (2/N)·Σ_c Σ_n' (∂r_n'/∂f_nc)², by sampled
      factors; never negative, needs no labels (the MSE GGN does not depend on the targets); exact in one
      probe when each relevance r_n depends only on its own token's features.
    * ``"hutchinson"``: the Hessian diagonal by Rademacher probes; unbiased, noisy, can be negative.
    * ``"hutchinson_cv"``: the GGN diagonal plus Hutchinson on H − G (a control variate); unbiased for the
      Hessian diagonal, with much lower variance when H ≈ G.

    ``batch``: a dict with ``query_embedding [B, D]``, ``token_features [B, N, C]`` (or ``pixel_values``,
    turned into features by ``model.token_features``) and, except for ``"ggn"``, ``labels [B, N]``.
    ``loss_fn(model, batch) -> scalar`` replaces the MSE for the Hessian methods: it receives the whole batch
    (holding the probed ``token_features``) and must be a mean over samples of per-sample losses, as the MSE
    is (then B times its curvature is each sample's own). With ``return_stderr=True`` returns
    ``(precision, stderr)``, where ``stderr [B, N]`` is Σ_c of the per-channel standard errors: an upper
    bound on the standard error of the channel sum.

    Probes are drawn per sample, from a generator seeded by (``seed``, global sample index), the index of
    row b being ``sample_offset + b`` (a `arrcoc_sam.curvature.probe.BlockSampler`: Rademacher signs on the
    sample's features ``[N, C]`` for Hutchinson, on its relevance ``[N]`` for the GGN factors). The
    model scores samples independently (eval mode), so the curvature is block-diagonal across samples
    and a sample's precision and stderr are the same alone or in a batch of any size, up to rounding (pass
    the running sample count as ``sample_offset`` when estimating a dataset batch by batch).

    Cost: ``num_probes`` batched forward+backward passes over the whole batch (x3 for ``hutchinson_cv``),
    whatever B is, plus B small random draws per probe; ``scripts/bench/token_precision.py`` times it
    against one call per sample.
    """
    if "query_embedding" not in batch:
        raise ValueError(f"batch needs 'query_embedding' [B, D]; got keys {sorted(batch)}")
    features = batch.get("token_features")
    if features is None:
        if batch.get("pixel_values") is None or not hasattr(model, "token_features"):
            raise ValueError("batch needs 'token_features' [B, N, C], or 'pixel_values' and a model with token_features()")
        with torch.no_grad():
            features = model.token_features(pixel_values=batch["pixel_values"], token_features=None)
    leaf = features.detach().clone().requires_grad_(True)
    probed: dict[str, Any] = {"token_features": leaf, "query_embedding": batch["query_embedding"]}
    if batch.get("labels") is not None:
        probed["labels"] = batch["labels"]
    samples = leaf.shape[0]
    sampler = BlockSampler([sample_generator(seed, "token_precision", sample_offset + row, leaf.device)
                            for row in range(samples)])
    estimate = hessian_diagonal(
        model, loss_fn or _relevance_mse, probed, num_probes=num_probes, method=method, params=[leaf],
        output_fn=_relevance_outputs, likelihood="mse", weighting="equal", sampler=sampler,
    )
    precision = estimate.value[0].sum(dim=-1) * samples
    if return_stderr:
        return precision, estimate.stderr[0].sum(dim=-1) * samples
    return precision
