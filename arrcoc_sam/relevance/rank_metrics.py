"""Rank and set metrics between two relevance maps, batched over any leading dimensions.

Every function takes tensors shaped ``[..., N]`` (N tokens; the leading dimensions are samples, draws, …)
and returns ``[...]`` in float64, with no host synchronisation:

* ``mean_abs_diff``   mean |r − r̃| over tokens (ARR-COC's own robustness measure)
* ``spearman``        Pearson correlation of average ranks (ties get the mean of their ranks), as
                      ``scipy.stats.spearmanr``; NaN when either map is constant
* ``kendall_tau_b``   Kendall's τ-b = (C − D) / sqrt((P − T_x)(P − T_y)), as ``scipy.stats.kendalltau``;
                      O(N log² N) per row (a batched merge sort counts the discordant pairs)
* ``topk_jaccard``    |S ∩ S̃| / |S ∪ S̃| of the two top-K index sets
* ``ndcg_at_k``       tie-aware DCG@K of the ranking by the prediction divided by the ideal DCG@K of the
                      gains; NaN when every gain is 0 or one is negative

A row holding a NaN gives NaN in the rank statistics (``spearman``, ``kendall_tau_b``, ``ndcg_at_k``), as scipy's
default ``nan_policy="propagate"`` does, instead of ranking NaN as the largest value.

Ties. Top-K sets (``top_k_indices``, used by ``topk_jaccard`` here and by top-K recall in
`arrcoc_sam.relevance.vision_metrics`) break ties by token index: among equal scores the lower index ranks
first (a stable descending sort), so the same scores always give the same set, on any device and in any
batch. NDCG does not pick: tied predictions share the mean gain of their tied block (McSherry & Najork,
"Computing information retrieval performance measures efficiently in the presence of tied scores", ECIR
2008), which equals the mean DCG over every order of the ties; DCG@K = Σ_{i<K} ḡ_(i) / log2(i + 2), ḡ_(i)
the mean gain of the block holding rank i.

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
    "top_k_indices",
    "topk_jaccard",
]


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"both relevance maps must have the same shape [..., N], got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim == 0 or a.shape[-1] < 2:
        raise ValueError(f"relevance maps need a token dimension of at least 2, got shape {tuple(a.shape)}")


def mean_abs_diff(a: Tensor, b: Tensor) -> Tensor:
    """Mean absolute difference over the last dimension: ``[..., N] x [..., N] -> [...]``."""
    _check_pair(a, b)
    return (a.double() - b.double()).abs().mean(dim=-1)


def _block_means(sorted_values: Tensor, quantity: Tensor) -> Tensor:
    """Per position of ``sorted_values [..., N]`` (sorted along the last dimension), the mean of ``quantity``
    (float64, same shape) over the block of equal values holding that position."""
    new_block = torch.ones_like(sorted_values, dtype=torch.bool)
    new_block[..., 1:] = sorted_values[..., 1:] != sorted_values[..., :-1]
    block = new_block.long().cumsum(dim=-1) - 1
    total = torch.zeros_like(quantity).scatter_add_(-1, block, quantity)
    count = torch.zeros_like(quantity).scatter_add_(-1, block, torch.ones_like(quantity))
    return (total / count.clamp_min(1)).gather(-1, block)


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks along the last dimension, ties sharing the mean of their ranks (``scipy.stats.rankdata``)."""
    values, order = torch.sort(x.double(), dim=-1, stable=True)
    positions = torch.arange(1, x.shape[-1] + 1, dtype=torch.float64, device=x.device).expand_as(values)
    sorted_ranks = _block_means(values, positions.contiguous())
    return torch.empty_like(sorted_ranks).scatter_(-1, order, sorted_ranks)


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    a = a - a.mean(dim=-1, keepdim=True)
    b = b - b.mean(dim=-1, keepdim=True)
    denom = (a.square().sum(dim=-1) * b.square().sum(dim=-1)).sqrt()
    return torch.where(denom > 0, (a * b).sum(dim=-1) / denom, torch.full_like(denom, math.nan))


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman's ρ along the last dimension: ``[..., N] x [..., N] -> [...]``; NaN if either map is constant."""
    _check_pair(a, b)
    return _nan_where_any_nan(_pearson(average_ranks(a), average_ranks(b)), a, b)


