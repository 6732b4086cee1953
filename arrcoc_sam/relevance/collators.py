"""Text token-relevance encoding (query/text pairs with word-label alignment) and the padding collator.

The vision collator lives in :mod:`arrcoc_sam.relevance.scenes`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

IGNORE_INDEX = -100


def encode_token_relevance(
    tokenizer,
    query: str,
    tokens: Sequence[str],
    labels: Sequence[float] | None = None,
    max_length: int = 128,
) -> dict[str, list]:
    """Encode one (query, words, word labels) example as ``[CLS] query [SEP] words [SEP]``.

    Each word's label goes to its first word piece; its other pieces, the query and special tokens get
    ``-100``. Words cut by ``max_length`` (the text is truncated, never the query) lose their labels. A word the
    tokenizer deletes (a zero-width space, a soft hyphen, a lone combining mark) is encoded as the unknown token
    instead, so it keeps its label (with a tokenizer that has no unknown token it loses it, as a cut word does). Needs a fast tokenizer (``word_ids``/``sequence_ids``).

    Raises:
        MaxLengthTooShort: (a ValueError) ``max_length`` leaves no room for one word piece of the text after the query and special
            tokens.

    Returns lists of length L: ``input_ids, attention_mask, token_type_ids`` (when the tokenizer makes them),
    ``query_mask, text_mask`` (0/1) and, with ``labels``, ``labels`` (floats, -100 = no target).
    """
    if labels is not None and len(labels) != len(tokens):
        raise ValueError(f"labels must have one entry per token: {len(labels)} labels for {len(tokens)} tokens")
    words = query.split()
    query_pieces = len(tokenizer(words, is_split_into_words=True, add_special_tokens=False)["input_ids"])
    needed = query_pieces + tokenizer.num_special_tokens_to_add(pair=True) + 1
    if tokens and max_length < needed:
        raise MaxLengthTooShort(f"max_length={max_length} is too short for the query {query!r}: with the special tokens it "
                         f"needs at least {needed} word pieces to keep one of the text's (the query is never cut)")
    encoding = _encode(tokenizer, words, list(tokens), max_length)
    vanished = _vanished_words(encoding, len(tokens), max_length)
    if vanished and tokenizer.unk_token is not None:
        tokens = [tokenizer.unk_token if i in vanished else word for i, word in enumerate(tokens)]
        encoding = _encode(tokenizer, words, tokens, max_length)
    sequence_ids = encoding.sequence_ids()
    word_ids = encoding.word_ids()
    out: dict[str, list] = {key: list(value) for key, value in encoding.items()}
    out["query_mask"] = [int(s == 0) for s in sequence_ids]
    out["text_mask"] = [int(s == 1) for s in sequence_ids]
    if labels is not None:
        aligned: list[float] = []
        previous = None
        for seq, word in zip(sequence_ids, word_ids):
            first_piece = seq == 1 and word is not None and word != previous
            aligned.append(float(labels[word]) if first_piece else float(IGNORE_INDEX))
            previous = word if seq == 1 else None
        out["labels"] = aligned
    return out


class MaxLengthTooShort(ValueError):
    """:func:`encode_token_relevance`'s ``max_length`` leaves no room for the text after a query."""


def _encode(tokenizer, query_words: list[str], tokens: list[str], max_length: int):
    return tokenizer(query_words, tokens, is_split_into_words=True, truncation="only_second", max_length=max_length)


def _vanished_words(encoding, num_words: int, max_length: int) -> set[int]:
    """Indices of text words with no word piece although truncation did not reach them."""
    kept = {word for seq, word in zip(encoding.sequence_ids(), encoding.word_ids()) if seq == 1}
    reached = num_words if len(encoding["input_ids"]) < max_length else max(kept, default=-1) + 1
    return set(range(reached)) - kept


def encode_token_relevance_batch(batch: dict[str, list], tokenizer, max_length: int = 128) -> dict[str, list]:
    """``datasets.map(batched=True)`` form of :func:`encode_token_relevance` over columns
    ``query``, ``tokens`` and ``labels``."""
    encoded = [
        encode_token_relevance(tokenizer, query, tokens, labels, max_length)
        for query, tokens, labels in zip(batch["query"], batch["tokens"], batch["labels"])
    ]
    return {key: [example[key] for example in encoded] for key in encoded[0]}


class TextRelevanceCollator:
    """Pads encoded examples (:func:`encode_token_relevance`) to the longest in the batch.

    Returns ``[B, L]`` tensors: ``input_ids`` (padded with the tokenizer's pad id), ``attention_mask``,
    ``token_type_ids``, ``query_mask``/``text_mask`` (bool), and ``labels`` (float32, padded with -100).
    Other keys are dropped.
    """

    _PAD_VALUES = {"attention_mask": 0, "token_type_ids": 0, "query_mask": 0, "text_mask": 0, "labels": IGNORE_INDEX}

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        if tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token (pad_token_id is None)")
        self.pad_values = {"input_ids": tokenizer.pad_token_id, **self._PAD_VALUES}
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("cannot collate an empty list of examples")
        length = max(len(example["input_ids"]) for example in examples)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch: dict[str, torch.Tensor] = {}
        for key, pad in self.pad_values.items():
            if key not in examples[0]:
                continue
            rows = [list(example[key]) + [pad] * (length - len(example[key])) for example in examples]
            dtype = torch.float32 if key == "labels" else torch.long
            batch[key] = torch.tensor(rows, dtype=dtype)
        for key in ("query_mask", "text_mask"):
            if key in batch:
                batch[key] = batch[key].bool()
        return batch


class TokenFeatureCollator:
    """Batches vision rows that carry precomputed token features instead of images.

    Returns ``token_features`` float32 ``[B, N, C]``, ``query_embedding`` ``[B, D]`` and ``labels`` ``[B, N]``
    (images go through :class:`~arrcoc_sam.relevance.scenes.SceneCollator`).
    """

    def __call__(self, rows: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        return {
            key: torch.stack([torch.as_tensor(row[key], dtype=torch.float32) for row in rows])
            for key in ("token_features", "query_embedding", "labels")
        }
