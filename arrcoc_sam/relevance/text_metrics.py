"""Token relevance metrics: F1, precision, recall (at a threshold) and average precision (threshold-free).

Usable directly as a Trainer ``compute_metrics`` (:class:`TextRelevanceMetrics`).
"""

from __future__ import annotations

import numpy as np
import torch

from arrcoc_sam.relevance.collators import IGNORE_INDEX


def average_precision(scores: np.ndarray, targets: np.ndarray) -> float:
    """Average precision ``Σ_k (R_k - R_{k-1}) P_k`` over the distinct score thresholds, descending.

    ``scores``: ``[M]`` real; ``targets``: ``[M]`` in {0, 1}. Tied scores form one threshold (as in
    scikit-learn's ``average_precision_score``). Returns 0.0 when there is no positive, NaN when a score is NaN
    (a diverged model has no ranking).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    targets = np.asarray(targets, dtype=np.float64).ravel()
    if np.isnan(scores).any():
        return float("nan")
    positives = targets.sum()
    if positives == 0:
        return 0.0
    order = np.argsort(-scores, kind="stable")
    scores, targets = scores[order], targets[order]
    true_pos = np.cumsum(targets)
    # The last index of each group of equal scores is where that threshold's counts are complete.
    threshold_end = np.r_[np.flatnonzero(np.diff(scores) != 0), scores.size - 1]
    tp = true_pos[threshold_end]
    precision = tp / (threshold_end + 1)
    recall = tp / positives
    return float(np.sum(np.diff(recall, prepend=0.0) * precision))


def token_relevance_metrics(scores, labels, threshold: float = 0.5) -> dict[str, float]:
    """F1, precision and recall of ``scores >= threshold`` and average precision, over tokens with a target.

    ``scores``: relevance in [0, 1], any shape; ``labels``: same shape, targets in [0, 1] (binarised at
    0.5) and -100 for "no target". Micro-averaged over all tokens; 0.0 where a ratio has a zero denominator.
    Every metric is NaN when a scored token's relevance is NaN (a diverged model), as the vision metrics are.
    """
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels, dtype=np.float64)
    if scores.shape != labels.shape:
        raise ValueError(f"scores and labels must have the same shape, got {scores.shape} and {labels.shape}")
    valid = labels != IGNORE_INDEX
    scores, targets = scores[valid], (labels[valid] >= 0.5).astype(np.float64)
    if np.isnan(scores).any():
        return dict.fromkeys(("f1", "precision", "recall", "average_precision"), float("nan"))
    predicted = scores >= threshold
    tp = float(np.sum(predicted * targets))
    precision = tp / float(predicted.sum()) if predicted.any() else 0.0
    recall = tp / float(targets.sum()) if targets.any() else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {
        "f1": f1,
        "precision": precision,
        "recall": recall,
        "average_precision": average_precision(scores, targets),
    }


class TextRelevanceMetrics:
    """Trainer ``compute_metrics`` for :class:`~arrcoc_sam.relevance.text.TextRelevanceModel`.

    Takes an ``EvalPrediction`` whose predictions are the per-token logits ``[n, L]`` (or a tuple whose
    first item they are, as the model's output order makes them) and label_ids ``[n, L]`` with -100.
    Pass :meth:`preprocess_logits_for_metrics` to the Trainer so only the logits are gathered.
    """

    def __init__(self, threshold: float = 0.5):
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.threshold = threshold

    @staticmethod
    def preprocess_logits_for_metrics(logits, labels) -> torch.Tensor:
        """Keep the per-token logits ``[B, L]`` from the model's output tuple."""
        return logits[0] if isinstance(logits, (tuple, list)) else logits

    def __call__(self, eval_pred) -> dict[str, float]:
        logits = eval_pred.predictions
        logits = logits[0] if isinstance(logits, (tuple, list)) else logits
        labels = eval_pred.label_ids
        scores = 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
        return token_relevance_metrics(scores, labels, self.threshold)
