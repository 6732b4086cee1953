"""Perturbation robustness of relevance scores, per sample, with many draws evaluated batched.

A relevance model is anything with ``compute_relevance(token_features [B, N, C], query_embedding [B, D])
-> [B, N]``; for input-space noise it also needs ``token_features(pixel_values=..., token_features=None)``
(images [B, 3, H, W] -> features [B, N, C]), as `ArrCocRelevanceModel` has. A batch is a dict with
``query_embedding`` and either ``token_features`` or ``pixel_values``, plus optional target relevance
``labels`` ([B, N] or [B, G, G]). ``data`` is one such batch or an iterable of them.

Perturbations (ρ is the level; ε ~ N(0, I), fresh per sample and draw, shared across levels):

* ``feature_noise``       f̃ = f + ρ·σ_f·ε, σ_f = the sample's per-channel std over tokens
                          (``feature_noise_scale="relative"``, i.e. absolute ρ on the standardised features
                          the ARR-COC scorers see) or σ_f = 1 (``"absolute"``)
* ``input_noise``         x̃ = x + ρ·ε on the images (pixel units, images in [0, 1], not clipped);
                          needs ``pixel_values``
* ``token_dropout``       a fraction ρ of tokens (u < ρ, u uniform) replaced by the sample's channel means
* ``weight_random``       filter-normalised Gaussian (Li et al. 2018): per output filter (row of dim 0) of
                          each ≥2-D tensor, and per tensor otherwise, δ = ρ·‖w‖·ε/‖ε‖; draws are shared by
                          all samples (a perturbed model is a model)
* ``weight_adversarial``  SAM's ascent (Foret et al. 2021) of each sample's own relevance loss:
                          δ_i = ρ·g_i/‖g_i‖ (one global L2 norm); needs targets; one draw

Metrics per perturbation, level and sample (averaged over draws): mean |r − r̃|, Spearman, Kendall τ-b,
top-K Jaccard, NDCG@K of r̃ against the target and the task-metric drop (clean − perturbed; the task
metric defaults to NDCG@K). The report gives the mean, std (ddof=1) and a percentile bootstrap CI over
samples. Draws are stacked: noisy inputs as extra rows (``chunk_rows`` per call), weight draws through
``torch.func.vmap`` over ``functional_call`` with stacked weights; ``batched=False`` loops over draws
(and over samples for the adversarial gradient) as the reference.

Noise is seeded by (seed, perturbation, global sample index), so a sample's results do not depend on the
other samples in its batch, provided the model itself is per-sample (eval mode, no batch statistics). It is
drawn on the device of the data (weights), with that device's generator: reproducible on a device type, but
a CUDA run draws other noise than a CPU run (drawing on the host would cost more than the evaluation).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from arrcoc_sam.relevance import rank_metrics
from arrcoc_sam.relevance.seeding import sample_generator

__all__ = ["PERTURBATIONS", "METRICS", "RelevanceRobustness", "robustness_report_section"]

PERTURBATIONS = ("feature_noise", "input_noise", "token_dropout", "weight_random", "weight_adversarial")
METRICS = ("mean_abs_diff", "spearman", "kendall", "topk_jaccard", "ndcg", "task_metric_drop")
_TARGET_METRICS = ("ndcg", "task_metric_drop")
_DESCRIPTIONS = {
    "feature_noise": "Gaussian noise on token features, sigma = level (x the sample's channel std when relative)",
    "input_noise": "Gaussian noise on the images, sigma = level (pixel units)",
    "token_dropout": "fraction = level of tokens replaced by the sample's channel means",
    "weight_random": "filter-normalised Gaussian weight noise, |delta_filter| = level x |w_filter|",
    "weight_adversarial": "SAM ascent of each sample's relevance loss, |delta| = level (global L2)",
}

_NO_WEIGHTS = "the model has no trainable parameters"

LossFn = Callable[[Tensor, Tensor], Tensor]


def mse_per_sample(relevance: Tensor, target: Tensor) -> Tensor:
    """Mean squared error per sample: ``[B, N] x [B, N] -> [B]``."""
    return (relevance - target).square().mean(dim=-1)


class _RelevanceCall(nn.Module):
    """Routes ``forward`` to ``compute_relevance`` so ``functional_call`` can swap the model's weights."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, token_features: Tensor, query_embedding: Tensor) -> Tensor:
        return self.model.compute_relevance(token_features, query_embedding)


