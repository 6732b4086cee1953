"""Batches, default loss/output functions and the per-batch weights used to average curvature over data.

A *batch* is a tensor, a tuple (``(inputs, targets)``) or a mapping (an HF dict batch). ``data`` is one
batch or an iterable of batches (list, DataLoader, generator). Tensors, tuples and mappings count as one
batch; anything else is iterated once and materialised, because every estimator passes over the same
batches many times (a shuffling DataLoader would otherwise change the matrix between products).

Multi-batch averaging: the objective is the weighted mean L(θ) = Σ_b w_b L_b(θ) / Σ_b w_b, where L_b is
the (mean-reduced) loss of batch b. ``weighting`` chooses w_b:

* ``"examples"``: the leading dimension of the batch (its number of examples);
* ``"tokens"``: the number of labels that are not ``-100`` in ``batch["labels"]`` (dict batches);
* ``"auto"`` (default): ``"tokens"`` for dict batches with ``labels``, else ``"examples"``. For token
  classification this makes L the mean over all labelled tokens of the data, for sequence classification
  (one label per example) the mean over examples: what one big batch would give;
* ``"equal"``: w_b = 1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["LossFn", "OutputFn", "as_batches", "batch_weights", "default_loss", "default_outputs", "iter_weighted"]

LossFn = Callable[[nn.Module, Any], Tensor]
"""``loss_fn(model, batch) -> scalar Tensor`` (mean-reduced over the batch)."""
OutputFn = Callable[[nn.Module, Any], tuple[Tensor, Tensor | None]]
"""``output_fn(model, batch) -> (outputs, targets or None)``: what the GGN's likelihood sees."""

IGNORE_INDEX = -100
WEIGHTINGS = ("auto", "examples", "tokens", "equal")


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


def _batch_weight(batch: Any, weighting: str) -> Tensor | int:
    if weighting == "equal":
        return 1
    has_labels = isinstance(batch, Mapping) and isinstance(batch.get("labels"), Tensor)
    if weighting == "tokens" or (weighting == "auto" and has_labels):
        if not has_labels:
            raise ValueError('weighting="tokens" needs dict batches with a "labels" tensor')
        return (batch["labels"] != IGNORE_INDEX).sum()
    if isinstance(batch, Mapping) and has_labels:
        return batch["labels"].shape[0]
    return _first_tensor(batch).shape[0]


def batch_weights(batches: list[Any], weighting: str = "auto") -> list[float]:
    """Normalised weights w_b / Σ w_b (Python floats, one host sync in all) for ``batches``."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    raw = [_batch_weight(batch, weighting) for batch in batches]
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


def default_outputs(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor | None]:
    """GGN outputs: ``(model(**inputs).logits, batch["labels"])`` for dict batches, ``(model(x), y)`` for
    ``(x, y)`` tuples, ``(model(x), None)`` for a tensor batch. Pass ``output_fn`` for anything else (e.g. a
    causal LM, whose logits must be shifted against its labels)."""
    if isinstance(batch, Mapping):
        inputs = {key: value for key, value in batch.items() if key != "labels"}
        out = model(**inputs)
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", out)
        if not isinstance(logits, Tensor):
            raise ValueError("model(**batch) returned no logits tensor: pass output_fn(model, batch)")
        return logits, batch.get("labels")
    if isinstance(batch, tuple) and len(batch) == 2:
        return model(batch[0]), batch[1]
    if isinstance(batch, Tensor):
        return model(batch), None
    raise TypeError(f"no default output_fn for batches of type {type(batch).__name__}: pass output_fn(model, batch)")


def iter_weighted(batches: list[Any], weights: list[float]) -> Iterable[tuple[Any, float]]:
    """Pairs (batch, weight), skipping batches of weight zero."""
    return ((batch, weight) for batch, weight in zip(batches, weights, strict=True) if weight > 0)
