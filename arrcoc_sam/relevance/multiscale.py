"""Multi-scale ARR-COC relevance: one shared relevance scorer over several scales, fused per sample.

Scales: `mode="pyramid"` average-pools the texture grid by 2^l (l = 0 .. num_levels-1, at most 5 levels, as
ARR-COC planned); `mode="rescale"` resizes the input images by each of `scales` (0.5, 1, 2) and computes the
texture array on a grid of round(G * s) cells, so a cell always covers the same number of pixels. Each
scale's relevance is resampled (bilinear) to the common G x G grid and the maps are fused per sample:

* `fusion="sharpness"` (default): weights proportional to 1 / sharpness, where a scale's sharpness is the
  RMS per-token norm of the input gradient of its mean relevance,
  sqrt(N_s) * || d mean_n r_s,n / d x_s ||_F (x_s: that scale's standardised token features [N_s, 13]),
  i.e. how much the map moves when its inputs move. The weights are a measurement, detached from the graph.
* `fusion="curvature"`: the same with the curvature of the map instead of its slope,
  sqrt(N_s) * || d^2 mean_n r_s,n / d x_s^2 ||_F, the Hessian's Frobenius norm estimated by Hutchinson
  probes, E ||H v||^2 = ||H||_F^2 for Rademacher v, as Hessian-vector products over the token features
  (`torch.func.vjp` of `torch.func.grad`, linearised once per scale and reused for every probe). Samples
  are independent, so the batch Hessian is block-diagonal and one batched product per probe gives every
  sample's estimate. Costs `curvature_probes` Hessian-vector products per scale. The probes are a fixed
  hash of (probe, token, channel) (`rademacher_probe`), the same for every sample, device and call, with
  no random-number generator, so a sample's estimate does not depend on its batch and works inside `vmap`.
* `fusion="learned"`: softmax of one learned logit per scale.

Both measurements are taken functionally on detached features, so the forward works under `torch.no_grad`,
`torch.inference_mode`, `vmap` and `functional_call`, and the fused relevance keeps its gradient path to the
input token features / images (through the per-scale maps; the weights are constants).

Returns `combined_relevance` [B, N], `per_scale` [B, S, N], `sharpness` [B, S] and `weights` [B, S]; a
coarse-to-fine top-K (`coarse_to_fine_top_k`: 64 cells of the 2x-pooled map -> their 256 children -> K).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModel
from transformers.utils import ModelOutput

from arrcoc_sam.relevance import rank_metrics
from arrcoc_sam.relevance.texture import grid_to_tokens, normalize_per_sample, texture_array, tokens_to_grid
from arrcoc_sam.relevance.vision import (
    ArrCocRelevanceConfig,
    RelevancePreTrainedModel,
    RelevanceScorer,
    relevance_loss,
)

MAX_PYRAMID_LEVELS = 5
FUSIONS = ("sharpness", "curvature", "learned")


class MultiScaleRelevanceConfig(ArrCocRelevanceConfig):
    """`ArrCocRelevanceConfig` plus the scale set and the fusion rule.

    Args:
        mode: "pyramid" (average-pooled texture grid) or "rescale" (resized input images; images only).
            grid_size must be even (the coarse-to-fine top-K pools 2x2 cells).
        num_levels: pyramid levels (1..5); level l pools the grid by 2^l (grid_size must be divisible, and the
            coarsest level must keep at least 2x2 cells).
        scales: image scale factors for mode="rescale" (each gives a round(grid_size * s) grid, at least 2).
        fusion: "sharpness" (weights proportional to 1 / input-gradient sharpness), "curvature"
            (1 / input-Hessian Frobenius norm, Hutchinson) or "learned".
        curvature_probes: Rademacher probes per scale for fusion="curvature" (fixed, see `rademacher_probe`).
        coarse_k: cells kept at the coarse stage of `coarse_to_fine_top_k` (their 4 * coarse_k children
            are the fine candidates). The model selects min(top_k_tokens, 4 * min(coarse_k, N / 4)) tokens.
        sharpness_eps: added to the sharpness before inverting it.
    """

    model_type = "arrcoc_multiscale_relevance"
    keys_to_ignore_at_inference = ["per_scale", "sharpness", "weights", "selected_indices"]

    def __init__(
        self,
        mode: str = "pyramid",
        num_levels: int = 3,
        scales: tuple[float, ...] | list[float] = (0.5, 1.0, 2.0),
        fusion: str = "sharpness",
        coarse_k: int = 64,
        sharpness_eps: float = 1e-6,
        curvature_probes: int = 8,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if mode not in ("pyramid", "rescale"):
            raise ValueError(f"mode must be 'pyramid' or 'rescale', got {mode!r}")
        if fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, got {fusion!r}")
        if curvature_probes < 1:
            raise ValueError(f"curvature_probes must be >= 1, got {curvature_probes}")
        if not 1 <= num_levels <= MAX_PYRAMID_LEVELS:
            raise ValueError(f"num_levels must be in [1, {MAX_PYRAMID_LEVELS}], got {num_levels}")
        if self.grid_size % 2:
            raise ValueError(f"grid_size must be even (coarse-to-fine top-K pools 2x2 cells), got {self.grid_size}")
        if mode == "pyramid" and self.grid_size % 2 ** (num_levels - 1):
            raise ValueError(f"grid_size ({self.grid_size}) must be divisible by 2^(num_levels-1) = "
                             f"{2 ** (num_levels - 1)}")
        if mode == "pyramid" and self.grid_size // 2 ** (num_levels - 1) < 2:
            raise ValueError(f"num_levels={num_levels} pools grid_size {self.grid_size} down to a "
                             f"{self.grid_size // 2 ** (num_levels - 1)}x{self.grid_size // 2 ** (num_levels - 1)} "
                             f"level; every level needs at least 2x2 cells (use num_levels <= "
                             f"{int(math.log2(self.grid_size))})")
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be a non-empty list of positive factors, got {scales!r}")
        if mode == "rescale" and any(round(self.grid_size * s) < 2 for s in scales):
            small = [s for s in scales if round(self.grid_size * s) < 2]
            raise ValueError(f"scales {small} give grids of round(grid_size * s) < 2 cells per side at grid_size "
                             f"{self.grid_size}; every scale needs at least a 2x2 grid")
        if coarse_k < 1:
            raise ValueError(f"coarse_k must be >= 1, got {coarse_k}")
        if sharpness_eps <= 0:
            raise ValueError(f"sharpness_eps must be > 0, got {sharpness_eps}")
        self.mode, self.num_levels, self.scales = mode, int(num_levels), [float(s) for s in scales]
        self.fusion, self.coarse_k, self.sharpness_eps = fusion, int(coarse_k), float(sharpness_eps)
        self.curvature_probes = int(curvature_probes)

    @property
    def num_scales(self) -> int:
        return self.num_levels if self.mode == "pyramid" else len(self.scales)


@dataclass
class MultiScaleRelevanceOutput(ModelOutput):
    """loss: scalar (with labels); combined_relevance: [B, N] in [0, 1]; per_scale: [B, S, N] (on the common
    grid); sharpness: [B, S]; weights: [B, S] (rows sum to 1); selected_indices: [B, K]."""

    loss: torch.Tensor | None = None
    combined_relevance: torch.Tensor | None = None
    per_scale: torch.Tensor | None = None
    sharpness: torch.Tensor | None = None
    weights: torch.Tensor | None = None
    selected_indices: torch.Tensor | None = None


def rademacher_probe(shape: tuple[int, ...] | torch.Size, index: int, device: torch.device | str | None = None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A deterministic ±1 tensor of ``shape``: sign bits of a 32-bit integer hash of (index, element position).

    No random-number generator is involved, so it is identical on every device and call and may be built
    inside ``vmap``; different ``index`` values give (practically) independent, balanced probes.
    """
    numel = math.prod(shape)
    x = torch.arange(numel, device=device, dtype=torch.int64) + index * numel
    mask = 0xFFFFFFFF
    x = (x * 1103515245 + 12345) & mask
    for _ in range(2):  # Mueller's 32-bit integer hash (products stay below 2^59: no int64 overflow)
        x = ((x ^ (x >> 16)) * 0x45D9F3B) & mask
    x = x ^ (x >> 16)
    return (((x >> 7) & 1) * 2 - 1).to(dtype).view(shape)


