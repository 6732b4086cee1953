"""Relevance-map metrics against independent references (scipy, hand-computed values)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from transformers import EvalPrediction

from arrcoc_sam.relevance.vision_metrics import (
    make_compute_metrics,
    ndcg_at_k,
    relevance_metrics,
    relevance_mse,
    spearman_per_sample,
    top_k_recall,
)


def test_spearman_is_the_mean_of_scipy_spearmanr_per_sample_with_ties():
    rng = np.random.default_rng(0)
    pred = rng.random((4, 50))
    target = np.round(rng.random((4, 50)) * 3) / 3  # heavy ties, as in soft masks
    expected = np.mean([spearmanr(pred[i], target[i]).statistic for i in range(4)])
    assert spearman_per_sample(pred, target) == pytest.approx(expected, rel=1e-10)


def test_spearman_skips_samples_with_constant_targets():
    pred = np.array([[0.1, 0.2, 0.3], [0.3, 0.2, 0.1]])
    target = np.array([[0.0, 0.0, 1.0], [0.5, 0.5, 0.5]])
    assert spearman_per_sample(pred, target) == pytest.approx(spearmanr(pred[0], target[0]).statistic)


def test_top_k_recall_counts_mask_tokens_among_the_k_best_and_skips_empty_masks():
    pred = torch.tensor([[0.9, 0.8, 0.1, 0.7, 0.0], [0.5, 0.4, 0.3, 0.2, 0.1], [0.1, 0.2, 0.3, 0.4, 0.5]])
    target = torch.tensor([[1.0, 0.0, 1.0, 0.6, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [0.0] * 5])
    # sample 0: mask {0, 2, 3}, top-2 {0, 1} -> 1/3; sample 1: mask {4}, top-2 {0, 1} -> 0; sample 2 skipped
    assert top_k_recall(pred, target, k=2) == pytest.approx((1 / 3 + 0) / 2)


def test_ndcg_matches_a_hand_computed_value():
    pred = np.array([[0.9, 0.1, 0.5, 0.3]])
    target = np.array([[0.0, 1.0, 0.5, 1.0]])
    dcg = 0.0 / math.log2(2) + 0.5 / math.log2(3) + 1.0 / math.log2(4)
    ideal = 1.0 / math.log2(2) + 1.0 / math.log2(3) + 0.5 / math.log2(4)
    assert ndcg_at_k(pred, target, k=3) == pytest.approx(dcg / ideal)


def test_a_perfect_prediction_scores_best_on_every_metric():
    rng = np.random.default_rng(1)
    target = (rng.random((3, 64)) > 0.8).astype(float) * rng.random((3, 64))
    metrics = relevance_metrics(target, target, k=64)
    assert metrics["mse"] == 0 and metrics["top_k_recall"] == 1 and metrics["ndcg"] == pytest.approx(1)
    assert metrics["spearman"] == pytest.approx(1)
    assert relevance_mse(target, np.zeros_like(target)) == pytest.approx(np.mean(target**2))


def test_compute_metrics_reads_the_first_prediction_of_a_tuple_and_flattens_grid_labels():
    rng = np.random.default_rng(2)
    pred, target = rng.random((2, 16)), (rng.random((2, 4, 4)) > 0.7).astype(np.float32)
    got = make_compute_metrics(k=4)(EvalPrediction(predictions=(pred, rng.random((2, 3))), label_ids=target))
    assert got == relevance_metrics(pred, target.reshape(2, 16), k=4)


def test_mismatched_shapes_fail_clearly():
    with pytest.raises(ValueError, match="same shape"):
        relevance_mse(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        relevance_mse(np.zeros(3), np.zeros(3))


def test_top_k_recall_mask_includes_targets_equal_to_the_threshold():
    pred = np.array([[0.9, 0.1, 0.5, 0.3]])
    target = np.array([[0.5, 0.0, 0.2, 0.0]])  # target >= 0.5: token 0 is in the mask
    assert top_k_recall(pred, target, k=1, threshold=0.5) == 1.0


def test_ndcg_and_top_k_recall_clamp_k_to_the_number_of_tokens():
    pred = np.array([[0.9, 0.1, 0.5, 0.3]])
    target = np.array([[0.0, 1.0, 0.5, 1.0]])
    dcg = 0.0 / math.log2(2) + 0.5 / math.log2(3) + 1.0 / math.log2(4) + 1.0 / math.log2(5)
    ideal = 1.0 / math.log2(2) + 1.0 / math.log2(3) + 0.5 / math.log2(4) + 0.0 / math.log2(5)
    assert ndcg_at_k(pred, target, k=200) == pytest.approx(dcg / ideal)
    assert top_k_recall(pred, target, k=200) == 1.0


def test_a_nan_prediction_makes_every_metric_nan_instead_of_dropping_its_sample():
    """A NaN row gave NaN Spearman/NDCG for that sample, which the per-sample mean then left out: a partly diverged
    model read 0.21 Spearman and 0.68 NDCG."""
    generator = torch.Generator().manual_seed(0)
    predictions, targets = torch.rand(3, 16, generator=generator), (torch.rand(3, 16, generator=generator) > 0.6).double()
    predictions[1, 4] = math.nan
    metrics = relevance_metrics(predictions, targets, k=4)
    assert all(math.isnan(value) for value in metrics.values()), metrics
    healthy = relevance_metrics(predictions[[0, 2]], targets[[0, 2]], k=4)
    assert not any(math.isnan(value) for value in healthy.values())