def _nan_where_any_nan(result: Tensor, *maps: Tensor) -> Tensor:
    """``result [...]`` with NaN in the rows where any of ``maps [..., N]`` holds a NaN."""
    holds_nan = torch.stack([m.isnan().any(dim=-1) for m in maps]).any(dim=0)
    return result.masked_fill(holds_nan.to(result.device), math.nan)


def _tie_pairs(sorted_rows: Tensor, same: Tensor) -> Tensor:
    """Σ t(t − 1)/2 over the runs of ``same`` (True where an element equals its predecessor): ``[R]``."""
    group = (~same).long().cumsum(dim=-1) - 1
    counts = torch.zeros_like(sorted_rows, dtype=torch.float64).scatter_add_(-1, group, torch.ones_like(sorted_rows, dtype=torch.float64))
    return (counts * (counts - 1) / 2).sum(dim=-1)


def _strict_inversions(x: Tensor) -> Tensor:
    """Pairs i < j with x_i > x_j per row of ``x [R, N]``: bottom-up merge sort, O(N log² N), batched.

    At each level, every element of a right block counts the elements of its (sorted) left neighbour that
    exceed it, by ``searchsorted``; then each block pair is merged by sorting. Padding with +inf at the end
    adds no inversions.
    """
    rows, n = x.shape
    size = 1 << max(0, (n - 1).bit_length())
    x = torch.cat((x, x.new_full((rows, size - n), math.inf)), dim=-1)
    total = torch.zeros(rows, dtype=torch.float64, device=x.device)
    width = 1
    while width < size:
        blocks = x.view(rows, size // (2 * width), 2, width)
        left, right = blocks[:, :, 0].contiguous(), blocks[:, :, 1].contiguous()
        total += (width - torch.searchsorted(left, right, right=True)).sum(dim=(-2, -1)).double()
        x = blocks.view(rows, size // (2 * width), 2 * width).sort(dim=-1).values.view(rows, size)
        width *= 2
    return total


def kendall_tau_b(a: Tensor, b: Tensor) -> Tensor:
    """Kendall's τ-b along the last dimension: ``[..., N] x [..., N] -> [...]``; NaN if either map is constant.

    Knight's O(N log N)-style algorithm: sort by (a, b); the discordant pairs D are the strict inversions of b
    in that order; with P = N(N − 1)/2 pairs, T_a, T_b the pairs tied in a, in b, and T_ab tied in both,
    C − D = P − T_a − T_b + T_ab − 2D and τ-b = (C − D) / sqrt((P − T_a)(P − T_b)).
    """
    _check_pair(a, b)
    lead, n = a.shape[:-1], a.shape[-1]
    dtype = torch.promote_types(a.dtype, b.dtype)
    dtype = torch.promote_types(dtype, torch.float32) if dtype.is_floating_point else torch.float64  # ints exactly
    a2, b2 = a.to(dtype).reshape(-1, n), b.to(dtype).reshape(-1, n)
    order_b = b2.argsort(dim=-1, stable=True)
    order = order_b.gather(-1, a2.gather(-1, order_b).argsort(dim=-1, stable=True))  # lexicographic (a, b)
    sa, sb = a2.gather(-1, order), b2.gather(-1, order)
    tie_a = torch.zeros_like(sa, dtype=torch.bool)
    tie_a[:, 1:] = sa[:, 1:] == sa[:, :-1]
    tie_ab = torch.zeros_like(tie_a)
    tie_ab[:, 1:] = tie_a[:, 1:] & (sb[:, 1:] == sb[:, :-1])
    sorted_b = b2.sort(dim=-1).values
    tie_b = torch.zeros_like(tie_a)
    tie_b[:, 1:] = sorted_b[:, 1:] == sorted_b[:, :-1]
    pairs = n * (n - 1) / 2
    t_a, t_b, t_ab = _tie_pairs(sa, tie_a), _tie_pairs(sorted_b, tie_b), _tie_pairs(sa, tie_ab)
    numerator = pairs - t_a - t_b + t_ab - 2 * _strict_inversions(sb)
    denominator = ((pairs - t_a) * (pairs - t_b)).sqrt()
    return _nan_where_any_nan(torch.where(denominator > 0, numerator / denominator, math.nan).reshape(lead), a, b)


def _check_k(x: Tensor, k: int) -> None:
    if not 1 <= k <= x.shape[-1]:
        raise ValueError(f"k must be in [1, N={x.shape[-1]}], got {k}")


def top_k_indices(x: Tensor, k: int) -> Tensor:
    """Indices ``[..., k]`` of the ``k`` largest values along the last dimension, largest first; equal values
    in ascending index order (the module's tie policy: a stable descending sort). NaN sorts as the largest."""
    _check_k(x, k)
    return torch.sort(x, dim=-1, descending=True, stable=True).indices[..., :k]


def _topk_mask(x: Tensor, k: int) -> Tensor:
    return torch.zeros_like(x, dtype=torch.bool).scatter_(-1, top_k_indices(x, k), True)


def topk_jaccard(a: Tensor, b: Tensor, k: int) -> Tensor:
    """Jaccard index of the top-``k`` token sets along the last dimension: ``[..., N] x [..., N] -> [...]``.

    Ties at the K-th place go to the lower token index (`top_k_indices`).
    """
    _check_pair(a, b)
    _check_k(a, k)
    ma, mb = _topk_mask(a, k), _topk_mask(b, k)
    inter = (ma & mb).sum(dim=-1).double()
    return inter / (2 * k - inter)


def ndcg_at_k(prediction: Tensor, gains: Tensor, k: int) -> Tensor:
    """NDCG@k of the ranking by ``prediction`` with graded ``gains >= 0`` (e.g. target relevance): ``[...]``;
    NaN in a row whose gains are all 0 or hold a negative value (or that holds a NaN).

    Tie-aware: each rank i < k of a block of tied predictions is credited with the block's mean gain, so the
    value is the mean NDCG@k over all orders of the ties (McSherry & Najork 2008), whatever the token order.
    """
    _check_pair(prediction, gains)
    _check_k(prediction, k)
    gains = gains.double()
    discount = 1.0 / torch.log2(torch.arange(2, k + 2, dtype=torch.float64, device=gains.device))
    values, order = torch.sort(prediction, dim=-1, descending=True, stable=True)
    ranked = _block_means(values, gains.gather(-1, order))[..., :k]
    ideal = gains.topk(k, dim=-1).values
    dcg, idcg = (ranked * discount).sum(dim=-1), (ideal * discount).sum(dim=-1)
    valid = (idcg > 0) & ~(gains < 0).any(dim=-1)
    return _nan_where_any_nan(torch.where(valid, dcg / idcg, torch.full_like(idcg, math.nan)), prediction, gains)


def bootstrap_ci(
    values: Tensor, confidence: float = 0.95, num_resamples: int = 2000, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Percentile bootstrap interval of the mean over the last dimension of ``values [..., S]``.

    All rows share the same ``num_resamples`` resamples of the S sample indices; NaN entries are left out of
    each resample's mean (a row of only NaNs gives NaN). Returns ``(low [...], high [...])`` in float64.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if values.ndim == 0 or values.shape[-1] == 0:
        raise ValueError(f"values must be [..., S] with S >= 1, got shape {tuple(values.shape)}")
    values = values.double().cpu()
    size = values.shape[-1]
    generator = torch.Generator().manual_seed(seed)
    index = torch.randint(size, (num_resamples, size), generator=generator)
    # counts[r, s] = how often resample r drew sample s; a resample's NaN-skipping mean is then a ratio of two
    # matmuls: memory O(rows x resamples + resamples x S) instead of O(rows x resamples x S).
    counts = torch.zeros(num_resamples, size, dtype=torch.float64).scatter_add_(
        1, index, torch.ones(num_resamples, size, dtype=torch.float64)
    )
    present = ~values.isnan()
    finite = values.isfinite()
    means = (values.where(finite, 0.0) @ counts.T) / (present.double() @ counts.T)  # 0/0: NaN, no value drawn
    if not bool(finite.eq(present).all()):  # ±inf entries: a resample that drew one has an infinite mean
        for sign in (1.0, -1.0):
            drawn = (values == sign * math.inf).double() @ counts.T > 0
            means = means.masked_fill(drawn, sign * math.inf)
        both = ((values == math.inf).double() @ counts.T > 0) & ((values == -math.inf).double() @ counts.T > 0)
        means = means.masked_fill(both, math.nan)
    tail = (1.0 - confidence) / 2
    bounds = torch.nanquantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64), dim=-1)
    return bounds[0], bounds[1]
