"""Evaluation metrics for relevance maps: MSE, per-sample Spearman, top-K recall of the target mask, NDCG@K.

All take predictions and targets shaped [B, N] (numpy or torch) and average per sample; `make_compute_metrics`
wraps them as a `Trainer` `compute_metrics` callable.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy.stats import rankdata

ArrayLike = np.ndarray | torch.Tensor


def _as_2d(name: str, values: ArrayLike) -> np.ndarray:
    array = values.detach().cpu().double().numpy() if isinstance(values, torch.Tensor) else np.asarray(values, float)
    if array.ndim != 2:
        raise ValueError(f"{name} must be [B, N], got shape {array.shape}")
    return array


def _pair(predictions: ArrayLike, targets: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _as_2d("predictions", predictions), _as_2d("targets", targets)
    if pred.shape != target.shape:
        raise ValueError(f"predictions {pred.shape} and targets {target.shape} must have the same shape")
    return pred, target


def relevance_mse(predictions: ArrayLike, targets: ArrayLike) -> float:
    """Mean squared error over all B*N values."""
    pred, target = _pair(predictions, targets)
    return float(np.mean((pred - target) ** 2))


def spearman_per_sample(predictions: ArrayLike, targets: ArrayLike) -> float:
    """Spearman rank correlation (average ranks for ties) of each sample, averaged over samples whose
    predictions and targets both vary (NaN when none does)."""
    pred, target = _pair(predictions, targets)
    rank_p = rankdata(pred, axis=1)
    rank_t = rankdata(target, axis=1)
    rank_p -= rank_p.mean(axis=1, keepdims=True)
    rank_t -= rank_t.mean(axis=1, keepdims=True)
    denominator = np.sqrt((rank_p**2).sum(axis=1) * (rank_t**2).sum(axis=1))
    valid = denominator > 0
    if not valid.any():
        return float("nan")
    return float(np.mean((rank_p * rank_t).sum(axis=1)[valid] / denominator[valid]))


def _top_k(pred: np.ndarray, k: int) -> np.ndarray:
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    k = min(k, pred.shape[1])
    return np.argsort(-pred, axis=1, kind="stable")[:, :k]


def top_k_recall(predictions: ArrayLike, targets: ArrayLike, k: int = 200, threshold: float = 0.5) -> float:
    """Fraction of target-mask tokens (target >= threshold) among the K highest predictions, averaged over
    samples with a non-empty mask (NaN when every mask is empty)."""
    pred, target = _pair(predictions, targets)
    mask = target >= threshold
    hits = np.take_along_axis(mask, _top_k(pred, k), axis=1).sum(axis=1)
    sizes = mask.sum(axis=1)
    valid = sizes > 0
    return float(np.mean(hits[valid] / sizes[valid])) if valid.any() else float("nan")


def ndcg_at_k(predictions: ArrayLike, targets: ArrayLike, k: int = 200) -> float:
    """NDCG@K with the targets as gains: sum_r t_(r) / log2(r + 1) over the predicted top K (r = 1..K),
    divided by the same sum for the ideal order; averaged over samples with a positive ideal DCG."""
    pred, target = _pair(predictions, targets)
    order = _top_k(pred, k)
    discounts = 1.0 / np.log2(np.arange(2, order.shape[1] + 2))
    dcg = (np.take_along_axis(target, order, axis=1) * discounts).sum(axis=1)
    ideal = (np.take_along_axis(target, _top_k(target, k), axis=1) * discounts).sum(axis=1)
    valid = ideal > 0
    return float(np.mean(dcg[valid] / ideal[valid])) if valid.any() else float("nan")


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
