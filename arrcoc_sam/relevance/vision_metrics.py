"""Evaluation metrics for relevance maps: MSE, per-sample Spearman, top-K recall of the target mask, NDCG@K.

All take predictions and targets shaped [B, N] (numpy or torch) and average per sample (leaving out samples
whose statistic is undefined: a constant map, an empty mask); a NaN prediction anywhere makes every metric NaN
(a diverged model, not a sample to leave out). `make_compute_metrics` wraps them as a `Trainer`
`compute_metrics` callable. The rank statistics come from
`arrcoc_sam.relevance.rank_metrics`.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from arrcoc_sam.relevance import rank_metrics

ArrayLike = np.ndarray | torch.Tensor


def _as_2d(name: str, values: ArrayLike) -> torch.Tensor:
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    if tensor.dim() != 2:
        raise ValueError(f"{name} must be [B, N], got shape {tuple(tensor.shape)}")
    return tensor.detach().cpu().double()


def _pair(predictions: ArrayLike, targets: ArrayLike) -> tuple[torch.Tensor, torch.Tensor]:
    pred, target = _as_2d("predictions", predictions), _as_2d("targets", targets)
    if pred.shape != target.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(target.shape)} must have the same shape")
    return pred, target


def _per_sample_mean(values: torch.Tensor, predictions: torch.Tensor) -> float:
    """The mean of per-sample ``values`` over the samples where they are defined; NaN if a prediction is NaN."""
    return float("nan") if bool(predictions.isnan().any()) else _nanmean(values)


def _nanmean(values: torch.Tensor) -> float:
    return float(values.nanmean()) if (~values.isnan()).any() else float("nan")


def relevance_mse(predictions: ArrayLike, targets: ArrayLike) -> float:
    """Mean squared error over all B*N values."""
    pred, target = _pair(predictions, targets)
    return float(((pred - target) ** 2).mean())


def spearman_per_sample(predictions: ArrayLike, targets: ArrayLike) -> float:
    """Spearman rank correlation (average ranks for ties) of each sample, averaged over samples whose
    predictions and targets both vary (NaN when none does)."""
    pred, target = _pair(predictions, targets)
    return _per_sample_mean(rank_metrics.spearman(pred, target), pred)


def top_k_recall(predictions: ArrayLike, targets: ArrayLike, k: int = 200, threshold: float = 0.5) -> float:
    """Fraction of target-mask tokens (target >= threshold) among the K highest predictions, averaged over
    samples with a non-empty mask (NaN when every mask is empty). K is clamped to N; tied predictions at the
    K-th place go to the lower token index (`rank_metrics.top_k_indices`)."""
    pred, target = _pair(predictions, targets)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    mask = target >= threshold
    top = rank_metrics.top_k_indices(pred, min(k, pred.shape[1]))
    hits = mask.gather(1, top).sum(dim=1).double()
    sizes = mask.sum(dim=1).double()
    return _per_sample_mean(torch.where(sizes > 0, hits / sizes.clamp_min(1), torch.full_like(sizes, float("nan"))), pred)


def ndcg_at_k(predictions: ArrayLike, targets: ArrayLike, k: int = 200) -> float:
    """Tie-aware NDCG@K (`rank_metrics.ndcg_at_k`) with the targets as gains, averaged over samples with a
    positive ideal DCG. K is clamped to N."""
    pred, target = _pair(predictions, targets)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return _per_sample_mean(rank_metrics.ndcg_at_k(pred, target, min(k, pred.shape[1])), pred)


def relevance_metrics(predictions: ArrayLike, targets: ArrayLike, k: int = 200, threshold: float = 0.5) -> dict:
    """{"mse", "spearman", "top_k_recall", "ndcg"} for [B, N] predictions and targets."""
    return {
        "mse": relevance_mse(predictions, targets),
        "spearman": spearman_per_sample(predictions, targets),
        "top_k_recall": top_k_recall(predictions, targets, k, threshold),
        "ndcg": ndcg_at_k(predictions, targets, k),
    }


def make_compute_metrics(k: int = 200, threshold: float = 0.5) -> Callable:
    """A `Trainer(compute_metrics=...)` callable: EvalPrediction -> `relevance_metrics` (the relevance is
    the predictions, or their first element when the model returns several outputs)."""

    def compute_metrics(eval_prediction) -> dict:
        predictions = eval_prediction.predictions
        if isinstance(predictions, (tuple, list)):
            predictions = predictions[0]
        targets = np.asarray(eval_prediction.label_ids)
        return relevance_metrics(predictions, targets.reshape(targets.shape[0], -1), k, threshold)

    return compute_metrics
