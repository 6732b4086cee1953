"""Batches, default loss/output functions and the per-batch weights used to average curvature over data.

A *batch* is a tensor, a tuple or list (``(inputs, targets)``, e.g. from ``DataLoader(TensorDataset(x, y))``)
or a mapping (an HF dict batch). ``data`` is one
batch or an iterable of batches (list, DataLoader, generator). Tensors, tuples and mappings count as one
batch; anything else is iterated once and materialised, because every estimator passes over the same
batches many times (a shuffling DataLoader would otherwise change the matrix between products).

Multi-batch averaging: the objective is the weighted mean L(θ) = Σ_b w_b L_b(θ) / Σ_b w_b, where L_b is
the (mean-reduced) loss of batch b. ``weighting`` chooses w_b:

* ``"examples"``: the leading dimension of the batch (its number of examples);
* ``"tokens"``: the number of labels that are not ``-100`` in ``batch["labels"]`` (dict batches);
* ``"shifted_tokens"``: the number of ``batch["labels"][..., 1:]`` that are not ``-100``: the targets a
  causal LM's loss averages over (position t predicts label t + 1, so the first label of a row is unused);
* ``"auto"`` (default): for dict batches with ``labels``, ``"shifted_tokens"`` when the model is an HF
  causal LM (:func:`shifts_labels`) and ``"tokens"`` otherwise; else ``"examples"``. For token
  classification this makes L the mean over all labelled tokens of the data, for a causal LM the mean over
  all predicted tokens, for sequence classification (one label per example) the mean over examples: what
  one big batch would give. Pass ``weighting`` explicitly for a loss that averages differently;
* ``"equal"``: w_b = 1.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "LossFn",
    "OutputFn",
    "as_batches",
    "batch_weights",
    "default_loss",
    "default_outputs",
    "iter_weighted",
    "shifts_labels",
    "unwrap_model",
]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar Tensor`` (mean-reduced over the batch)."""
OutputFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor | None]]
"""``output_fn(model, batch) -> (outputs, targets or None)``: what the GGN's likelihood sees."""

IGNORE_INDEX = -100
WEIGHTINGS = ("auto", "examples", "tokens", "shifted_tokens", "equal")
_SHIFTED_LOSS_TYPES = ("ForCausalLM", "ForConditionalGeneration")
_CAUSAL_CLASS_SUFFIXES = ("ForCausalLM", "LMHeadModel")


def as_batches(data: Any) -> list[Any]:
    """One batch (tensor, tuple, mapping) or an iterable of batches -> a non-empty list of batches."""
    if isinstance(data, (Tensor, tuple, Mapping)):
        return [data]
    try:
        batches = list(data)
    except TypeError as err:
        raise TypeError(f"data must be a batch (tensor, tuple, dict) or an iterable of batches, got {type(data).__name__}") from err
    if not batches:
        raise ValueError("data holds no batches")
    return batches


def _first_tensor(batch: Any) -> Tensor:
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    for item in items:
        if isinstance(item, Tensor):
            return item
    raise TypeError(f"batch of type {type(batch).__name__} holds no tensor to count examples from")


def unwrap_model(model: nn.Module | None) -> nn.Module | None:
    """The model inside the usual wrappers: PEFT (``get_base_model()``), ``torch.compile`` (``_orig_mod``) and
    DDP/DataParallel-style ``.module``, peeled repeatedly (e.g. a compiled PEFT model)."""
    while model is not None:
        if callable(getattr(model, "get_base_model", None)):
            inner = model.get_base_model()
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            inner = model._orig_mod
        elif isinstance(getattr(model, "module", None), nn.Module):
            inner = model.module
        else:
            return model
        if inner is model:
            return model
        model = inner
    return model


def shifts_labels(model: nn.Module | None) -> bool:
    """Whether ``model`` (after :func:`unwrap_model`) is an HF decoder-only LM whose loss is averaged over the
    shifted labels ``labels[..., 1:]``: its ``loss_type`` is ``"ForCausalLM"`` / ``"ForConditionalGeneration"``,
    or (no ``loss_type``) its class name ends with ``ForCausalLM`` / ``LMHeadModel`` (e.g. ``GPT2LMHeadModel``);
    encoder-decoder models (``config.is_encoder_decoder``) shift the decoder inputs instead, not the labels."""
    model = unwrap_model(model)
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    loss_type = getattr(model, "loss_type", None)
    if loss_type is not None:
        return loss_type in _SHIFTED_LOSS_TYPES
    return type(model).__name__.endswith(_CAUSAL_CLASS_SUFFIXES)


