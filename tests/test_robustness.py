"""Robustness evaluation on small stand-in relevance models (per-sample, batched == looped)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from arrcoc_sam.relevance.robustness import PERTURBATIONS, RelevanceRobustness, robustness_report_section

GRID, CHANNELS, QUERY_DIM = 6, 5, 4



def _pooled_features(pixel_values: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] -> [B, GRID², CHANNELS]: pooled RGB, their mean and a squared term."""
    pooled = F.adaptive_avg_pool2d(pixel_values, GRID).flatten(2).transpose(1, 2)
    return torch.cat((pooled, pooled.mean(-1, keepdim=True), pooled[..., :1].square()), dim=-1)


class TinyRelevance(nn.Module):
    """relevance = sigmoid(<MLP(f_n), V q> + b): per sample, depends on features, query and weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(CHANNELS, 8), nn.Tanh(), nn.Linear(8, 8))
        self.query = nn.Linear(QUERY_DIM, 8)
        self.bias = nn.Parameter(torch.tensor(0.1))

    def compute_relevance(self, token_features: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        scores = (self.embed(token_features) * self.query(query_embedding).unsqueeze(1)).sum(-1)
        return torch.sigmoid(scores + self.bias)

    def token_features(self, pixel_values=None, token_features=None) -> torch.Tensor:
        return _pooled_features(pixel_values) if token_features is None else token_features


class QueryOnlyRelevance(TinyRelevance):
    """Ignores the image: relevance = sigmoid(P q), with a learned per-token map P [N, D]."""

    def __init__(self) -> None:
        super().__init__()
        self.positions = nn.Parameter(torch.randn(GRID * GRID, QUERY_DIM))

    def compute_relevance(self, token_features: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(query_embedding @ self.positions.T)


def _batch(samples: int, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "pixel_values": torch.rand(samples, 3, 4 * GRID, 4 * GRID, generator=generator),
        "query_embedding": torch.randn(samples, QUERY_DIM, generator=generator),
        "labels": torch.rand(samples, GRID * GRID, generator=generator).round(decimals=1),
    }


def _split(batch: dict[str, torch.Tensor], sizes: list[int]) -> list[dict[str, torch.Tensor]]:
    parts = {key: value.split(sizes) for key, value in batch.items()}
    return [{key: parts[key][i] for key in batch} for i in range(len(sizes))]


def _model(cls=TinyRelevance, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(0)
    return cls().to(dtype)


def _double(batch):
    return {key: value.double() for key, value in batch.items()}


def test_zero_perturbation_gives_perfect_scores_for_every_perturbation():
    report = RelevanceRobustness(levels=(0.0,), k=8, num_draws=3).evaluate(_model(dtype=torch.float64), _double(_batch(4)))
    assert set(report["perturbations"]) == set(PERTURBATIONS)
    for name, entry in report["perturbations"].items():
        metrics = entry["levels"]["0"]
        assert metrics["mean_abs_diff"]["mean"] == pytest.approx(0.0, abs=1e-12), name
        for metric in ("spearman", "kendall", "topk_jaccard"):
            assert metrics[metric]["mean"] == pytest.approx(1.0, abs=1e-12), (name, metric)
        assert metrics["task_metric_drop"]["mean"] == pytest.approx(0.0, abs=1e-12), name


def test_input_ignoring_model_is_perfectly_robust_to_input_noise_and_the_report_says_so():
    report = RelevanceRobustness(k=8, num_draws=4).evaluate(_model(QueryOnlyRelevance), _batch(5))
    for name in ("input_noise", "feature_noise", "token_dropout"):
        entry = report["perturbations"][name]
        assert entry["perfectly_robust"] is True and entry["max_abs_diff"] <= 1e-6
        assert any(line.startswith(f"{name}: perfectly robust") for line in report["summary"])
        assert entry["levels"]["0.2"]["spearman"]["mean"] == pytest.approx(1.0)
    assert report["perturbations"]["weight_random"]["perfectly_robust"] is False
    json.dumps(report, allow_nan=False)


def test_noise_hurts_a_feature_dependent_model_more_at_higher_levels():
    report = RelevanceRobustness(levels=(0.05, 0.2), k=8, num_draws=4,
                                 perturbations=("feature_noise", "input_noise")).evaluate(_model(), _batch(6))
    for name in ("feature_noise", "input_noise"):
        levels = report["perturbations"][name]["levels"]
        assert report["perturbations"][name]["perfectly_robust"] is False
        assert 0 < levels["0.05"]["mean_abs_diff"]["mean"] < levels["0.2"]["mean_abs_diff"]["mean"]
        stats = levels["0.2"]["mean_abs_diff"]
        assert stats["ci_low"] <= stats["mean"] <= stats["ci_high"] and stats["n"] == 6


def _per_sample(report):
    return report["per_sample"]


def test_batched_and_looped_evaluation_agree_to_1e_6():
    model, batch = _model(dtype=torch.float64), _double(_batch(5))
    kwargs = dict(k=8, num_draws=4, per_sample=True, chunk_rows=7)
    batched = _per_sample(RelevanceRobustness(batched=True, **kwargs).evaluate(model, batch))
    looped = _per_sample(RelevanceRobustness(batched=False, **kwargs).evaluate(model, batch))
    assert set(batched) == set(PERTURBATIONS)
    for name, levels in batched.items():
        for level, metrics in levels.items():
            for metric, values in metrics.items():
                assert values == pytest.approx(looped[name][level][metric], abs=1e-6), (name, level, metric)


def test_per_sample_results_do_not_depend_on_batch_composition():
    model, batch = _model(dtype=torch.float64), _double(_batch(6))
    evaluator = RelevanceRobustness(k=8, num_draws=3, per_sample=True)
    whole = _per_sample(evaluator.evaluate(model, batch))
    pieces = _per_sample(evaluator.evaluate(model, _split(batch, [1, 3, 2])))
    for name, levels in whole.items():
        for level, metrics in levels.items():
            for metric, values in metrics.items():
                assert values == pytest.approx(pieces[name][level][metric], abs=1e-9), (name, level, metric)


def test_missing_images_and_targets_are_skipped_with_a_reason():
    batch = {"token_features": torch.rand(3, GRID * GRID, CHANNELS), "query_embedding": torch.randn(3, QUERY_DIM)}
    report = RelevanceRobustness(k=8, num_draws=2).evaluate(_model(), batch)
    assert set(report["skipped"]) == {"input_noise", "weight_adversarial"}
    assert "ndcg" not in report["perturbations"]["feature_noise"]["levels"]["0.1"]
    assert "clean" not in report


def test_evaluation_leaves_the_model_unchanged():
    model = _model()
    model.train()
    before = {name: p.detach().clone() for name, p in model.state_dict().items()}
    RelevanceRobustness(k=8, num_draws=2).evaluate(model, _batch(2))
    assert model.training
    assert all(torch.equal(before[name], p) for name, p in model.state_dict().items())


def test_report_section_is_a_markdown_table_per_model_and_level():
    models = {"adamw": _model(), "sam": _model(QueryOnlyRelevance)}
    text = robustness_report_section(models, _batch(3), k=8, num_draws=2)
    rows = [line for line in text.splitlines() if line.startswith("| adamw") or line.startswith("| sam")]
    assert len(rows) == 6
    assert "| sam | 0.1 | 0.0000 [0.0000, 0.0000] | 1.0000" in text


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"levels": ()}, "levels"), ({"levels": (-0.1,)}, "levels"), ({"perturbations": ("blur",)}, "perturbations"),
     ({"levels": (1.5,)}, "token_dropout"), ({"k": 0}, "k must be >= 1")],
)
def test_invalid_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RelevanceRobustness(**kwargs)


def test_evaluate_restores_every_modules_train_flag_including_a_frozen_eval_submodule():
    model = TinyRelevance()
    model.train()
    model.embed.eval()  # a frozen backbone kept in eval mode while the rest trains
    before = [module.training for module in model.modules()]
    batch = {"token_features": torch.randn(2, GRID * GRID, CHANNELS), "query_embedding": torch.randn(2, QUERY_DIM)}
    RelevanceRobustness(levels=(0.1,), k=4, num_draws=2, perturbations=("feature_noise",), num_bootstrap=10).evaluate(
        model, batch
    )
    assert [module.training for module in model.modules()] == before


def test_weight_perturbations_on_a_frozen_model_are_skipped_with_one_warning():
    import warnings

    model = _model().requires_grad_(False)
    batches = _split(_batch(4), [2, 2])
    evaluator = RelevanceRobustness(levels=(0.1,), k=8, num_draws=2, num_bootstrap=10,
                                    perturbations=("feature_noise", "weight_random", "weight_adversarial"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = evaluator.evaluate(model, batches)
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(messages) == 1, messages  # once per evaluation, not once per batch or perturbation
    assert "weight_random and weight_adversarial requested but skipped" in messages[0]
    assert set(report["skipped"]) == {"weight_random", "weight_adversarial"}
    assert "feature_noise" in report["perturbations"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a trainable model, or no weight perturbation asked: no warning
        RelevanceRobustness(levels=(0.1,), k=8, num_draws=2, num_bootstrap=10,
                            perturbations=("feature_noise", "weight_random")).evaluate(_model(), batches)
        RelevanceRobustness(levels=(0.1,), k=8, num_draws=2, num_bootstrap=10,
                            perturbations=("feature_noise",)).evaluate(model, batches)


def _feature_batch(samples: int = 3) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(5)
    return {
        "token_features": torch.randn(samples, GRID * GRID, CHANNELS, generator=generator, dtype=torch.float64),
        "query_embedding": torch.randn(samples, QUERY_DIM, generator=generator, dtype=torch.float64),
        "labels": torch.rand(samples, GRID * GRID, generator=generator, dtype=torch.float64),
    }


def _negative_mse(relevance, target):
    return -(relevance - target).square().mean(dim=-1)


def _top_set(scores, k):
    return set(sorted(range(scores.numel()), key=lambda n: (-float(scores[n]), n))[:k])


@pytest.mark.parametrize("name", ["feature_noise", "token_dropout"])
def test_per_sample_metrics_are_means_over_draws_of_hand_built_perturbations(name):
    """Reference: each sample's noise from its own (seed, perturbation, index) generator, metrics by scipy and by
    hand, averaged over the draws; std over samples with ddof=1; the task-metric drop is clean − perturbed."""
    from scipy import stats

    from arrcoc_sam.relevance.seeding import sample_generator

    model, batch, level, draws, k = _model(dtype=torch.float64), _feature_batch(), 0.3, 3, 8
    report = RelevanceRobustness(levels=(level,), k=k, num_draws=draws, perturbations=(name,), per_sample=True,
                                 feature_noise_scale="absolute", task_metric=_negative_mse).evaluate(model, batch)
    expected: dict[str, list[float]] = {m: [] for m in ("mean_abs_diff", "spearman", "kendall", "topk_jaccard",
                                                        "task_metric_drop")}
    with torch.no_grad():
        for i in range(3):
            features, query, target = batch["token_features"][i], batch["query_embedding"][i], batch["labels"][i]
            generator = sample_generator(0, name, i)
            if name == "feature_noise":
                noisy = features + level * torch.randn((draws, *features.shape), generator=generator).double()
            else:
                dropped = torch.rand((draws, features.shape[0]), generator=generator).double() < level
                noisy = torch.where(dropped[..., None], features.mean(dim=0), features)
            clean = model.compute_relevance(features[None], query[None])[0]
            perturbed = model.compute_relevance(noisy, query.expand(draws, -1))
            per_draw = {m: [] for m in expected}
            for r in perturbed:
                per_draw["mean_abs_diff"].append(float((r - clean).abs().mean()))
                per_draw["spearman"].append(stats.spearmanr(clean, r).statistic)
                per_draw["kendall"].append(stats.kendalltau(clean, r).statistic)
                per_draw["topk_jaccard"].append(len(_top_set(clean, k) & _top_set(r, k)) / len(_top_set(clean, k) | _top_set(r, k)))
                per_draw["task_metric_drop"].append(float((r - target).square().mean() - (clean - target).square().mean()))
            for metric, values in per_draw.items():
                expected[metric].append(sum(values) / draws)
    got = report["per_sample"][name]["0.3"]
    for metric, values in expected.items():
        assert got[metric] == pytest.approx(values, abs=1e-9), metric
        summary = report["perturbations"][name]["levels"]["0.3"][metric]
        assert summary["std"] == pytest.approx(float(torch.tensor(values, dtype=torch.float64).std(unbiased=True)), abs=1e-9), metric


class _ChannelZeroRelevance(QueryOnlyRelevance):
    """relevance = sigmoid(P q + f[..., 0]): reads one feature channel."""

    def compute_relevance(self, token_features: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(query_embedding @ self.positions.T + token_features[..., 0])


def test_relative_feature_noise_scales_by_each_channels_std_over_tokens():
    """Channel 0 is constant over the tokens of each sample: relative noise (σ = ρ · its std over tokens = 0) leaves
    it, and so the relevance, unchanged; absolute noise does not."""
    batch = _feature_batch()
    batch["token_features"][..., 0] = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)[:, None]
    model = _model(_ChannelZeroRelevance, dtype=torch.float64)
    kwargs = dict(levels=(0.5,), k=8, num_draws=3, perturbations=("feature_noise",))
    relative = RelevanceRobustness(feature_noise_scale="relative", **kwargs).evaluate(model, batch)
    absolute = RelevanceRobustness(feature_noise_scale="absolute", **kwargs).evaluate(model, batch)
    assert relative["perturbations"]["feature_noise"]["max_abs_diff"] <= 1e-12  # the std of a constant: rounding
    assert absolute["perturbations"]["feature_noise"]["max_abs_diff"] > 1e-3


@pytest.mark.parametrize("batched", [True, False])
def test_adversarial_weights_are_each_samples_normalised_loss_ascent(batched):
    """Reference by autograd: w + ρ g_i/‖g_i‖ (one L2 norm over all trainable tensors), g_i = ∇ MSE of sample i."""
    import copy

    model, batch, level = _model(dtype=torch.float64), _feature_batch(), 0.2
    report = RelevanceRobustness(levels=(level,), k=8, num_draws=2, perturbations=("weight_adversarial",),
                                 per_sample=True, batched=batched).evaluate(model, batch)
    expected, increases = [], []
    for i in range(3):
        features, query = batch["token_features"][i:i + 1], batch["query_embedding"][i:i + 1]
        target = batch["labels"][i:i + 1]
        loss = (model.compute_relevance(features, query) - target).square().mean()
        grads = torch.autograd.grad(loss, list(model.parameters()))
        norm = torch.sqrt(sum(g.square().sum() for g in grads))
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for p, g in zip(moved.parameters(), grads, strict=True):
                p.add_(level * g / norm)
            clean = model.compute_relevance(features, query)
            perturbed = moved.compute_relevance(features, query)
        expected.append(float((perturbed - clean).abs().mean()))
        increases.append(float((perturbed - target).square().mean() - loss.detach()))
    assert report["per_sample"]["weight_adversarial"]["0.2"]["mean_abs_diff"] == pytest.approx(expected, abs=1e-9)
    assert min(increases) > 0  # an ascent: each sample's own loss goes up


@pytest.mark.parametrize("batched", [True, False])
def test_adversarial_weights_under_inference_mode_match_the_report_outside_it(batched):
    """torch.func.grad returns zeros under inference_mode before torch 2.12: the ascent then moved nothing and the
    model read as perfectly robust (differences ~1e-17 instead of 0.07-0.14)."""
    model, batch = _model(dtype=torch.float64), _feature_batch()
    evaluator = RelevanceRobustness(levels=(0.2,), k=8, num_draws=2, perturbations=("weight_adversarial",),
                                    per_sample=True, batched=batched)
    outside = evaluator.evaluate(model, batch)["per_sample"]["weight_adversarial"]["0.2"]["mean_abs_diff"]
    with torch.inference_mode():
        inside = evaluator.evaluate(model, batch)["per_sample"]["weight_adversarial"]["0.2"]["mean_abs_diff"]
    assert min(outside) > 1e-3 and inside == pytest.approx(outside, abs=1e-12)


def test_random_weight_draws_are_filter_normalised():
    """‖δ_row‖ = ρ‖w_row‖ for every output filter (row of dim 0) of a ≥2-D tensor, ‖δ‖ = ρ‖w‖ for 1-D and 0-D ones."""
    model = _model(dtype=torch.float64)
    with torch.no_grad():
        model.embed[0].weight[0] *= 10.0  # rows of very different norms
    trainable = {f"model.{n}": p.detach() for n, p in model.named_parameters()}
    draws = RelevanceRobustness(num_draws=4)._random_weights(trainable, 0.3)
    assert any(w.ndim >= 2 for w in trainable.values()) and any(w.ndim < 2 for w in trainable.values())
    for name, weight in trainable.items():
        rows = weight.reshape(weight.shape[0], -1) if weight.ndim >= 2 else weight.reshape(1, -1)
        delta = (draws[name] - weight).reshape(4, *rows.shape)
        torch.testing.assert_close(delta.norm(dim=-1), 0.3 * rows.norm(dim=-1).expand(4, -1), rtol=1e-10, atol=0)


class PartlyDivergedRelevance(TinyRelevance):
    """TinyRelevance whose first sample of every batch scores NaN (a diverged model, seen on some inputs)."""

    def compute_relevance(self, token_features: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        relevance = super().compute_relevance(token_features, query_embedding).clone()
        relevance[0, 0] = math.nan
        return relevance


def test_samples_with_a_non_finite_clean_relevance_are_counted_said_and_left_out_of_every_statistic():
    """Their top-K Jaccard (NaN sorts first, so the sets still overlap) entered the means as if they were healthy."""
    with pytest.warns(UserWarning, match="1 of 4 samples have a non-finite clean relevance"):
        report = RelevanceRobustness(levels=(0.1,), k=8, num_draws=2, perturbations=("feature_noise",)).evaluate(
            _model(PartlyDivergedRelevance), _batch(4))
    assert report["non_finite_samples"] == 1 and "non-finite clean relevance" in report["summary"][0]
    levels = report["perturbations"]["feature_noise"]["levels"]["0.1"]
    assert {metric: summary["n"] for metric, summary in levels.items()} == dict.fromkeys(levels, 3)
    assert report["clean"]["task_metric"]["n"] == 3


def _per_sample_mean_abs_diff(model, batch, perturbation: str, level: float, draws: int) -> list[float]:
    """Each sample's mean |r − r̃| that RelevanceRobustness reports for one perturbation at one level."""
    report = RelevanceRobustness(levels=(level,), k=8, num_draws=draws, perturbations=(perturbation,),
                                 metrics=("mean_abs_diff",), per_sample=True).evaluate(model, batch)
    return report["per_sample"][perturbation][str(level)]["mean_abs_diff"]


