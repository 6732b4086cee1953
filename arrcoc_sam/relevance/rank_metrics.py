"""Rank and set metrics between two relevance maps, batched over any leading dimensions.

Every function takes tensors shaped ``[..., N]`` (N tokens; the leading dimensions are samples, draws, …)
and returns ``[...]`` in float64, with no host synchronisation:

* ``mean_abs_diff``   mean |r − r̃| over tokens (ARR-COC's own robustness measure)
* ``spearman``        Pearson correlation of average ranks (ties get the mean of their ranks), as
                      ``scipy.stats.spearmanr``; NaN when either map is constant
* ``kendall_tau_b``   Kendall's τ-b = (C − D) / sqrt((P − T_x)(P − T_y)), as ``scipy.stats.kendalltau``;
                      O(N²) pairwise signs, computed in row chunks so memory stays ≈ 2²² elements
* ``topk_jaccard``    |S ∩ S̃| / |S ∪ S̃| of the two top-K index sets
* ``ndcg_at_k``       Σ_{i<K} g_(i) / log2(i + 2) over the tokens ranked by the prediction, divided by the
                      same sum over the ideal ranking of the gains; NaN when every gain is 0

``bootstrap_ci`` gives the percentile bootstrap interval of a mean over samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "average_ranks",
    "bootstrap_ci",
    "kendall_tau_b",
    "mean_abs_diff",
    "ndcg_at_k",
    "spearman",
    "topk_jaccard",
]

_PAIRWISE_ELEMENTS = 1 << 22


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"both relevance maps must have the same shape [..., N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 0 or a.shape[-1] < 2:
        raise ValueError(f"relevance maps need a token dimension of at least 2, got shape {tuple(a.shape)}")


def mean_abs_diff(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference over the last dimension: ``[..., N] x [..., N] -> [...]``."""
    _check_pair(a, b)
    return (a.double() - b.double()).abs().mean(dim=-1)


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dimension, ties sharing the mean of their ranks (``scipy.stats.rankdata``)."""
    values, order = torch.sort(x.double(), dim=-1, stable=True)
    n = x.shape[-1]
    new_group = torch.ones_like(values, dtype=torch.bool)
    new_group[..., 1:] = values[..., 1:] != values[..., :-1]
    group = new_group.long().cumsum(dim=-1) - 1
    positions = torch.arange(1, n + 1, dtype=torch.float64, device=x.device).expand_as(values)
    rank_sum = torch.zeros_like(values).scatter_add_(-1, group, positions)
    count = torch.zeros_like(values).scatter_add_(-1, group, torch.ones_like(values))
    sorted_ranks = (rank_sum / count.clamp_min(1)).gather(-1, group)
    return torch.empty_like(sorted_ranks).scatter_(-1, order, sorted_ranks)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    denom = (a.square().sum(dim=-1) * b.square().sum(dim=-1)).sqrt()
    return torch.where(denom > 0, (a * b).sum(dim=-1) / denom, torch.full_like(denom, math.nan))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's ρ along the last dimension: ``[..., N] x [..., N] -> [...]``; NaN if either map is constant."""
    _check_pair(a, b)
    return _pearson(average_ranks(a), average_ranks(b))


def kendall_tau_b(a: Tensor, b: Tensor) -> Tensor:
    """Kendall's τ-b along the last dimension: ``[..., N] x [..., N] -> [...]``; NaN if either map is constant."""
    _check_pair(a, b)
    lead, n = a.shape[:-1], a.shape[-1]
    # Sign differences are exact in the input precision, and sums of up to N² values in {-1, 0, 1} stay
    # exact in float32 for N <= 4096.
    dtype = torch.promote_types(a.dtype, torch.float32)
    a2, b2 = a.to(dtype).reshape(-1, n), b.to(dtype).reshape(-1, n)
    rows = max(1, _PAIRWISE_ELEMENTS // (n * n))
    out = []
    for start in range(0, a2.shape[0], rows):
        sa = torch.sign(a2[start:start + rows, :, None] - a2[start:start + rows, None, :])
        sb = torch.sign(b2[start:start + rows, :, None] - b2[start:start + rows, None, :])
        concordance = (sa * sb).sum(dim=(-2, -1)).double()
        untied = (sa.abs().sum(dim=(-2, -1)).double() * sb.abs().sum(dim=(-2, -1)).double()).sqrt()
        out.append(torch.where(untied > 0, concordance / untied, math.nan))
    return torch.cat(out).reshape(lead)


def _topk_mask(x: Tensor, k: int) -> Tensor:
    index = x.topk(k, dim=-1, sorted=False).indices
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, index, True)


def topk_jaccard(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Jaccard index of the top-``k`` token sets along the last dimension: ``[..., N] x [..., N] -> [...]``."""
    _check_pair(a, b)
    if not 1 <= k <= a.shape[-1]:
        raise ValueError(f"k must be in [1, N={a.shape[-1]}], got {k}")
    ma, mb = _topk_mask(a, k), _topk_mask(b, k)
    inter = (ma & mb).sum(dim=-1).double()
    return inter / (2 * k - inter)


def ndcg_at_k(prediction: Tensor, gains: Tensor, k: int) -> Tensor:
    """NDCG@k of the ranking by ``prediction`` with graded ``gains >= 0`` (e.g. target relevance): ``[...]``."""
    _check_pair(prediction, gains)
    if not 1 <= k <= prediction.shape[-1]:
        raise ValueError(f"k must be in [1, N={prediction.shape[-1]}], got {k}")
    gains = gains.double()
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=gains.device))
    ranked = gains.gather(-1, prediction.topk(k, dim=-1).indices)
    ideal = gains.topk(k, dim=-1).values
    dcg, idcg = (ranked * discount).sum(dim=-1), (ideal * discount).sum(dim=-1)
    return torch.where(idcg > 0, dcg / idcg, torch.full_like(idcg, math.nan))


def bootstrap_ci(
    values: Tensor, confidence: float = 0.95, num_resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values [S]`` (NaNs dropped); ``(nan, nan)`` if none left."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    values = values.double().flatten()
    values = values[~values.isnan()]
    if values.numel() == 0:
        return math.nan, math.nan
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(values.numel(), (num_resamples, values.numel()), generator=generator)
    means = values.cpu()[index].mean(dim=-1)
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return float(low), float(high)