def _batch_weight(batch: Any, weighting: str, shifted: bool) -> Tensor | int:
    if weighting == "equal":
        return 1
    has_labels = isinstance(batch, Mapping) and isinstance(batch.get("labels"), Tensor)
    if weighting == "auto" and has_labels:
        weighting = "shifted_tokens" if shifted else "tokens"
    if weighting in ("tokens", "shifted_tokens"):
        if not has_labels:
            raise ValueError(f'weighting="{weighting}" needs dict batches with a "labels" tensor')
        labels = batch["labels"][..., 1:] if weighting == "shifted_tokens" else batch["labels"]
        return (labels != IGNORE_INDEX).sum()
    if isinstance(batch, Mapping) and has_labels:
        return batch["labels"].shape[0]
    return _first_tensor(batch).shape[0]


def batch_weights(batches: list[Any], weighting: str = "auto", model: nn.Module | None = None) -> list[float]:
    """Normalised weights w_b / Σ w_b (Python floats, one host sync in all) for ``batches``; ``model`` (for
    ``"auto"``) tells whether labels are shifted (:func:`shifts_labels`)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    shifted = weighting == "auto" and shifts_labels(model)
    raw = [_batch_weight(batch, weighting, shifted) for batch in batches]
    counts = torch.stack([torch.as_tensor(r, dtype=torch.float64).cpu() for r in raw]).tolist()
    total = sum(counts)
    if total <= 0:
        raise ValueError(f"batch weights sum to {total} with weighting={weighting!r} (no labelled tokens?)")
    return [count / total for count in counts]


def default_loss(model: nn.Module, batch: Any) -> Tensor:
    """``model(**batch).loss`` for dict batches (the HF convention)."""
    if not isinstance(batch, Mapping):
        raise TypeError(
            f"loss_fn=None needs dict batches (it calls model(**batch).loss), got {type(batch).__name__}; "
            "pass loss_fn(model, batch) -> scalar tensor"
        )
    out = model(**batch)
    loss = out.get("loss") if isinstance(out, Mapping) else getattr(out, "loss", None)
    if loss is None:
        raise ValueError("model(**batch) returned no loss: put 'labels' in the batch or pass loss_fn")
    return loss


def _accepts_labels(model: nn.Module) -> bool:
    try:
        parameters = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return any(p.name == "labels" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def default_outputs(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor | None]:
    """GGN outputs: ``(model(**batch).logits, batch["labels"])`` for dict batches, ``(model(x), y)`` for
    ``(x, y)`` tuples or lists, ``(model(x), None)`` for a tensor batch. Dict batches go in whole, labels
    included (unless ``forward`` takes neither ``labels`` nor ``**kwargs``), so encoder-decoders (T5, BART)
    build their decoder inputs from the labels as their loss does;
    for causal LMs (:func:`shifts_labels`) the pair is ``(logits[..., :-1, :], labels[..., 1:])``: position t
    predicts token t + 1, as in the model's loss. Pass ``output_fn`` for anything else."""
    if isinstance(batch, Mapping):
        out = model(**(batch if _accepts_labels(model) else {k: v for k, v in batch.items() if k != "labels"}))
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", out)
        if not isinstance(logits, Tensor):
            raise ValueError("model(**batch) returned no logits tensor: pass output_fn(model, batch)")
        labels = batch.get("labels")
        if isinstance(labels, Tensor) and shifts_labels(model):
            return logits[..., :-1, :], labels[..., 1:]
        return logits, labels
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return model(batch[0]), batch[1]
    if isinstance(batch, Tensor):
        return model(batch), None
    raise TypeError(f"no default output_fn for batches of type {type(batch).__name__}: pass output_fn(model, batch)")


def iter_weighted(batches: list[Any], weights: list[float]) -> Iterable[tuple[Any, float]]:
    """Pairs (batch, weight), skipping batches of weight zero."""
    return ((batch, weight) for batch, weight in zip(batches, weights, strict=True) if weight > 0)
