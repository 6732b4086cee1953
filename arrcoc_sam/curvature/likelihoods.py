"""Output-space curvature of the likelihoods the GGN supports.

For outputs f (rows of logits or predictions) and a mean-reduced loss ℓ(f), the GGN is G = Jᵀ Λ J with
J = ∂f/∂θ and Λ = ∂²ℓ/∂f². Each likelihood provides Λ·v and a random vector s with E[s sᵀ] = Λ
(``sample_output_factor``; sampled labels as below, or a square root of Λ times Rademacher signs), so that u = Jᵀ s is an unbiased rank-one sample of G (E[u uᵀ] = G) and u ⊙ u an unbiased,
non-negative sample of diag(G). For these canonical-link likelihoods the GGN equals the Fisher information
of the model's predictive distribution, so ``sample`` with sampled labels is the "sampled Fisher".

* ``"cross_entropy"``: softmax over the last dim, mean over M rows; Λ_row = (diag p − p pᵀ)/M;
  s = (p − onehot(y))/√M with y ~ Categorical(p).
* ``"bce"``: sigmoid per element, mean over N elements; Λ = diag(σ(1−σ))/N; s = (σ − y)/√N, y ~ Bernoulli(σ).
* ``"mse"``: mean of squared errors over N elements; Λ = (2/N)·I; s = √(2/N)·z with Rademacher z.

``likelihood=None`` (the default everywhere) picks the one an HF head's loss uses, from the model's
``config.problem_type`` (:func:`resolve_likelihood`): ``"regression"`` → ``"mse"``,
``"multi_label_classification"`` → ``"bce"``, anything else (or no config) → ``"cross_entropy"``.
Cross-entropy over a single output column is refused: its softmax is constant, so its GGN is exactly zero.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from arrcoc_sam.curvature._data import IGNORE_INDEX, unwrap_model
from arrcoc_sam.curvature.probe import GeneratorSampler, ProbeSampler, as_sampler

__all__ = [
    "LIKELIHOODS",
    "SAMPLINGS",
    "resolve_likelihood",
    "select_rows",
    "output_hessian_product",
    "sample_output_factor",
]

LIKELIHOODS = ("cross_entropy", "bce", "mse")
SAMPLINGS = ("labels", "rademacher")
_PROBLEM_TYPE_LIKELIHOODS = {"regression": "mse", "multi_label_classification": "bce"}
_SIZE_HINT = "a multi-label head (one 0/1 target per logit) needs likelihood='bce', a regression head likelihood='mse'"


def resolve_likelihood(likelihood: str | None, model: nn.Module | None) -> str:
    """``likelihood`` itself when given, else the one ``model.config.problem_type`` implies (module docstring);
    wrappers (PEFT, ``torch.compile``, DDP) are looked through."""
    if likelihood is None:
        config = getattr(unwrap_model(model), "config", None)
        likelihood = _PROBLEM_TYPE_LIKELIHOODS.get(getattr(config, "problem_type", None), "cross_entropy")
    _check(likelihood)
    return likelihood


def _check(likelihood: str) -> None:
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")


def select_rows(likelihood: str, outputs: Tensor, targets: Tensor | None) -> Tensor:
    """The outputs the loss averages over: cross-entropy logits ``[..., C]`` -> ``[M, C]`` rows whose target is
    not -100 (all rows when ``targets`` is None); other likelihoods keep every element, flattened to ``[N]``."""
    _check(likelihood)
    if likelihood != "cross_entropy":
        return outputs.reshape(-1)
    if outputs.ndim == 0 or outputs.shape[-1] == 1:
        raise ValueError(
            f"likelihood='cross_entropy' on outputs of shape {tuple(outputs.shape)} (one column): a softmax over one "
            "logit is constant, so its GGN is exactly zero; pass likelihood='mse' for a regression head or "
            "likelihood='bce' for a binary (sigmoid) head"
        )
    rows = outputs.reshape(-1, outputs.shape[-1])
    if targets is None:
        return rows
    if targets.numel() != rows.shape[0]:
        raise ValueError(
            f"likelihood='cross_entropy' expects one class label per row of logits, but targets hold "
            f"{targets.numel()} labels for {rows.shape[0]} rows of logits {tuple(outputs.shape)}: {_SIZE_HINT}"
        )
    return rows[targets.reshape(-1) != IGNORE_INDEX]


def output_hessian_product(likelihood: str, outputs: Tensor, vector: Tensor) -> Tensor:
    """Λ·v for the selected (detached) ``outputs`` and a ``vector`` of the same shape."""
    _check(likelihood)
    count = outputs.shape[0] if likelihood == "cross_entropy" else outputs.numel()
    if likelihood == "cross_entropy":
        probs = outputs.softmax(dim=-1)
        return (probs * vector - probs * (probs * vector).sum(-1, keepdim=True)) / count
    if likelihood == "bce":
        prob = outputs.sigmoid()
        return prob * (1 - prob) * vector / count
    return vector * (2.0 / count)


def sample_output_factor(
    likelihood: str, outputs: Tensor, probes: torch.Generator | ProbeSampler, sampling: str = "rademacher"
) -> Tensor:
    """A random s shaped like ``outputs`` (detached) with E[s sᵀ] = Λ.

    ``sampling="labels"``: the sampled-Fisher factor (module docstring). ``sampling="rademacher"``: s = S z with
    a square root S Sᵀ = Λ and Rademacher z (cross-entropy: S = (diag √p − p √pᵀ)/√M; bce: √(σ(1−σ)/N);
    mse: as for labels); no rare-label heavy tail when p is nearly one-hot, so usually lower variance.
    ``probes``: a generator, or a :class:`~arrcoc_sam.curvature.probe.ProbeSampler` for the signs z (drawn
    first, in ``outputs``' shape); sampled labels need a generator (or a ``GeneratorSampler``).
    """
    _check(likelihood)
    if sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {SAMPLINGS}, got {sampling!r}")
    sampler = as_sampler(probes)
    signs = sampler.rademacher(outputs.shape, outputs.dtype, outputs.device)
    if sampling == "labels" and likelihood != "mse" and not isinstance(sampler, GeneratorSampler):
        raise ValueError(
            f"sampling='labels' draws {likelihood} labels from one generator, but probes is a "
            f"{type(sampler).__name__}, which draws signs only: use sampling='rademacher' with it"
        )
    if likelihood == "cross_entropy":
        probs = outputs.softmax(dim=-1)
        if sampling == "rademacher":
            root = probs.sqrt()
            return (root * signs - probs * (root * signs).sum(-1, keepdim=True)) / math.sqrt(outputs.shape[0])
        labels = torch.multinomial(probs, 1, generator=sampler.generator)
        onehot = torch.zeros_like(probs).scatter_(-1, labels, 1.0)
        return (probs - onehot) / math.sqrt(outputs.shape[0])
    if likelihood == "bce":
        prob = outputs.sigmoid()
        if sampling == "rademacher":
            return (prob * (1 - prob) / outputs.numel()).sqrt() * signs
        labels = (torch.rand(prob.shape, generator=sampler.generator, device=prob.device, dtype=prob.dtype) < prob).to(prob.dtype)
        return (prob - labels) / math.sqrt(outputs.numel())
    return signs * math.sqrt(2.0 / outputs.numel())