def test_input_noise_adds_level_times_each_samples_own_noise_to_the_images_without_clipping():
    """x̃ = x + ρ·ε in pixel units, not clipped to [0, 1] (module docstring); reference features by the test's own
    pooling and each sample's noise from its (seed, "input_noise", index) generator."""
    from arrcoc_sam.relevance.seeding import sample_generator

    model, batch, level, draws = _model(dtype=torch.float64), _double(_batch(2)), 0.5, 2
    reported = _per_sample_mean_abs_diff(model, batch, "input_noise", level, draws)
    expected = []
    with torch.no_grad():
        for i in range(2):
            images, query = batch["pixel_values"][i], batch["query_embedding"][i]
            noise = torch.randn((draws, *images.shape), generator=sample_generator(0, "input_noise", i)).double()
            noisy = images + level * noise
            assert noisy.min() < 0 and noisy.max() > 1  # clipping would change these images
            clean = model.compute_relevance(_pooled_features(images[None]), query[None])
            perturbed = model.compute_relevance(_pooled_features(noisy), query.expand(draws, -1))
            expected.append(float((perturbed - clean).abs().mean()))
    assert reported == pytest.approx(expected, rel=1e-9, abs=0)


def test_relative_feature_noise_uses_each_channels_population_std_over_the_samples_tokens():
    """σ_f = ρ · the channel's std over the N tokens with ddof 0, the std the per-sample standardisation divides by
    (so ρ is absolute on the standardised features); ddof 1 made the noise √(N/(N − 1)) ≈ 1.4 % louder."""
    from arrcoc_sam.relevance.seeding import sample_generator

    model, batch, level, draws = _model(dtype=torch.float64), _feature_batch(), 0.3, 2
    reported = _per_sample_mean_abs_diff(model, batch, "feature_noise", level, draws)
    expected = []
    with torch.no_grad():
        for i in range(3):
            features, query = batch["token_features"][i], batch["query_embedding"][i]
            std = (features - features.mean(dim=0)).square().mean(dim=0).sqrt()  # [C], over the tokens
            noise = torch.randn((draws, *features.shape), generator=sample_generator(0, "feature_noise", i)).double()
            clean = model.compute_relevance(features[None], query[None])
            perturbed = model.compute_relevance(features + level * std * noise, query.expand(draws, -1))
            expected.append(float((perturbed - clean).abs().mean()))
    assert reported == pytest.approx(expected, rel=1e-9, abs=0)
