"""Batches, default loss/output functions and the per-batch weights used to average curvature over data.

``data`` is one batch or an iterable of batches. One batch is

* a tensor (``loss_fn(model, x)``);
* a tuple, or a list whose items are *all* tensors: ``(inputs, targets)`` or ``[inputs, targets]``, what a
  ``DataLoader(TensorDataset(x, y))`` yields (``next(iter(loader))`` is the list ``[x, y]``);
* a mapping (an HF dict batch).

Anything else is an iterable of batches: a list of tuples/lists/dicts, a DataLoader, a generator. It is
iterated once and materialised, because every estimator passes over the same batches many times (a
shuffling DataLoader would otherwise change the matrix between products). A list of tensors ``[x1, x2]`` is
one batch of two tensors, so pass several *tensor* batches as an iterator: ``iter([x1, x2])``, a generator,
or a DataLoader over a tensor dataset.

Multi-batch averaging: the objective is the weighted mean L(θ) = Σ_b w_b L_b(θ) / Σ_b w_b, where L_b is
the (mean-reduced) loss of batch b. ``weighting`` chooses w_b:

* ``"examples"``: the number of examples of the batch, read as the leading dimension of one tensor: ``labels``
  for a dict batch that has it, else the *first tensor in the dict's key order* (put a per-example tensor
  first, e.g. ``input_ids``, not a shared scalar or a ``[1, ...]`` constant); the first tensor of a tuple or
  list batch; the tensor itself for a tensor batch. A 0-dim tensor there is refused (it has no examples to
  count);
* ``"tokens"``: the number of labels that are not ``-100`` in ``batch["labels"]`` (dict batches);
* ``"shifted_tokens"``: the number of ``batch["labels"][..., 1:]`` that are not ``-100``: the targets a
  causal LM's loss averages over (position t predicts label t + 1, so the first label of a row is unused);
* ``"auto"`` (default): for dict batches with ``labels``, ``"shifted_tokens"`` when the model is an HF
  causal LM (:func:`shifts_labels`) and ``"tokens"`` otherwise; else ``"examples"``. For token
  classification this makes L the mean over all labelled tokens of the data, for a causal LM the mean over
  all predicted tokens, for sequence classification (one label per example) the mean over examples: what
  one big mean-reduced batch would give. Pass ``weighting`` explicitly for a loss that averages differently;
* ``"equal"``: w_b = 1, i.e. L is the plain average of the batch means (batches of different sizes then
  count alike; for sum-reduced losses it is the big batch's sum divided by the number of batches).
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
    "is_batch",
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


def is_batch(data: Any) -> bool:
    """Whether ``data`` is one batch (module docstring): a tensor, a tuple, a mapping, or a non-empty list whose
    items are all tensors (a ``DataLoader(TensorDataset(...))`` batch)."""
    if isinstance(data, (Tensor, tuple, Mapping)):
        return True
    return isinstance(data, list) and bool(data) and all(isinstance(item, Tensor) for item in data)


def as_batches(data: Any) -> list[Any]:
    """One batch (:func:`is_batch`) or an iterable of batches -> a non-empty list of batches."""
    if is_batch(data):
        return [data]
    try:
        batches = list(data)
    except TypeError as err:
        raise TypeError(
            f"data must be a batch (tensor, tuple, list of tensors, dict) or an iterable of batches, got {type(data).__name__}"
        ) from err
    if not batches:
        raise ValueError("data holds no batches")
    return batches


def _count_examples(batch: Any, index: int) -> int:
    """The leading dimension of the tensor that counts the examples of batch ``index`` (module docstring,
    ``"examples"``)."""
    if isinstance(batch, Mapping) and isinstance(batch.get("labels"), Tensor):
        items = [("labels", batch["labels"])]
    elif isinstance(batch, Mapping):
        items = list(batch.items())
    elif isinstance(batch, (tuple, list)):
        items = list(enumerate(batch))
    else:
        items = [(None, batch)]
    for key, item in items:
        if isinstance(item, Tensor):
            if item.ndim == 0:
                where = f"batch {index}" if key is None else f"batch {index}[{key!r}]"
                raise ValueError(
                    f"{where} is a 0-dim tensor, but weighting by examples ('examples', or 'auto' without labels) "
                    "counts them along its leading dimension: give it a batch dimension (e.g. x[None]) or pass "
                    "weighting='equal'"
                )
            return item.shape[0]
    raise TypeError(f"batch {index} (a {type(batch).__name__}) holds no tensor to count examples from")


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


def _batch_weight(batch: Any, weighting: str, shifted: bool, index: int) -> Tensor | int:
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
    return _count_examples(batch, index)


def batch_weights(batches: list[Any], weighting: str = "auto", model: nn.Module | None = None) -> list[float]:
    """Normalised weights w_b / Σ w_b (Python floats, one host sync in all) for ``batches``; ``model`` (for
    ``"auto"``) tells whether labels are shifted (:func:`shifts_labels`)."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    shifted = weighting == "auto" and shifts_labels(model)
    raw = [_batch_weight(batch, weighting, shifted, index) for index, batch in enumerate(batches)]
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
