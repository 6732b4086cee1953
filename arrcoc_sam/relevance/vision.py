"""The ARR-COC v0.1 vision relevance model (DESIGN §4), with the two fixes that make it trainable.

Pipeline per sample: texture array [N=G*G, 13] (standardised per sample) -> three "ways of knowing",
each a map [N] in [0, 1]:
  information   = channel entropy: entropy of softmax over the 13 standardised channels / log(13);
  perspectival  = Sobel edge magnitude, min-max scaled within the sample;
  participatory = cosine between a Conv1x1 13 -> 64 -> D projection of each token and the query embedding
                  [D], mapped to [0, 1] by sigmoid(scale * cos + bias) with learned scale and bias;
-> `AdaptiveTensionBalancer`: per-map mean / max / std (9 numbers) and the query -> MLP 128, 128 -> softmax
over the 3 ways -> relevance [N] = weighted sum of the maps (so in [0, 1]) -> top-K tokens (K=200).

Fixes over v0.1: every statistic is per sample (a sample's relevance never depends on its batch), and the
learned parts (the query coupling and the balancer) get a real gradient from supervised relevance targets:
MSE plus an optional pairwise logistic ranking term (weight 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers import initialization as hf_init
from transformers.utils import ModelOutput

from arrcoc_sam.relevance import rank_metrics
from arrcoc_sam.relevance.texture import (
    NUM_TEXTURE_CHANNELS,
    SOBEL_MAGNITUDE_CHANNEL,
    grid_to_tokens,
    normalize_per_sample,
    texture_array,
)

_SCORE_KEYS = ["information", "perspectival", "participatory", "balancer_weights", "selected_indices"]


class ArrCocRelevanceConfig(PretrainedConfig):
    """Configuration of `ArrCocRelevanceModel`.

    Args:
        num_channels: C, channels of the token features: the texture array's 13 (the only value taken; the
            perspectival score reads the Sobel channel by position).
        grid_size: G, cells per side when images are given (N = G*G tokens).
        query_dim: D, size of the query embedding (384 for MiniLM input embeddings).
        coupling_hidden: width of the Conv1x1 13 -> hidden -> D participatory projection.
        balancer_hidden: width of the two hidden layers of the tension balancer's MLP.
        top_k_tokens: K, tokens kept by `selected_indices` (clamped to N).
        ranking_weight: weight of the pairwise ranking term in the loss (0 disables it).
        ranking_pairs: pairs per token for the ranking term (token i against i + offset, fixed offsets).
        ranking_margin: pairs whose targets differ by this much or less are ignored (only |gap| > margin counts).
        ranking_scale: logistic loss on ranking_scale * (r_i - r_j) for target_i > target_j.
        participatory_init_scale: initial sharpness of the sigmoid mapping cosine to [0, 1].
        participatory_init_bias: initial offset of that sigmoid; negative starts the map low, near the sparse
            targets' prior, so the balancer does not abandon the learned way before it has learned.
    """

    model_type = "arrcoc_relevance"
    keys_to_ignore_at_inference = _SCORE_KEYS

    def __init__(
        self,
        num_channels: int = NUM_TEXTURE_CHANNELS,
        grid_size: int = 32,
        query_dim: int = 384,
        coupling_hidden: int = 64,
        balancer_hidden: int = 128,
        top_k_tokens: int = 200,
        ranking_weight: float = 0.5,
        ranking_pairs: int = 16,
        ranking_margin: float = 0.05,
        ranking_scale: float = 10.0,
        participatory_init_scale: float = 5.0,
        participatory_init_bias: float = -2.0,
        **kwargs,
    ):
        for name, value in (("num_channels", num_channels), ("grid_size", grid_size), ("query_dim", query_dim),
                            ("coupling_hidden", coupling_hidden), ("balancer_hidden", balancer_hidden),
                            ("top_k_tokens", top_k_tokens), ("ranking_pairs", ranking_pairs)):
            if int(value) < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if int(num_channels) != NUM_TEXTURE_CHANNELS:
            raise ValueError(f"num_channels must be {NUM_TEXTURE_CHANNELS} (the texture array's channels, which the "
                             f"scores read by position), got {num_channels!r}")
        for name, value in (("ranking_weight", ranking_weight), ("ranking_margin", ranking_margin)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        for name, value in (("ranking_scale", ranking_scale), ("participatory_init_scale", participatory_init_scale)):
            if value <= 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        self.num_channels = int(num_channels)
        self.grid_size = int(grid_size)
        self.query_dim = int(query_dim)
        self.coupling_hidden = int(coupling_hidden)
        self.balancer_hidden = int(balancer_hidden)
        self.top_k_tokens = int(top_k_tokens)
        self.ranking_weight = float(ranking_weight)
        self.ranking_pairs = int(ranking_pairs)
        self.ranking_margin = float(ranking_margin)
        self.ranking_scale = float(ranking_scale)
        self.participatory_init_scale = float(participatory_init_scale)
        self.participatory_init_bias = float(participatory_init_bias)
        super().__init__(**kwargs)


@dataclass
class ArrCocRelevanceOutput(ModelOutput):
    """Output of the relevance models. Shapes: B samples, N tokens, K kept tokens.

    loss: scalar (only when `labels` are given); relevance: [B, N] in [0, 1]; information, perspectival,
    participatory: [B, N] in [0, 1]; balancer_weights: [B, 3] (rows sum to 1, order as the three maps);
    selected_indices: [B, K] token indices by descending relevance.
    """

    loss: torch.Tensor | None = None
    relevance: torch.Tensor | None = None
    information: torch.Tensor | None = None
    perspectival: torch.Tensor | None = None
    participatory: torch.Tensor | None = None
    balancer_weights: torch.Tensor | None = None
    selected_indices: torch.Tensor | None = None


def _minmax_per_sample(scores: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    low = scores.amin(dim=1, keepdim=True)
    high = scores.amax(dim=1, keepdim=True)
    return (scores - low) / (high - low + eps)


def information_score(tokens: torch.Tensor) -> torch.Tensor:
    """Channel entropy: [B, N, C] standardised features -> [B, N] in [0, 1] (entropy of softmax / log C)."""
    log_p = torch.log_softmax(tokens, dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1) / math.log(tokens.shape[-1])


def perspectival_score(tokens: torch.Tensor) -> torch.Tensor:
    """Edge salience: the Sobel-magnitude channel of [B, N, 13] features, min-max scaled per sample -> [B, N]."""
    return _minmax_per_sample(tokens[..., SOBEL_MAGNITUDE_CHANNEL])


class ParticipatoryScorer(nn.Module):
    """Query coupling: Conv1x1 C -> hidden -> D on each token, cosine with the query, sigmoid(scale*cos + bias).

    The D-dimensional projection P(x) = W2 h + b2 (h = GELU(W1 x + b1), [hidden]) is never materialised:
    P(x).q = h.(W2^T q) + b2.q and |P(x)|^2 = h^T (W2^T W2) h + 2 h.(W2^T b2) + |b2|^2, so the cost per token
    is O(hidden^2) instead of O(hidden * D). The result equals the explicit cosine up to rounding.
    """

    def __init__(self, config: ArrCocRelevanceConfig):
        super().__init__()
        self.config = config
        self.conv_in = nn.Conv1d(config.num_channels, config.coupling_hidden, 1)
        self.conv_out = nn.Conv1d(config.coupling_hidden, config.query_dim, 1)
        self.log_scale = nn.Parameter(torch.tensor(math.log(config.participatory_init_scale)))
        self.bias = nn.Parameter(torch.tensor(config.participatory_init_bias))

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, C] -> h [B, N, hidden]."""
        return F.gelu(F.linear(tokens, self.conv_in.weight.squeeze(-1), self.conv_in.bias))

    def cosine(self, tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """cos(P(x_n), q) for tokens [B, N, C] and query [B, D] -> [B, N] in [-1, 1]."""
        h = self.hidden(tokens)
        weight, bias = self.conv_out.weight.squeeze(-1), self.conv_out.bias  # [D, hidden], [D]
        dot = h @ (query @ weight).unsqueeze(-1) + (query @ bias)[:, None, None]
        sq_norm = ((h @ (weight.T @ weight)) * h).sum(-1) + 2 * h @ (weight.T @ bias) + bias @ bias
        norms = sq_norm.clamp_min(1e-16).sqrt() * torch.linalg.vector_norm(query, dim=-1, keepdim=True)
        return dot.squeeze(-1) / norms.clamp_min(1e-8)

    def forward(self, tokens: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """tokens [B, N, C], query [B, D] -> [B, N] in (0, 1)."""
        return torch.sigmoid(self.log_scale.exp() * self.cosine(tokens, query) + self.bias)


class AdaptiveTensionBalancer(nn.Module):
    """Per-sample weights over the three ways: (mean, max, std of each map) ++ query -> MLP -> softmax [B, 3]."""

    def __init__(self, config: ArrCocRelevanceConfig, num_maps: int = 3):
        super().__init__()
        hidden = config.balancer_hidden
        self.mlp = nn.Sequential(
            nn.Linear(3 * num_maps + config.query_dim, hidden), nn.GELU(),
            nn.Linear(hidden, hidden), nn.GELU(),
            nn.Linear(hidden, num_maps),
        )

    def forward(self, maps: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """maps [B, M, N], query [B, D] -> weights [B, M] (softmax)."""
        stats = torch.cat((maps.mean(-1), maps.amax(-1), maps.std(-1, unbiased=False)), dim=-1)
        return torch.softmax(self.mlp(torch.cat((stats, query), dim=-1)), dim=-1)


class RelevanceScorer(nn.Module):
    """Token features [B, N, C] + query [B, D] -> the three maps, the balancer weights and relevance [B, N]."""

    def __init__(self, config: ArrCocRelevanceConfig):
        super().__init__()
        self.config = config
        self.participatory = ParticipatoryScorer(config)
        self.balancer = AdaptiveTensionBalancer(config)

    def forward(self, token_features: torch.Tensor, query_embedding: torch.Tensor) -> ArrCocRelevanceOutput:
        _check_inputs(token_features, query_embedding, self.config)
        dtype = self.participatory.conv_in.weight.dtype  # a bf16/fp16 model takes float32 inputs too
        tokens = normalize_per_sample(token_features).to(dtype)
        query = query_embedding.to(dtype)
        maps = torch.stack((information_score(tokens), perspectival_score(tokens),
                            self.participatory(tokens, query)), dim=1)
        weights = self.balancer(maps, query)
        relevance = (weights.unsqueeze(-1) * maps).sum(dim=1)
        return ArrCocRelevanceOutput(
            relevance=relevance, information=maps[:, 0], perspectival=maps[:, 1], participatory=maps[:, 2],
            balancer_weights=weights,
        )


def _check_inputs(token_features: torch.Tensor, query_embedding: torch.Tensor, config) -> None:
    if token_features.dim() != 3 or token_features.shape[-1] != config.num_channels:
        raise ValueError(
            f"token_features must be [B, N, {config.num_channels}], got shape {tuple(token_features.shape)}"
        )
    if query_embedding.shape != (token_features.shape[0], config.query_dim):
        raise ValueError(
            f"query_embedding must be [B={token_features.shape[0]}, D={config.query_dim}], "
            f"got shape {tuple(query_embedding.shape)}"
        )


def pairwise_ranking_loss(relevance: torch.Tensor, targets: torch.Tensor, num_pairs: int = 16,
                          margin: float = 0.05, scale: float = 10.0, per_example: bool = False) -> torch.Tensor:
    """Logistic pairwise ranking loss over fixed token pairs (i, i + offset mod N), per sample.

    For each pair with |t_i - t_j| > margin: softplus(-scale * sign(t_i - t_j) * (r_i - r_j)), averaged over
    the valid pairs of the batch (0 when there are none); with ``per_example``, each sample's share of that times
    B, ``[B]`` (its pairs' sum over the batch's valid pairs: their mean is the batch value). Offsets 1 + k*N // num_pairs (k < num_pairs) mix neighbouring and distant tokens; the loss
    is deterministic. Cost O(B * N * num_pairs).
    """
    n = relevance.shape[1]
    offsets = sorted({1 + (k * n) // num_pairs for k in range(num_pairs)} - {n})
    partner = (torch.arange(n, device=relevance.device).unsqueeze(0) + torch.tensor(offsets, device=relevance.device)
               .unsqueeze(1)) % n
    target_gap = targets.unsqueeze(1) - targets[:, partner]
    score_gap = relevance.unsqueeze(1) - relevance[:, partner]
    valid = (target_gap.abs() > margin).to(relevance.dtype)
    losses = F.softplus(-scale * torch.sign(target_gap) * score_gap) * valid
    if per_example:
        return losses.sum(dim=(1, 2)) * relevance.shape[0] / valid.sum().clamp_min(1.0)
    return losses.sum() / valid.sum().clamp_min(1.0)


def relevance_loss(relevance: torch.Tensor, labels: torch.Tensor, config: ArrCocRelevanceConfig,
                   per_example: bool = False) -> torch.Tensor:
    """MSE(relevance, labels) + config.ranking_weight * pairwise ranking loss. Both [B, N] (labels may be [B, G, G]).

    A scalar over the batch; with ``per_example``, ``[B]`` values whose mean is the batch loss: each sample's MSE
    plus its share of the ranking term times B (what ESAM's data selection ranks, and trains on for the chosen
    samples)."""
    targets = labels.reshape(relevance.shape[0], -1).to(relevance.dtype)
    if targets.shape != relevance.shape:
        raise ValueError(f"labels must hold {relevance.shape[1]} values per sample, got shape {tuple(labels.shape)}")
    loss = (relevance - targets).square().mean(dim=1) if per_example else F.mse_loss(relevance, targets)
    if config.ranking_weight > 0:
        loss = loss + config.ranking_weight * pairwise_ranking_loss(
            relevance, targets, config.ranking_pairs, config.ranking_margin, config.ranking_scale, per_example
        )
    return loss


def top_k_indices(relevance: torch.Tensor, k: int) -> torch.Tensor:
    """Indices [B, min(k, N)] of the highest-relevance tokens, by descending relevance; ties go to the lower
    token index, as in the metrics (`rank_metrics.top_k_indices`)."""
    return rank_metrics.top_k_indices(relevance, min(k, relevance.shape[-1]))


class RelevancePreTrainedModel(PreTrainedModel):
    """Shared initialisation for the relevance models (torch defaults for layers; the sigmoid's scale/bias)."""

    main_input_name = "pixel_values"
    base_model_prefix = "arrcoc"

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Conv1d)):
            fan_in = module.weight[0].numel()
            hf_init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                hf_init.uniform_(module.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))
        elif isinstance(module, ParticipatoryScorer):
            hf_init.constant_(module.log_scale, math.log(self.config.participatory_init_scale))
            hf_init.constant_(module.bias, self.config.participatory_init_bias)

    def token_features(self, pixel_values: torch.Tensor | None, token_features: torch.Tensor | None,
                       grid_size: int | None = None) -> torch.Tensor:
        """Exactly one of images [B, 3, H, W] in [0, 1] or features [B, N, C] -> features [B, N, C]."""
        if (pixel_values is None) == (token_features is None):
            raise ValueError("pass exactly one of pixel_values [B, 3, H, W] or token_features [B, N, C]")
        if token_features is not None:
            return token_features
        return grid_to_tokens(texture_array(pixel_values, grid_size or self.config.grid_size))


class ArrCocRelevanceModel(RelevancePreTrainedModel):
    """ARR-COC v0.1 relevance: images or token features + query -> relevance [B, N] in [0, 1] and top-K tokens."""

    config_class = ArrCocRelevanceConfig

    def __init__(self, config: ArrCocRelevanceConfig):
        super().__init__(config)
        self.scorer = RelevanceScorer(config)
        self.post_init()

    def compute_relevance(self, token_features: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        """token_features [B, N, C], query_embedding [B, D] -> relevance [B, N] in [0, 1]."""
        return self.scorer(token_features, query_embedding).relevance

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        query_embedding: torch.Tensor | None = None,
        token_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> ArrCocRelevanceOutput:
        """Relevance of images [B, 3, H, W] (or token features [B, N, C]) for queries [B, D].

        labels: optional target relevance [B, N] (or [B, G, G]) in [0, 1]; then `loss` is set.
        """
        if query_embedding is None:
            raise ValueError("query_embedding [B, D] is required")
        scores = self.scorer(self.token_features(pixel_values, token_features), query_embedding)
        loss = None if labels is None else relevance_loss(scores.relevance, labels, self.config)
        return ArrCocRelevanceOutput(
            loss=loss, relevance=scores.relevance, information=scores.information,
            perspectival=scores.perspectival, participatory=scores.participatory,
            balancer_weights=scores.balancer_weights,
            selected_indices=top_k_indices(scores.relevance, self.config.top_k_tokens),
        )


AutoConfig.register(ArrCocRelevanceConfig.model_type, ArrCocRelevanceConfig)
AutoModel.register(ArrCocRelevanceConfig, ArrCocRelevanceModel)
