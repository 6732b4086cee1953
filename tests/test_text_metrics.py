"""Token relevance metrics against brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import EvalPrediction

from arrcoc_sam.relevance.text_metrics import TextRelevanceMetrics, average_precision, token_relevance_metrics


def reference_average_precision(scores, targets) -> float:
    """Loop over distinct thresholds, high to low: AP = Σ (R_t - R_prev) P_t."""
    total, previous_recall = 0.0, 0.0
    positives = sum(targets)
    for threshold in sorted(set(scores), reverse=True):
        chosen = [t for s, t in zip(scores, targets) if s >= threshold]
        precision, recall = sum(chosen) / len(chosen), sum(chosen) / positives
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=30))
def test_average_precision_matches_the_threshold_loop_with_ties(pairs):
    scores = [s / 5 for s, _ in pairs]
    targets = [int(t) for _, t in pairs]
    if not any(targets):
        assert average_precision(np.array(scores), np.array(targets)) == 0.0
        return
    assert average_precision(np.array(scores), np.array(targets)) == pytest.approx(
        reference_average_precision(scores, targets)
    )


def test_average_precision_without_ties_is_mean_precision_at_each_positive():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    targets = np.array([1, 0, 1, 0, 1])
    assert average_precision(scores, targets) == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)


def test_f1_precision_recall_count_only_tokens_with_a_target():
    scores = np.array([[0.9, 0.2, 0.7, 0.99], [0.6, 0.1, 0.4, 0.3]])
    labels = np.array([[1, 0, 0, -100], [0, 1, 0, -100]])
    metrics = token_relevance_metrics(scores, labels)
    # predicted positive: (0,0) tp, (0,2) fp, (1,0) fp ((0,3) has no target); positives: (0,0), (1,1)
    assert metrics["precision"] == pytest.approx(1 / 3)  # tp / predicted
    assert metrics["recall"] == pytest.approx(1 / 2)  # tp / positives
    assert metrics["f1"] == pytest.approx(2 / 5)  # harmonic mean 2PR / (P + R), not (P + R) / 2 = 5 / 12


def test_no_predicted_positive_gives_zero_precision_and_f1():
    metrics = token_relevance_metrics(np.array([0.1, 0.2]), np.array([1, 0]))
    assert metrics["precision"] == 0.0 and metrics["f1"] == 0.0 and metrics["recall"] == 0.0


def test_trainer_compute_metrics_reads_logits_and_ignores_padding():
    logits = np.array([[3.0, -3.0, -100.0], [-2.0, 2.0, 1.0]])
    labels = np.array([[1, 0, -100], [0, 1, -100]])
    metrics = TextRelevanceMetrics()(EvalPrediction(predictions=(logits, np.zeros((2, 4))), label_ids=labels))
    assert metrics == {"f1": 1.0, "precision": 1.0, "recall": 1.0, "average_precision": 1.0}


@pytest.mark.parametrize(("threshold", "precision", "recall"), [(0.5, 2 / 3, 1.0), (0.8, 1.0, 1 / 2)])
def test_trainer_compute_metrics_thresholds_the_sigmoid_of_the_logits_not_the_logits(threshold, precision, recall):
    """sigmoid([0.3, -0.3, 1, 2]) = [.574, .426, .731, .881]: at 0.5 tokens 0, 2, 3 are predicted (raw logits: 2, 3),
    at 0.8 token 3 alone (raw logits: 2, 3). Targets: tokens 0 and 3."""
    logits = np.array([[0.3, -0.3, 1.0, 2.0]])
    metrics = TextRelevanceMetrics(threshold)(EvalPrediction(predictions=logits, label_ids=np.array([[1, 0, 0, 1]])))
    assert metrics["precision"] == pytest.approx(precision) and metrics["recall"] == pytest.approx(recall)
    assert metrics["f1"] == pytest.approx(2 * precision * recall / (precision + recall))


def test_metrics_reject_mismatched_shapes_and_bad_threshold():
    with pytest.raises(ValueError, match="same shape"):
        token_relevance_metrics(np.zeros(3), np.zeros(4))
    with pytest.raises(ValueError, match="threshold must be in"):
        TextRelevanceMetrics(threshold=1.0)


def test_a_score_equal_to_the_threshold_is_predicted_positive():
    metrics = token_relevance_metrics(np.array([0.5, 0.2]), np.array([1, 0]), threshold=0.5)
    assert metrics["precision"] == 1.0 and metrics["recall"] == 1.0 and metrics["f1"] == 1.0


def test_a_soft_target_of_exactly_one_half_counts_as_positive():
    metrics = token_relevance_metrics(np.array([0.9, 0.2]), np.array([0.5, 0.0]))
    assert metrics["recall"] == 1.0 and metrics["precision"] == 1.0 and metrics["average_precision"] == 1.0


def test_a_nan_score_makes_every_metric_nan_as_a_diverged_model_should_read():
    """Average precision read 0.583 (NaN sorted last), and F1 counted NaN as a negative prediction."""
    metrics = token_relevance_metrics(np.array([np.nan, 0.9, 0.1, np.nan]), np.array([1, 0, 1, 0]))
    assert all(math.isnan(value) for value in metrics.values()) and len(metrics) == 4
    ignored = token_relevance_metrics(np.array([np.nan, 0.9, 0.1]), np.array([-100, 0, 1]))
    assert not any(math.isnan(value) for value in ignored.values())  # a NaN without a target is not scored