def coarse_to_fine_top_k(relevance: torch.Tensor, k: int, coarse_k: int = 64) -> torch.Tensor:
    """Top-K of a G x G relevance map, searched coarse to fine.

    relevance [B, G*G] (G even) -> indices [B, k] into the fine grid, by descending relevance. The map is
    2x2-average-pooled, its `coarse_k` best cells are kept, and the k best of their 4 * coarse_k children
    are returned. Requires k <= 4 * coarse_k <= N. Ties go to the lower cell, then token, index
    (`rank_metrics.top_k_indices`).
    """
    grid = tokens_to_grid(relevance.unsqueeze(-1))[:, 0]
    batch, side = grid.shape[0], grid.shape[-1]
    if side % 2:
        raise ValueError(f"the relevance grid side must be even, got {side}")
    if not 1 <= k <= 4 * coarse_k <= side * side:
        raise ValueError(f"need 1 <= k <= 4 * coarse_k <= N; got k={k}, coarse_k={coarse_k}, N={side * side}")
    coarse = F.avg_pool2d(grid.unsqueeze(1), 2)[:, 0].flatten(1)
    cells = rank_metrics.top_k_indices(coarse, coarse_k)
    rows, cols = 2 * (cells // (side // 2)), 2 * (cells % (side // 2))
    children = torch.stack([(rows + dy) * side + cols + dx for dy in (0, 1) for dx in (0, 1)], -1).reshape(batch, -1)
    children = children.sort(dim=1).values  # ascending token index, so that ties among them go to the lower one
    return children.gather(1, rank_metrics.top_k_indices(relevance.gather(1, children), k))


class MultiScaleRelevanceModel(RelevancePreTrainedModel):
    """ARR-COC relevance fused over scales: images or token features [B, G*G, 13] + query [B, D]."""

    config_class = MultiScaleRelevanceConfig

    def __init__(self, config: MultiScaleRelevanceConfig):
        super().__init__(config)
        self.scorer = RelevanceScorer(config)
        self.scale_logits = nn.Parameter(torch.zeros(config.num_scales)) if config.fusion == "learned" else None
        self.post_init()

    def _scale_inputs(self, pixel_values: torch.Tensor | None, token_features: torch.Tensor | None):
        """The token features of each scale: a list of [B, N_s, C]."""
        if self.config.mode == "rescale":
            if pixel_values is None:
                raise ValueError("mode='rescale' resizes images: pass pixel_values, not token_features")
            size = pixel_values.shape[-1]
            inputs = []
            for scale in self.config.scales:
                resized = pixel_values if scale == 1 else F.interpolate(
                    pixel_values, scale_factor=scale, mode="bilinear", align_corners=False, antialias=scale < 1)
                grid = round(self.config.grid_size * scale)
                if resized.shape[-1] < grid:
                    raise ValueError(f"scale {scale} gives {resized.shape[-1]}-pixel images, smaller than its "
                                     f"{grid}-cell grid; use larger images (now {size} pixels)")
                inputs.append(grid_to_tokens(texture_array(resized, grid, normalize=False)))
            return inputs
        fine = self.token_features(pixel_values, token_features)
        grid = tokens_to_grid(normalize_per_sample(fine))
        if grid.shape[-1] != self.config.grid_size:
            raise ValueError(f"token_features must hold grid_size^2 = {self.config.grid_size ** 2} tokens, "
                             f"got {fine.shape[1]}")
        return [grid_to_tokens(F.avg_pool2d(grid, 2**level) if level else grid)
                for level in range(self.config.num_levels)]

    def _sharpness(self, features: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
        """Per-sample sharpness [B] of one scale's map at ``features`` [B, N_s, C] (see the module docstring).

        Computed functionally (``torch.func``) on detached features, so it neither needs nor touches the
        caller's autograd graph: it works under ``torch.no_grad``/``torch.inference_mode`` and inside
        ``vmap``/``functional_call``, and the relevance keeps its own graph to the inputs.
        """
        if torch.is_inference_mode_enabled():  # torch < 2.12: torch.func.grad returns zeros under inference_mode
            with torch.inference_mode(False):
                return self._sharpness(features.clone(), query.clone())
        scale = features.shape[1] ** 0.5
        point = features.detach()

        def mean_relevance(x: torch.Tensor) -> torch.Tensor:  # samples are independent: sum of per-sample means
            return self.scorer(x, query).relevance.mean(dim=1).sum()

        gradient = torch.func.grad(mean_relevance)
        if self.config.fusion == "sharpness":
            return torch.linalg.vector_norm(gradient(point).flatten(1), dim=1) * scale
        _, hessian_product = torch.func.vjp(gradient, point)  # v -> v^T H = H v (H symmetric), reused per probe
        squared = torch.zeros(point.shape[0], dtype=point.dtype, device=point.device)
        for index in range(self.config.curvature_probes):  # Hutchinson: E ||H v||^2 = ||H||_F^2, H block-diagonal
            probe = rademacher_probe(point.shape[1:], index, point.device, point.dtype)
            (product,) = hessian_product(probe.expand_as(point))
            squared = squared + product.flatten(1).pow(2).sum(dim=1)
        return (squared / self.config.curvature_probes).sqrt() * scale

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        query_embedding: torch.Tensor | None = None,
        token_features: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> MultiScaleRelevanceOutput:
        """Fused relevance of images [B, 3, H, W] (or token features [B, G*G, C]) for queries [B, D]."""
        if query_embedding is None:
            raise ValueError("query_embedding [B, D] is required")
        side = self.config.grid_size
        maps, sharpness = [], []
        for features in self._scale_inputs(pixel_values, token_features):
            maps.append(self.scorer(features, query_embedding).relevance)  # keeps the graph to the inputs
            if self.config.fusion != "learned":
                sharpness.append(self._sharpness(features, query_embedding))
        grid_maps = [m if m.shape[1] == side * side else grid_to_tokens(F.interpolate(
            tokens_to_grid(m.unsqueeze(-1)), size=(side, side), mode="bilinear", align_corners=False))[..., 0]
            for m in maps]
        per_scale = torch.stack(grid_maps, dim=1)
        if self.config.fusion != "learned":
            sharp = torch.stack(sharpness, dim=1).detach()
            inverse = 1.0 / (sharp + self.config.sharpness_eps)
            weights = inverse / inverse.sum(dim=1, keepdim=True)
        else:
            sharp = torch.full(per_scale.shape[:2], float("nan"), device=per_scale.device, dtype=per_scale.dtype)
            weights = torch.softmax(self.scale_logits, dim=0).expand(per_scale.shape[0], -1)
        weights = weights.to(per_scale.dtype)  # the model's dtype (bf16 weights by default would not cast alone)
        combined = (weights.unsqueeze(-1) * per_scale).sum(dim=1)
        coarse_k = min(self.config.coarse_k, side * side // 4)
        k = min(self.config.top_k_tokens, 4 * coarse_k)  # clamped to the candidates (<= N), like top_k_indices
        loss = None if labels is None else relevance_loss(combined, labels, self.config)
        return MultiScaleRelevanceOutput(
            loss=loss, combined_relevance=combined, per_scale=per_scale, sharpness=sharp, weights=weights,
            selected_indices=coarse_to_fine_top_k(combined, k, coarse_k),
        )

    def compute_relevance(self, token_features: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        """token_features [B, G*G, C], query_embedding [B, D] -> combined relevance [B, G*G] in [0, 1].

        ``mode="pyramid"`` only: a ``"rescale"`` model scores images resized per scale, so token features alone
        cannot be scored (ValueError)."""
        if self.config.mode == "rescale":
            raise ValueError(
                "compute_relevance scores token features, but this MultiScaleRelevanceModel has mode='rescale', which "
                "scores images resized per scale; call it with pixel_values, or use a mode='pyramid' model for "
                "robustness evaluation and token allocation")
        return self.forward(token_features=token_features, query_embedding=query_embedding).combined_relevance


AutoConfig.register(MultiScaleRelevanceConfig.model_type, MultiScaleRelevanceConfig)
AutoModel.register(MultiScaleRelevanceConfig, MultiScaleRelevanceModel)
