"""Rank and set metrics against scipy.stats and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch.profiler import ProfilerActivity, profile

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


def test_a_row_holding_nan_gives_nan_like_scipy_and_the_other_rows_are_untouched():
    """spearman ranked NaN as the largest value (-0.8 where scipy gives NaN)."""
    a = torch.tensor([[1.0, math.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]])
    b = torch.tensor([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, 4.0, 3.0]])
    for metric in (rank_metrics.spearman, rank_metrics.kendall_tau_b):
        for x, y in ((a, b), (b, a)):
            values = metric(x, y)
            assert math.isnan(values[0].item()) and values[1].item() == pytest.approx(metric(x[1], y[1]).item())
    for x, y in ((a, b), (b, a)):
        assert math.isnan(rank_metrics.ndcg_at_k(x, y, 2)[0].item())


def test_ndcg_of_negative_gains_is_nan():
    """It returned -1.09: the gains must be >= 0."""
    prediction, gains = torch.tensor([[0.1, 0.9, 0.5], [0.1, 0.9, 0.5]]), torch.tensor([[1.0, -2.0, 0.5], [1.0, 0.0, 0.5]])
    values = rank_metrics.ndcg_at_k(prediction, gains, 2)
    assert math.isnan(values[0].item()) and 0 < values[1].item() < 1


def test_kendall_of_integers_beyond_float32_precision_matches_scipy():
    """Integers were cast to float32, which merged 2**25 and 2**25 + 1 into a tie (-0.548 instead of -1/3)."""
    a, b = torch.tensor([2**25, 2**25 + 1, 0, 1]), torch.tensor([0, 1, 2, 3])
    assert rank_metrics.kendall_tau_b(a, b).item() == pytest.approx(stats.kendalltau(a.numpy(), b.numpy())[0])
    assert rank_metrics.kendall_tau_b(a, b).item() == pytest.approx(-1 / 3)


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


def test_bootstrap_ci_equals_a_loop_over_resamples_with_nans_and_infinities():
    """The count-matrix form gives the same bounds as drawing each resample and taking its nanmean."""
    generator = torch.Generator().manual_seed(3)
    values = torch.rand(2, 3, 9, generator=generator, dtype=torch.float64)
    values[0, 1, ::2] = math.nan
    values[1, 0] = math.nan
    values[1, 2, 4] = math.inf
    num_resamples, confidence = 300, 0.8
    low, high = rank_metrics.bootstrap_ci(values, confidence=confidence, num_resamples=num_resamples, seed=5)
    index = torch.randint(9, (num_resamples, 9), generator=torch.Generator().manual_seed(5))
    means = torch.stack([values[..., row].nanmean(dim=-1) for row in index], dim=-1)  # [2, 3, R]
    tail = (1 - confidence) / 2
    expected = torch.nanquantile(means, torch.tensor([tail, 1 - tail], dtype=torch.float64), dim=-1)
    torch.testing.assert_close(low, expected[0], equal_nan=True, atol=1e-12, rtol=0)
    torch.testing.assert_close(high, expected[1], equal_nan=True, atol=1e-12, rtol=0)
    assert math.isnan(low[1, 0]) and not math.isnan(low[0, 1])


def test_bootstrap_ci_never_materialises_a_rows_by_resamples_by_samples_tensor():
    """50 rows x 400 resamples x 200 samples would be 32 MB in float64; the count-matrix form needs < 1 MB."""
    values = torch.rand(50, 200, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as profiler:
        rank_metrics.bootstrap_ci(values, num_resamples=400)
    largest = max(event.cpu_memory_usage for event in profiler.events())
    assert largest < 50 * 400 * 200 * 8 / 16, largest


def _dcg(gains_in_order, k):
    return sum(g / math.log2(i + 2) for i, g in enumerate(gains_in_order[:k]))


def _ndcg_over_all_tie_orders(prediction, gains, k):
    """Brute force: the mean NDCG@k over every order of the tokens that keeps the predictions non-increasing."""
    import itertools

    orders = [order for order in itertools.permutations(range(len(prediction)))
              if all(prediction[a] >= prediction[b] for a, b in itertools.pairwise(order))]
    ideal = _dcg(sorted(gains, reverse=True), k)
    return sum(_dcg([gains[i] for i in order], k) for order in orders) / len(orders) / ideal


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_ndcg_with_tied_predictions_is_the_mean_over_every_tie_break_order(seed, k):
    generator = torch.Generator().manual_seed(seed)
    prediction = torch.randint(0, 3, (7,), generator=generator).double()  # blocks of ties, also across rank k
    gains = torch.rand(7, generator=generator, dtype=torch.float64).round(decimals=1)
    expected = _ndcg_over_all_tie_orders(prediction.tolist(), gains.tolist(), k)
    assert rank_metrics.ndcg_at_k(prediction, gains, k).item() == pytest.approx(expected, abs=1e-12)


def test_ndcg_does_not_depend_on_the_token_order_of_tied_predictions():
    prediction = torch.tensor([0.5, 0.9, 0.5, 0.5, 0.1, 0.9])
    gains = torch.tensor([1.0, 0.0, 0.0, 0.3, 0.2, 0.6], dtype=torch.float64)
    permutation = torch.tensor([3, 5, 0, 4, 2, 1])
    for k in range(1, 7):
        ours = rank_metrics.ndcg_at_k(prediction, gains, k)
        permuted = rank_metrics.ndcg_at_k(prediction[permutation], gains[permutation], k)
        assert ours.item() == pytest.approx(permuted.item(), abs=1e-12), k
    # top-2 is the tied pair (gains 0 and 0.6): both ranks get 0.3
    assert rank_metrics.ndcg_at_k(prediction, gains, 2).item() == pytest.approx(
        (0.3 + 0.3 / math.log2(3)) / (1.0 + 0.6 / math.log2(3)), abs=1e-12)


def _lowest_index_top_k(row, k):
    return sorted(range(len(row)), key=lambda i: (-row[i], i))[:k]


@pytest.mark.parametrize("k", [1, 2, 4, 7, 9])
def test_top_k_ties_go_to_the_lower_token_index_in_every_top_k_metric(k):
    from arrcoc_sam.relevance.vision import top_k_indices as model_top_k
    from arrcoc_sam.relevance.vision_metrics import top_k_recall

    generator = torch.Generator().manual_seed(k)
    a = torch.randint(0, 3, (4, 9), generator=generator).float()  # ties straddle the K-th place
    b = torch.randint(0, 3, (4, 9), generator=generator).float()
    targets = torch.randint(0, 2, (4, 9), generator=generator).float()
    targets[:, 0] = 1.0
    chosen = [[_lowest_index_top_k(row, k) for row in x.tolist()] for x in (a, b)]
    assert rank_metrics.top_k_indices(a, k).tolist() == chosen[0]
    assert model_top_k(a, k).tolist() == chosen[0]
    jaccard = [len(set(x) & set(y)) / len(set(x) | set(y)) for x, y in zip(*chosen, strict=True)]
    torch.testing.assert_close(rank_metrics.topk_jaccard(a, b, k), torch.tensor(jaccard, dtype=torch.float64))
    # batched over extra leading dimensions, the same sets
    assert rank_metrics.topk_jaccard(a[None].expand(3, 4, 9), b[None].expand(3, 4, 9), k).tolist() == [jaccard] * 3
    recall = [sum(t[i] for i in top) / sum(t) for top, t in zip(chosen[0], targets.tolist(), strict=True)]
    assert top_k_recall(a, targets, k) == pytest.approx(sum(recall) / len(recall), abs=1e-12)


def test_a_resample_drawing_both_infinities_has_no_mean_and_is_left_out_like_a_loop_over_resamples():
    """inf + (-inf) is NaN: such resamples drop out of the quantiles instead of counting as -inf (or +inf)."""
    values = torch.tensor([math.inf, -math.inf] + [float(i) for i in range(1, 11)], dtype=torch.float64)
    low, high = rank_metrics.bootstrap_ci(values, confidence=0.1, num_resamples=2000, seed=0)
    index = torch.randint(12, (2000, 12), generator=torch.Generator().manual_seed(0))
    means = torch.stack([values[row].nanmean() for row in index])
    assert 0.3 < float(means.isnan().double().mean()) < 0.5  # about 41 % draw both
    expected = torch.nanquantile(means, torch.tensor([0.45, 0.55], dtype=torch.float64))
    assert math.isfinite(low) and math.isfinite(high)
    torch.testing.assert_close(torch.stack([low, high]), expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("confidence", [0.0, 1.0])
def test_bootstrap_confidence_must_lie_strictly_between_zero_and_one(confidence):
    with pytest.raises(ValueError, match=rf"confidence must be in \(0, 1\), got {confidence}"):
        rank_metrics.bootstrap_ci(torch.rand(5), confidence=confidence)
