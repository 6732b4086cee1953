"""The `evaluate` metric module loads offline by path and reproduces the scipy / rank_metrics values."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from scipy import stats

import arrcoc_sam.metrics

METRIC_PATH = Path(arrcoc_sam.metrics.__file__).parent / "relevance_robustness.py"


@pytest.fixture
def metric(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    evaluate = pytest.importorskip("evaluate")
    return evaluate.load(str(METRIC_PATH))


def test_metric_loads_offline_by_path_and_matches_scipy(metric):
    generator = torch.Generator().manual_seed(0)
    clean = torch.rand(3, 20, generator=generator)
    perturbed = clean + 0.3 * torch.rand(3, 20, generator=generator)
    targets = (clean > 0.7).double()
    result = metric.compute(predictions=perturbed.tolist(), references=clean.tolist(), k=5, targets=targets.tolist())
    assert result["spearman"] == pytest.approx(
        sum(stats.spearmanr(clean[i], perturbed[i]).statistic for i in range(3)) / 3, abs=1e-9)
    assert result["kendall"] == pytest.approx(
        sum(stats.kendalltau(clean[i], perturbed[i]).statistic for i in range(3)) / 3, abs=1e-9)
    assert result["mean_abs_diff"] == pytest.approx((perturbed - clean).abs().mean().item(), abs=1e-6)
    assert 0 <= result["topk_jaccard"] <= 1 and 0 <= result["ndcg"] <= 1


def test_identical_maps_score_perfectly(metric):
    maps = [[0.1, 0.7, 0.3, 0.9], [0.5, 0.2, 0.8, 0.4]]
    result = metric.compute(predictions=maps, references=maps, k=2, targets=maps)
    assert result == pytest.approx({"mean_abs_diff": 0.0, "spearman": 1.0, "kendall": 1.0, "topk_jaccard": 1.0,
                                    "ndcg": 1.0, "ndcg_drop": 0.0})


def test_ndcg_drop_is_the_clean_maps_ndcg_minus_the_perturbed_maps(metric):
    clean = [[0.1, 0.7, 0.3, 0.9]]
    reversed_map = [[0.9, 0.3, 0.7, 0.1]]  # ranks the least relevant tokens first
    result = metric.compute(predictions=reversed_map, references=clean, k=2, targets=clean)
    perturbed = (0.1 + 0.3 / math.log2(3)) / (0.9 + 0.7 / math.log2(3))  # top-2 of the reversed map: tokens 0, 2
    assert result["ndcg"] == pytest.approx(perturbed)
    assert result["ndcg_drop"] == pytest.approx(1.0 - perturbed) and result["ndcg_drop"] > 0


def test_a_k_above_the_number_of_tokens_is_clamped_to_it(metric):
    """The default k=200 on 4-token maps: every token is in both top-K sets (Jaccard 1) and NDCG@K is NDCG@4;
    unclamped, the rank metrics refused k > N."""
    clean, reversed_map = [[0.1, 0.7, 0.3, 0.9]], [[0.9, 0.3, 0.7, 0.1]]
    result = metric.compute(predictions=reversed_map, references=clean, targets=clean)
    ranked = 0.1 + 0.3 / math.log2(3) + 0.7 / 2 + 0.9 / math.log2(5)  # gains of tokens 0, 2, 1, 3 in that order
    ideal = 0.9 + 0.7 / math.log2(3) + 0.3 / 2 + 0.1 / math.log2(5)
    assert result["topk_jaccard"] == 1.0
    assert result["ndcg"] == pytest.approx(ranked / ideal, rel=1e-12)
