"""The `evaluate` metric module refuses inputs that would make a diverged map read as robust: a map holding
inf/NaN (it dropped out of four metrics and counted in the fifth) and a negative target gain (that example
dropped out of NDCG), naming the argument and the example."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

import arrcoc_sam.metrics

METRIC_PATH = Path(arrcoc_sam.metrics.__file__).parent / "relevance_robustness.py"
CLEAN = [0.1, 0.5, 0.9]


@pytest.fixture(scope="module")
def metric(tmp_path_factory):
    evaluate = pytest.importorskip("evaluate")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HOME", str(tmp_path_factory.mktemp("hf_home")))
        yield evaluate.load(str(METRIC_PATH))


@pytest.mark.parametrize(("argument", "bad"), [("predictions", math.nan), ("references", math.inf)])
def test_a_non_finite_map_is_refused_instead_of_reading_as_perfectly_robust(metric, argument, bad):
    """Before: predictions [CLEAN, NaN map] gave mean_abs_diff 0.0, spearman/kendall/ndcg 1.0 and topk_jaccard 0.5."""
    maps = {"predictions": [CLEAN, CLEAN], "references": [CLEAN, CLEAN]}
    maps[argument] = [CLEAN, [bad] * 3]
    with pytest.raises(ValueError, match=rf"{argument}\[1\] holds non-finite values \(1 of 2 examples"):
        metric.compute(**maps, k=1, targets=[[0.0, 0.0, 1.0]] * 2)


def test_negative_or_non_finite_target_gains_are_refused(metric):
    """Before: a negative gain made the example's NDCG NaN and dropped it, so a reversed map scored ndcg 1.0."""
    with pytest.raises(ValueError, match=r"targets\[1\] holds a negative gain \(-1\); NDCG needs gains >= 0"):
        metric.compute(predictions=[CLEAN, CLEAN[::-1]], references=[CLEAN, CLEAN], k=1,
                       targets=[[0.0, 0.0, 1.0], [-1.0, 0.0, 1.0]])
    with pytest.raises(ValueError, match=r"targets\[0\] holds non-finite values"):
        metric.compute(predictions=[CLEAN], references=[CLEAN], k=1, targets=[[0.0, math.nan, 1.0]])


def test_valid_maps_still_leave_out_only_what_has_no_value(metric):
    """A constant map has no correlation and all-zero targets no NDCG: those (and only those) are left out."""
    result = metric.compute(predictions=[CLEAN, [0.5] * 3], references=[CLEAN, CLEAN], k=1,
                            targets=[[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    assert result["spearman"] == 1.0 and result["ndcg"] == 1.0  # the first example's values only
    assert result["mean_abs_diff"] == pytest.approx(0.8 / 3 / 2) and result["topk_jaccard"] == 0.5
