"""Rank and set metrics against scipy.stats and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats

from arrcoc_sam.relevance import rank_metrics

HAND_CASES = [
    ([1.0, 2.0, 3.0, 4.0, 5.0], [5.0, 6.0, 7.0, 8.0, 7.0]),
    ([0.1, 0.4, 0.4, 0.9, 0.2, 0.2], [0.3, 0.1, 0.5, 0.5, 0.9, 0.0]),
    ([3.0, 1.0, 2.0, 2.0, 2.0, 5.0, 4.0], [1.0, 1.0, 2.0, 3.0, 3.0, 0.5, 4.0]),
    ([0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0]),
]


@pytest.mark.parametrize(("a", "b"), HAND_CASES)
def test_spearman_and_kendall_match_scipy_with_ties(a, b):
    ta, tb = torch.tensor(a), torch.tensor(b)
    assert rank_metrics.spearman(ta, tb).item() == pytest.approx(stats.spearmanr(a, b).statistic, abs=1e-12)
    assert rank_metrics.kendall_tau_b(ta, tb).item() == pytest.approx(stats.kendalltau(a, b).statistic, abs=1e-12)
    assert torch.equal(rank_metrics.average_ranks(ta), torch.tensor(stats.rankdata(a), dtype=torch.float64))


def test_batched_metrics_match_scipy_row_by_row():
    generator = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 64, generator=generator).round(decimals=1)  # many ties
    b = a + 0.2 * torch.rand(2, 3, 64, generator=generator)
    spearman, kendall = rank_metrics.spearman(a, b), rank_metrics.kendall_tau_b(a, b)
    assert spearman.shape == kendall.shape == (2, 3)
    for i in range(2):
        for j in range(3):
            assert spearman[i, j].item() == pytest.approx(stats.spearmanr(a[i, j], b[i, j]).statistic, abs=1e-12)
            assert kendall[i, j].item() == pytest.approx(stats.kendalltau(a[i, j], b[i, j]).statistic, abs=1e-12)


@pytest.mark.parametrize("tokens", [2, 3, 17, 300, 1024])
def test_kendall_merge_sort_matches_scipy_under_heavy_ties(tokens):
    generator = torch.Generator().manual_seed(tokens)
    a = torch.randint(0, 5, (4, tokens), generator=generator).float()
    b = torch.randint(0, 4, (4, tokens), generator=generator).float()
    ours = rank_metrics.kendall_tau_b(a, b)
    for i in range(4):
        reference = stats.kendalltau(a[i], b[i]).statistic
        if math.isnan(reference):
            assert math.isnan(ours[i].item())
        else:
            assert ours[i].item() == pytest.approx(reference, abs=1e-12)


def test_constant_map_gives_nan_correlation_like_scipy():
    a, b = torch.ones(5), torch.arange(5.0)
    assert math.isnan(rank_metrics.spearman(a, b).item())
    assert math.isnan(rank_metrics.kendall_tau_b(a, b).item())


def test_mean_abs_diff_and_topk_jaccard_hand_cases():
    a = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.5])
    b = torch.tensor([0.9, 0.1, 0.8, 0.2, 0.6])
    assert rank_metrics.mean_abs_diff(a, b).item() == pytest.approx((0.7 + 0.7 + 0.1) / 5)
    # top-3 of a = {0, 1, 4}, of b = {0, 2, 4}: intersection 2, union 4
    assert rank_metrics.topk_jaccard(a, b, 3).item() == pytest.approx(0.5)
    assert rank_metrics.topk_jaccard(a, a, 3).item() == 1.0


def test_ndcg_matches_the_formula_by_hand():
    prediction = torch.tensor([0.1, 0.9, 0.5, 0.3])
    gains = torch.tensor([1.0, 0.0, 0.5, 0.25])
    # ranking by prediction: tokens 1, 2, 3 -> gains 0, 0.5, 0.25; ideal gains 1, 0.5, 0.25
    dcg = 0.0 / math.log2(2) + 0.5 / math.log2(3) + 0.25 / math.log2(4)
    idcg = 1.0 / math.log2(2) + 0.5 / math.log2(3) + 0.25 / math.log2(4)
    assert rank_metrics.ndcg_at_k(prediction, gains, 3).item() == pytest.approx(dcg / idcg, abs=1e-12)
    assert rank_metrics.ndcg_at_k(gains, gains, 3).item() == pytest.approx(1.0)
    assert math.isnan(rank_metrics.ndcg_at_k(prediction, torch.zeros(4), 2).item())


def test_bootstrap_ci_agrees_with_scipy_percentile_bootstrap():
    values = torch.from_numpy(np.random.default_rng(0).normal(1.0, 0.5, size=80))
    low, high = rank_metrics.bootstrap_ci(values, confidence=0.9, num_resamples=4000)
    reference = stats.bootstrap((values.numpy(),), np.mean, confidence_level=0.9, method="percentile",
                                n_resamples=4000, random_state=1).confidence_interval
    width = reference.high - reference.low
    assert float(low) == pytest.approx(reference.low, abs=0.05 * width)
    assert float(high) == pytest.approx(reference.high, abs=0.05 * width)


def test_invalid_arguments_are_refused_with_the_value():
    a = torch.rand(3, 10)
    with pytest.raises(ValueError, match="same shape"):
        rank_metrics.spearman(a, torch.rand(3, 9))
    with pytest.raises(ValueError, match="k must be in"):
        rank_metrics.topk_jaccard(a, a, 11)
    with pytest.raises(ValueError, match="confidence"):
        rank_metrics.bootstrap_ci(a[0], confidence=1.5)


def test_bootstrap_rows_share_resamples_and_skip_nans():
    values = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, math.nan, 3.0, math.nan], [math.nan] * 4])
    low, high = rank_metrics.bootstrap_ci(values, num_resamples=500)
    assert 1.0 <= low[0] <= 2.5 <= high[0] <= 4.0
    assert 1.0 <= low[1] <= high[1] <= 3.0
    assert math.isnan(low[2]) and math.isnan(high[2])