def _json_float(value: float) -> float | None:
    return None if math.isnan(value) else value


def _summaries(rows: Tensor, confidence: float, num_bootstrap: int, seed: int) -> list[dict[str, float | int | None]]:
    """Per row of ``rows [M, S]``: mean, std (ddof=1) and bootstrap CI over the non-NaN samples, and their count."""
    low, high = rank_metrics.bootstrap_ci(rows, confidence, num_bootstrap, seed)
    out = []
    for i, row in enumerate(rows.double().cpu()):
        finite = row[~row.isnan()]
        n = finite.numel()
        std = float(finite.std()) if n > 1 else (0.0 if n == 1 else math.nan)
        out.append({"mean": _json_float(float(finite.mean()) if n else math.nan), "std": _json_float(std),
                    "ci_low": _json_float(float(low[i])), "ci_high": _json_float(float(high[i])), "n": n})
    return out


class RelevanceRobustness:
    """Per-sample robustness of a relevance model's scores under input, feature and weight perturbations.

    Args:
        levels: perturbation sizes ρ (their meaning per perturbation is in the module docstring).
        k: K of the top-K Jaccard index and of NDCG@K (clamped to N).
        num_draws: random draws per sample and level (adversarial perturbations use one).
        perturbations: which of ``PERTURBATIONS`` to run.
        metrics: which of ``METRICS`` to report (target metrics are skipped when a batch has no labels).
        feature_noise_scale: ``"relative"`` (σ = ρ · per-sample channel std) or ``"absolute"`` (σ = ρ).
        loss_fn: per-sample relevance loss ``(relevance [B, N], target [B, N]) -> [B]`` whose ascent gives the
            adversarial weights (default: MSE).
        task_metric: ``(relevance [B, N], target [B, N]) -> [B]``, higher is better (default: NDCG@K).
        batched: stack draws (True) or loop over them (False, the reference).
        chunk_rows: most sample-evaluations (draws x samples) in one model call.
        confidence, num_bootstrap: the bootstrap interval over samples.
        per_sample: also return every per-sample value (``report["per_sample"]``).
        seed: the noise seed.
        rounding_atol: a perturbation is reported ``perfectly_robust`` when max |r − r̃| <= this; stacked rows
            go through differently shaped matrix products, so float32 rounding alone gives ~1e-8.
    """

    def __init__(
        self,
        levels: Iterable[float] = (0.05, 0.1, 0.2),
        k: int = 200,
        num_draws: int = 8,
        perturbations: Iterable[str] = PERTURBATIONS,
        metrics: Iterable[str] = METRICS,
        feature_noise_scale: str = "relative",
        loss_fn: LossFn | None = None,
        task_metric: LossFn | None = None,
        batched: bool = True,
        chunk_rows: int = 64,
        confidence: float = 0.95,
        num_bootstrap: int = 2000,
        per_sample: bool = False,
        seed: int = 0,
        rounding_atol: float = 1e-6,
    ) -> None:
        self.levels = tuple(float(level) for level in levels)
        if not self.levels or any(not math.isfinite(level) or level < 0 for level in self.levels):
            raise ValueError(f"levels must be a non-empty list of finite values >= 0, got {self.levels}")
        self.perturbations = tuple(perturbations)
        self.metrics = tuple(metrics)
        for name, given, known in (("perturbations", self.perturbations, PERTURBATIONS), ("metrics", self.metrics, METRICS)):
            unknown = sorted(set(given) - set(known))
            if unknown or not given:
                raise ValueError(f"{name} must be a non-empty subset of {known}, got {given}")
        if "token_dropout" in self.perturbations and max(self.levels) > 1:
            raise ValueError(f"token_dropout levels are fractions in [0, 1], got {max(self.levels)}")
        if feature_noise_scale not in ("relative", "absolute"):
            raise ValueError(f"feature_noise_scale must be 'relative' or 'absolute', got {feature_noise_scale!r}")
        for name, value in (("k", k), ("num_draws", num_draws), ("chunk_rows", chunk_rows), ("num_bootstrap", num_bootstrap)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if not 0 < confidence < 1:
            raise ValueError(f"confidence must be in (0, 1), got {confidence}")
        self.k, self.num_draws, self.chunk_rows = int(k), int(num_draws), int(chunk_rows)
        self.feature_noise_scale = feature_noise_scale
        self.loss_fn = loss_fn or mse_per_sample
        self.task_metric = task_metric
        self.batched, self.confidence, self.num_bootstrap = batched, confidence, int(num_bootstrap)
        self.per_sample, self.seed = per_sample, int(seed)
        if rounding_atol < 0:
            raise ValueError(f"rounding_atol must be >= 0, got {rounding_atol}")
        self.rounding_atol = float(rounding_atol)

    # ----------------------------------------------------------------------------------------------- API
    def config(self) -> dict[str, Any]:
        """The settings, JSON-ready (``loss_fn`` / ``task_metric`` by name)."""
        return {
            "levels": list(self.levels), "k": self.k, "num_draws": self.num_draws,
            "perturbations": list(self.perturbations), "metrics": list(self.metrics),
            "feature_noise_scale": self.feature_noise_scale, "loss_fn": getattr(self.loss_fn, "__name__", "custom"),
            "task_metric": "ndcg_at_k" if self.task_metric is None else getattr(self.task_metric, "__name__", "custom"),
            "batched": self.batched, "confidence": self.confidence, "num_bootstrap": self.num_bootstrap,
            "seed": self.seed, "rounding_atol": self.rounding_atol,
        }

    def evaluate(self, model: nn.Module, data: Mapping[str, Tensor] | Iterable[Mapping[str, Tensor]]) -> dict[str, Any]:
        """Run every perturbation at every level on ``data``; return the JSON-ready report.

        The report: ``config``; ``num_samples``; ``clean`` (the task metric without perturbation, when
        targets exist); ``non_finite_samples`` (samples whose clean relevance holds inf/NaN: a diverged model;
        left out of every statistic); ``perturbations[name]`` with ``description``, ``max_abs_diff`` (over all
        levels, samples and draws with a finite difference; None when there is none), ``non_finite_perturbed``
        (samples with a finite clean relevance that turned inf/NaN under the perturbation; left out of the
        statistics of those levels), ``perfectly_robust`` (that maximum is <= ``rounding_atol`` and no sample
        turned non-finite) and ``levels[str(level)][metric]`` = {mean, std, ci_low, ci_high, n}, ``n`` counting
        the samples behind the mean; ``skipped[name]`` = reason; ``summary``, a list of sentences.
        Weight perturbations act on the trainable parameters only: on a frozen model they are skipped, with
        one ``UserWarning`` per call naming them.
        Every module's train/eval flag is restored on exit (a frozen submodule kept in eval mode stays so);
        weights are never modified.
        """
        batches = [data] if isinstance(data, Mapping) else list(data)
        if not batches:
            raise ValueError("data holds no batches")
        modes = [(module, module.training) for module in model.modules()]
        model.eval()
        try:
            collected = self._collect(model, batches)
        finally:
            for module, training in modes:
                module.training = training
        frozen = [name for name, reason in collected["skipped"].items() if reason == _NO_WEIGHTS]
        if frozen:
            warnings.warn(f"RelevanceRobustness: {' and '.join(frozen)} requested but skipped: {_NO_WEIGHTS} "
                          "(every parameter has requires_grad=False), and only trainable weights are perturbed; "
                          "unfreeze the weights to study (model.requires_grad_(True)) or leave these perturbations "
                          "out", UserWarning, stacklevel=2)
        return self._report(collected)

    # ------------------------------------------------------------------------------------- collection
    def _collect(self, model: nn.Module, batches: list[Mapping[str, Tensor]]) -> dict[str, Any]:
        call = _RelevanceCall(model)
        trainable = {f"model.{n}": p.detach() for n, p in model.named_parameters() if p.requires_grad}
        values: dict[str, dict[float, dict[str, list[Tensor]]]] = {}
        max_diff: dict[str, Tensor] = {}
        non_finite_perturbed: dict[str, Tensor] = {}
        skipped: dict[str, str] = {}
        clean_task: list[Tensor] = []
        weight_draws: dict[float, dict[str, Tensor]] = {}
        offset = non_finite = 0
        labelled = {batch.get("labels") is not None for batch in batches}
        if len(labelled) > 1:
            raise ValueError("some batches have 'labels' and others do not: give targets for all samples or none")
        for batch in batches:
            features, query, images, target = self._unpack(model, batch)
            with torch.no_grad():
                clean = model.compute_relevance(features, query)
            undefined = (~torch.isfinite(clean)).any(dim=-1)  # [B]: no statistic of these samples means anything
            non_finite += int(undefined.sum())
            k = min(self.k, clean.shape[-1])
            if target is not None:
                task = self._task(clean, target, k)
                clean_task.append(task.masked_fill(undefined.to(task.device), math.nan))
            for name in self.perturbations:
                reason = self._skip_reason(name, images, target, trainable)
                if reason:
                    skipped[name] = reason
                    continue
                turned = torch.zeros_like(undefined)  # [B]: finite clean relevance, non-finite under this perturbation
                for level in self.levels:
                    if name == "weight_random" and level not in weight_draws:
                        weight_draws[level] = self._random_weights(trainable, level)
                    perturbed = self._perturbed(name, level, call, trainable, weight_draws.get(level),
                                                features, query, images, target, offset)
                    # per sample, over draws and tokens; a sample with a non-finite clean relevance has none
                    diff = (perturbed.double() - clean.double()).abs().amax(dim=(0, 2))
                    finite = torch.isfinite(diff)
                    turned |= ~finite.to(turned.device) & ~undefined
                    left_out = undefined | ~finite.to(undefined.device)
                    diff = diff.masked_fill(~finite, -math.inf).amax()  # -inf: no finite difference in this batch
                    max_diff[name] = torch.maximum(max_diff.get(name, diff), diff)
                    per_metric = values.setdefault(name, {}).setdefault(level, {})
                    for metric, value in self._metrics(clean, perturbed, target, k).items():
                        per_metric.setdefault(metric, []).append(value.masked_fill(left_out.to(value.device), math.nan))
                non_finite_perturbed[name] = non_finite_perturbed.get(name, 0) + turned.sum()
            offset += clean.shape[0]
        return {"values": values, "max_diff": max_diff, "non_finite_perturbed": non_finite_perturbed, "skipped": skipped,
                "clean_task": clean_task, "num_samples": offset, "non_finite_samples": non_finite}

    def _unpack(self, model: nn.Module, batch: Mapping[str, Tensor]):
        if "query_embedding" not in batch:
            raise ValueError(f"each batch needs 'query_embedding' [B, D]; got keys {sorted(batch)}")
        query = batch["query_embedding"]
        images = batch.get("pixel_values")
        if batch.get("token_features") is not None:
            features = batch["token_features"]
        elif images is not None:
            if not hasattr(model, "token_features"):
                raise ValueError("the batch has pixel_values but the model has no token_features(pixel_values=...)")
            with torch.no_grad():
                features = model.token_features(pixel_values=images, token_features=None)
        else:
            raise ValueError(f"each batch needs 'token_features' [B, N, C] or 'pixel_values' [B, 3, H, W]; got {sorted(batch)}")
        target = batch.get("labels")
        if target is not None:
            target = target.reshape(features.shape[0], -1).to(features.dtype)
        return features, query, images, target

    def _skip_reason(self, name: str, images, target, trainable) -> str:
        if name == "input_noise" and images is None:
            return "the data has no pixel_values"
        if name in ("weight_random", "weight_adversarial") and not trainable:
            return _NO_WEIGHTS
        if name == "weight_adversarial" and target is None:
            return "the data has no target relevance ('labels') for the loss"
        return ""

    def _task(self, relevance: Tensor, target: Tensor, k: int) -> Tensor:
        if self.task_metric is None:
            return rank_metrics.ndcg_at_k(relevance, target, k)
        return self.task_metric(relevance, target).double()

    def _metrics(self, clean: Tensor, perturbed: Tensor, target: Tensor | None, k: int) -> dict[str, Tensor]:
        """Per-sample metrics averaged over draws: ``clean [B, N]``, ``perturbed [D, B, N]`` -> {name: [B]}."""
        reference = clean.expand_as(perturbed)
        out: dict[str, Tensor] = {}
        for metric in self.metrics:
            if metric == "mean_abs_diff":
                value = rank_metrics.mean_abs_diff(reference, perturbed)
            elif metric == "spearman":
                value = rank_metrics.spearman(reference, perturbed)
            elif metric == "kendall":
                value = rank_metrics.kendall_tau_b(reference, perturbed)
            elif metric == "topk_jaccard":
                value = rank_metrics.topk_jaccard(reference, perturbed, k)
            elif target is None:
                continue
            elif metric == "ndcg":
                value = rank_metrics.ndcg_at_k(perturbed, target.expand_as(perturbed), k)
            else:
                draws = perturbed.shape[0]
                perturbed_task = self._task(perturbed.flatten(0, 1), target.repeat(draws, 1), k).view(draws, -1)
                value = self._task(clean, target, k) - perturbed_task
            out[metric] = value.mean(dim=0)
        return out

    # ---------------------------------------------------------------------------------- perturbations
    def _perturbed(self, name, level, call, trainable, weights, features, query, images, target, offset) -> Tensor:
        """Relevance under perturbation ``name`` at ``level``: ``[D, B, N]`` (D = 1 for adversarial)."""
        with torch.no_grad():
            if name == "feature_noise":
                noise = self._per_sample_noise(torch.randn, name, features.shape[1:], features, offset)
                scale = features.std(dim=1, unbiased=False, keepdim=True) if self.feature_noise_scale == "relative" else 1.0
                return self._relevance_rows(call, features + level * scale * noise, query)
            if name == "token_dropout":
                uniform = self._per_sample_noise(torch.rand, name, features.shape[1:2], features, offset)
                dropped = (uniform < level).unsqueeze(-1)
                return self._relevance_rows(call, torch.where(dropped, features.mean(dim=1, keepdim=True), features), query)
            if name == "input_noise":
                noise = self._per_sample_noise(torch.randn, name, images.shape[1:], images, offset)
                noisy = (images + level * noise).flatten(0, 1)
                rows = self.chunk_rows if self.batched else images.shape[0]
                noisy_features = torch.cat([call.model.token_features(pixel_values=chunk, token_features=None)
                                            for chunk in noisy.split(rows)])
                return self._relevance_rows(call, noisy_features.view(self.num_draws, *features.shape), query)
            if name == "weight_random":
                return self._relevance_weight_draws(call, weights, features, query)
        return self._relevance_adversarial(call, trainable, level, features, query, target)

    def _per_sample_noise(self, draw: Callable[..., Tensor], name: str, shape, like: Tensor, offset: int) -> Tensor:
        """Noise ``[D, B, *shape]`` from ``draw`` (``torch.randn`` or ``torch.rand``), each sample's drawn from its
        own seeded generator."""
        return torch.stack([draw((self.num_draws, *shape), device=like.device,
                                 generator=sample_generator(self.seed, name, offset + i, like.device))
                            for i in range(like.shape[0])], dim=1).to(like)

    def _relevance_rows(self, call: _RelevanceCall, features: Tensor, query: Tensor) -> Tensor:
        """``features [D, B, N, C]`` -> relevance ``[D, B, N]``: stacked rows in chunks, or one call per draw."""
        draws, batch = features.shape[:2]
        if not self.batched:
            return torch.stack([call(features[d], query) for d in range(draws)])
        rows = features.flatten(0, 1)
        queries = query.repeat(draws, 1)
        out = [call(f, q) for f, q in zip(rows.split(self.chunk_rows), queries.split(self.chunk_rows), strict=True)]
        return torch.cat(out).view(draws, batch, -1)

    def _random_weights(self, trainable: dict[str, Tensor], level: float) -> dict[str, Tensor]:
        """Stacked filter-normalised Gaussian draws of the trainable weights: {name: [D, *shape]}."""
        names = list(trainable)
        weights = [trainable[n] for n in names]
        generators: dict[torch.device, torch.Generator] = {}
        noise = []
        for w in weights:
            if w.device not in generators:
                generators[w.device] = sample_generator(self.seed, "weight_random", 0, w.device)
            noise.append(torch.randn((self.num_draws, *w.shape), generator=generators[w.device], device=w.device,
                                     dtype=torch.float64))
        stacked = []
        for w, eps in zip(weights, noise, strict=True):
            rows_w = w.double().reshape(w.shape[0], -1) if w.ndim >= 2 else w.double().reshape(1, -1)
            rows_e = eps.reshape(self.num_draws, *rows_w.shape)
            scale = rows_w.norm(dim=-1, keepdim=True) / rows_e.norm(dim=-1, keepdim=True).clamp_min(1e-300)
            stacked.append((w.double() + level * (rows_e * scale).reshape(eps.shape)).to(w.dtype))
        return dict(zip(names, stacked, strict=True))

    def _relevance_weight_draws(self, call: _RelevanceCall, weights: dict[str, Tensor], features: Tensor, query: Tensor) -> Tensor:
        """Relevance under each stacked weight draw: ``[D, B, N]`` via vmap(functional_call), or a loop."""
        if not self.batched:
            return torch.stack([functional_call(call, {n: w[d] for n, w in weights.items()}, (features, query))
                                for d in range(self.num_draws)])
        chunk = max(1, self.chunk_rows // features.shape[0])
        return vmap(lambda w: functional_call(call, w, (features, query)), chunk_size=chunk)(weights)

    def _relevance_adversarial(self, call, trainable, level, features, query, target) -> Tensor:
        """Relevance at each sample's own SAM-ascent weights: ``[1, B, N]``."""
        if torch.is_inference_mode_enabled():  # torch < 2.12: torch.func.grad returns zeros under inference_mode
            with torch.inference_mode(False):
                return self._relevance_adversarial(call, trainable, level, features.clone(), query.clone(),
                                                   target.clone())

        def sample_loss(params: dict[str, Tensor], f: Tensor, q: Tensor, t: Tensor) -> Tensor:
            return self.loss_fn(functional_call(call, params, (f[None], q[None])), t[None]).sum()

        def sample_relevance(params: dict[str, Tensor], f: Tensor, q: Tensor) -> Tensor:
            return functional_call(call, params, (f[None], q[None]))[0]

        def ascent(grads: dict[str, Tensor]) -> dict[str, Tensor]:
            lead = next(iter(grads.values())).shape[0]
            norm = torch.sqrt(sum(g.double().reshape(lead, -1).square().sum(dim=1) for g in grads.values()))
            scale = torch.where(norm > 0, level / norm.clamp_min(1e-300), 0.0)
            return {n: trainable[n] + (scale.view(-1, *[1] * (g.ndim - 1)) * g.double()).to(g.dtype) for n, g in grads.items()}

        samples = features.shape[0]
        if self.batched:
            chunk = max(1, self.chunk_rows)
            grads = vmap(grad(sample_loss), in_dims=(None, 0, 0, 0), chunk_size=chunk)(trainable, features, query, target)
            with torch.no_grad():
                return vmap(sample_relevance, chunk_size=chunk)(ascent(grads), features, query)[None]
        out = []
        for i in range(samples):
            grads = grad(sample_loss)(trainable, features[i], query[i], target[i])
            with torch.no_grad():
                params = {n: w[0] for n, w in ascent({n: g[None] for n, g in grads.items()}).items()}
                out.append(sample_relevance(params, features[i], query[i]))
        return torch.stack(out)[None]

    # ---------------------------------------------------------------------------------------- report
    def _report(self, collected: dict[str, Any]) -> dict[str, Any]:
        keys: list[tuple[str, float, str]] = []
        rows: list[Tensor] = []
        for name, by_level in collected["values"].items():
            for level, metrics in by_level.items():
                for metric, chunks in metrics.items():
                    keys.append((name, level, metric))
                    rows.append(torch.cat(chunks))
        if collected["clean_task"]:
            keys.append(("clean", 0.0, "task_metric"))
            rows.append(torch.cat(collected["clean_task"]))
        summaries = _summaries(torch.stack(rows), self.confidence, self.num_bootstrap, self.seed) if rows else []
        report: dict[str, Any] = {"config": self.config(), "num_samples": collected["num_samples"],
                                  "non_finite_samples": collected["non_finite_samples"],
                                  "perturbations": {}, "skipped": collected["skipped"], "summary": []}
        if collected["non_finite_samples"]:  # their statistics are NaN, which every mean below leaves out
            sentence = (f"{collected['non_finite_samples']} of {collected['num_samples']} samples have a non-finite "
                        "clean relevance (a diverged model?); their statistics are left out of every mean.")
            warnings.warn(f"RelevanceRobustness: {sentence}", stacklevel=3)
            report["summary"].append(sentence)
        per_sample: dict[str, Any] = {}
        for (name, level, metric), summary, row in zip(keys, summaries, rows, strict=True):
            if name == "clean":
                report["clean"] = {"task_metric": summary}
                continue
            entry = report["perturbations"].setdefault(name, self._entry(
                name, float(collected["max_diff"][name]), int(collected["non_finite_perturbed"][name])))
            entry["levels"].setdefault(f"{level:g}", {})[metric] = summary
            if self.per_sample:
                per_sample.setdefault(name, {}).setdefault(f"{level:g}", {})[metric] = [
                    _json_float(x) for x in row.tolist()]
        for name, entry in report["perturbations"].items():
            report["summary"].append(self._sentence(name, entry))
        for name, reason in collected["skipped"].items():
            report["summary"].append(f"{name}: skipped ({reason}).")
        if self.per_sample:
            report["per_sample"] = per_sample
        return report

    def _entry(self, name: str, max_diff: float, non_finite_perturbed: int) -> dict[str, Any]:
        """``max_diff`` is -inf when no sample had a finite difference (reported as None)."""
        finite = math.isfinite(max_diff)
        return {"description": _DESCRIPTIONS[name], "max_abs_diff": max_diff if finite else None,
                "non_finite_perturbed": non_finite_perturbed,
                "perfectly_robust": finite and max_diff <= self.rounding_atol and not non_finite_perturbed,
                "levels": {}}

    def _sentence(self, name: str, entry: dict[str, Any]) -> str:
        if entry["perfectly_robust"]:
            return (f"{name}: perfectly robust — the relevance did not change (max |r - r~| = "
                    f"{entry['max_abs_diff']:.3g} <= rounding tolerance {self.rounding_atol:g}, over every level, "
                    "sample and draw).")
        top = max(entry["levels"], key=float)
        if entry["max_abs_diff"] is None:
            text = f"{name}: max |r - r~| undefined (no sample has a finite clean and perturbed relevance)"
        else:
            text = f"{name}: max |r - r~| = {entry['max_abs_diff']:.3g}"
        if entry["non_finite_perturbed"]:
            text += (f"; {entry['non_finite_perturbed']} sample(s) with a finite clean relevance turned non-finite "
                     "under it (left out of max |r - r~| and of the statistics of the levels where it did)")
        spearman = entry["levels"][top].get("spearman", {}).get("mean")
        if spearman is not None:
            text += f"; mean Spearman {spearman:.3f} at level {top}"
        return text + "."


def robustness_report_section(
    models: Mapping[str, nn.Module],
    data: Mapping[str, Tensor] | Iterable[Mapping[str, Tensor]],
    levels: Iterable[float] = (0.05, 0.1, 0.2),
    perturbation: str = "feature_noise",
    **kwargs: Any,
) -> str:
    """A markdown section comparing models: mean |Δr|, Spearman and top-K Jaccard per level for one perturbation.

    ``kwargs`` go to `RelevanceRobustness` (e.g. ``k``, ``num_draws``, ``seed``). ``data`` must be
    re-iterable (a list of batches or one batch) since every model sees the same data.
    """
    data = [data] if isinstance(data, Mapping) else list(data)
    evaluator = RelevanceRobustness(levels=levels, perturbations=(perturbation,),
                                    metrics=("mean_abs_diff", "spearman", "topk_jaccard"), **kwargs)
    lines = [f"### Robustness of relevance ({perturbation}: {_DESCRIPTIONS[perturbation]})", "",
             f"Per-sample means over held-out samples, {evaluator.num_draws} draws each; K = {evaluator.k}; "
             f"{100 * evaluator.confidence:g} % bootstrap CI in brackets.", "",
             "| model | level | mean abs Δr | Spearman | top-K Jaccard |", "|---|---|---|---|---|"]

    def cell(stat: dict[str, Any]) -> str:
        if stat["mean"] is None:
            return "n/a"
        return f"{stat['mean']:.4f} [{stat['ci_low']:.4f}, {stat['ci_high']:.4f}]"

    for model_name, model in models.items():
        report = evaluator.evaluate(model, data)
        if perturbation not in report["perturbations"]:
            lines.append(f"| {model_name} | – | skipped: {report['skipped'].get(perturbation, '')} | | |")
            continue
        for level, metrics in report["perturbations"][perturbation]["levels"].items():
            lines.append(f"| {model_name} | {level} | {cell(metrics['mean_abs_diff'])} | "
                         f"{cell(metrics['spearman'])} | {cell(metrics['topk_jaccard'])} |")
    return "\n".join(lines) + "\n"
