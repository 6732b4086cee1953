"""`evaluate` metric: how much perturbed relevance maps differ from clean ones, per example then averaged.

Load offline by path: ``evaluate.load("/abs/path/arrcoc_sam/metrics/relevance_robustness.py")`` (keep
``HF_HOME`` writable; evaluate copies this file there). ``predictions`` are the perturbed relevance maps,
``references`` the clean ones, one list of N floats per example. ``compute(k=200, targets=None)`` returns
the means over examples of mean |r − r̃|, Spearman's ρ, Kendall's τ-b, the top-K Jaccard index, and,
when target relevance maps are given, NDCG@K of the perturbed map and its drop from the clean map's.
The math lives in `arrcoc_sam.relevance.rank_metrics` (checked against scipy.stats).

Inputs are checked, not silently filtered: a map holding inf or NaN (a diverged model) and a negative target
gain raise ValueError naming the argument and the example, since such an example would drop out of some
metrics (NaN ranks) and be counted in others (a top-K set of NaN scores), and read as perfectly robust.
Leave such examples out and count them yourself; `arrcoc_sam.relevance.RelevanceRobustness` counts them in
its report (``non_finite_samples``). What is left out of a mean is only what has no value on valid input:
the correlations of a constant map and the NDCG of an example whose target gains are all 0.
"""

import datasets
import evaluate
import torch

from arrcoc_sam.relevance import rank_metrics

_CITATION = """\
@inproceedings{foret2021sam,
  title={Sharpness-Aware Minimization for Efficiently Improving Generalization},
  author={Foret, Pierre and Kleiner, Ariel and Mobahi, Hossein and Neyshabur, Behnam},
  booktitle={ICLR}, year={2021}}
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: perturbed relevance maps, a list of N floats per example.
    references: clean relevance maps, same shapes.
    k: top-K size for the Jaccard index and NDCG (clamped to N; ties at the K-th place go to the lower index). Default 200.
    targets: optional target relevance maps (gains >= 0), same shapes, for NDCG@K.
Raises:
    ValueError: a map with inf/NaN, or a negative or non-finite target gain (the argument and example named).
Returns:
    mean_abs_diff, spearman, kendall, topk_jaccard (and ndcg, ndcg_drop with targets): floats, means over
    examples (the undefined correlations of constant maps and the NDCG of all-zero targets are left out;
    None if no example has a value).
Examples:
    >>> metric = evaluate.load("arrcoc_sam/metrics/relevance_robustness.py")
    >>> metric.compute(predictions=[[0.1, 0.5, 0.9]], references=[[0.1, 0.5, 0.9]], k=2)["spearman"]
    1.0
"""


def _check_finite(name: str, maps: torch.Tensor) -> None:
    """ValueError naming ``name`` and the first example of ``maps [E, N]`` that holds inf or NaN."""
    bad = (~torch.isfinite(maps)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"{name}[{bad[0]}] holds non-finite values ({len(bad)} of {maps.shape[0]} examples do; a "
                         "diverged model?); this metric refuses them instead of leaving them out of some metrics: "
                         "drop those examples and report their count")


def _mean(values: torch.Tensor) -> float | None:
    finite = values[~values.isnan()]
    return float(finite.mean()) if finite.numel() else None


@evaluate.utils.file_utils.add_start_docstrings(__doc__, _KWARGS_DESCRIPTION)
class RelevanceRobustness(evaluate.Metric):
    """Perturbed-vs-clean relevance agreement (see the module docstring)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=__doc__,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({
                "predictions": datasets.Sequence(datasets.Value("float64")),
                "references": datasets.Sequence(datasets.Value("float64")),
            }),
        )

    def _compute(self, predictions, references, k: int = 200, targets=None) -> dict[str, float | None]:
        perturbed = torch.tensor(predictions, dtype=torch.float64)
        clean = torch.tensor(references, dtype=torch.float64)
        if perturbed.ndim != 2 or perturbed.shape != clean.shape:
            raise ValueError(
                "predictions and references must be lists of equally long relevance maps, got shapes "
                f"{tuple(perturbed.shape)} and {tuple(clean.shape)}"
            )
        _check_finite("predictions", perturbed)
        _check_finite("references", clean)
        k = min(int(k), clean.shape[1])
        out = {
            "mean_abs_diff": _mean(rank_metrics.mean_abs_diff(clean, perturbed)),
            "spearman": _mean(rank_metrics.spearman(clean, perturbed)),
            "kendall": _mean(rank_metrics.kendall_tau_b(clean, perturbed)),
            "topk_jaccard": _mean(rank_metrics.topk_jaccard(clean, perturbed, k)),
        }
        if targets is not None:
            gains = torch.tensor(targets, dtype=torch.float64)
            if gains.shape != clean.shape:
                raise ValueError(f"targets must match the maps' shape {tuple(clean.shape)}, got {tuple(gains.shape)}")
            _check_finite("targets", gains)
            negative = (gains < 0).any(dim=1).nonzero().flatten().tolist()
            if negative:
                raise ValueError(f"targets[{negative[0]}] holds a negative gain ({float(gains[negative[0]].min()):g}); "
                                 "NDCG needs gains >= 0 (e.g. relevance in [0, 1])")
            perturbed_ndcg = rank_metrics.ndcg_at_k(perturbed, gains, k)
            out["ndcg"] = _mean(perturbed_ndcg)
            out["ndcg_drop"] = _mean(rank_metrics.ndcg_at_k(clean, gains, k) - perturbed_ndcg)
        return out
