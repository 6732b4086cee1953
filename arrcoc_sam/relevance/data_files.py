"""Users' own relevance data from local JSONL, CSV or Parquet files, validated row by row.

Schema (one example per row; the format follows the file extension ``.jsonl``/``.json``, ``.csv``,
``.parquet``). In CSV, list fields are JSON arrays (``"[0, 1, 0]"``); ``tokens`` and ``labels`` may also be
whitespace-separated.

Text (``kind="text"``):
    ``query``: non-empty string; ``tokens``: non-empty list of strings (words);
    ``labels``: one number in [0, 1] per token (1 = relevant to the query).

Vision (``kind="vision"``):
    ``query``: non-empty string; ``relevance``: N numbers in [0, 1] (a G×G nested list is flattened);
    exactly one of ``token_features`` (N rows of C numbers) or ``image`` (an image file path, relative to the
    data file's folder; RGB, every image the same size); optional ``query_embedding`` (D numbers, else
    computed from ``query`` by an embedder). N, C, D and the image size must agree across rows.

A malformed row raises :class:`DataFileError` naming the file, the 1-based row (the line in JSONL, the
data row after the header in CSV, the row in Parquet) and the field; an empty file raises it with row 0.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

FILE_FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".parquet": "parquet"}
KINDS = ("text", "vision")


class DataFileError(ValueError):
    """A data file or one of its rows does not match the schema; ``path``, ``row`` (1-based) and ``field``."""

    def __init__(self, path: str | Path, row: int, field: str | None, message: str):
        self.path, self.row, self.field = str(path), row, field
        where = f"{path}: row {row}" + (f": field {field!r}" if field else "")
        super().__init__(f"{where}: {message}")


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``[(row_number, record)]`` of a JSONL, CSV or Parquet file."""
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataFileError(path, 0, None, f"unknown file type {path.suffix!r}; use one of {sorted(FILE_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    rows: list[tuple[int, dict[str, Any]]] = []
    with path.open(newline="", encoding="utf-8") as handle:
        if fmt == "csv":
            return list(enumerate(csv.DictReader(handle), start=1))
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataFileError(path, line_number, None, f"not valid JSON ({err.msg})") from err
            if not isinstance(record, dict):
                raise DataFileError(path, line_number, None, f"expected a JSON object, got {type(record).__name__}")
            rows.append((line_number, record))
    return rows


class _RowChecker:
    """Field validators for one row; each failure raises a :class:`DataFileError` at that row and field."""

    def __init__(self, path: Path, row: int, record: dict[str, Any]):
        self.path, self.row, self.record = path, row, record

    def fail(self, field: str | None, message: str) -> DataFileError:
        return DataFileError(self.path, self.row, field, message)

    def get(self, field: str, required: bool = True) -> Any:
        value = self.record.get(field)
        if isinstance(value, str) and not value.strip() and field != "query":
            value = None
        if value is None and required:
            raise self.fail(field, "missing")
        return value

    def string(self, field: str) -> str:
        value = self.get(field)
        if not isinstance(value, str) or not value.strip():
            raise self.fail(field, f"expected a non-empty string, got {value!r}")
        return value

    def _list(self, field: str, split_words: bool) -> list:
        value = self.get(field)
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                try:
                    value = json.loads(text)
                except json.JSONDecodeError as err:
                    raise self.fail(field, f"not a valid JSON array ({err.msg})") from err
            elif split_words:
                value = text.split()
        if isinstance(value, np.ndarray):
            value = value.tolist()
        if not isinstance(value, (list, tuple)) or not value:
            raise self.fail(field, f"expected a non-empty list, got {value!r}")
        return list(value)

    def words(self, field: str) -> list[str]:
        value = self._list(field, split_words=True)
        bad = [i for i, w in enumerate(value) if not isinstance(w, str) or not w.strip()]
        if bad:
            raise self.fail(field, f"item {bad[0]} is {value[bad[0]]!r}, expected a non-empty string")
        return value

    def numbers(self, field: str, unit_interval: bool, split_words: bool = False) -> np.ndarray:
        value = self._list(field, split_words)
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise self.fail(field, f"expected numbers (a rectangular nested list), got {str(value)[:80]}") from err
        if not np.all(np.isfinite(array)):
            raise self.fail(field, "contains NaN or infinite values")
        if unit_interval and (array.min() < 0 or array.max() > 1):
            raise self.fail(field, f"values must lie in [0, 1], got min {array.min():g}, max {array.max():g}")
        return array

    def same(self, field: str, name: str, value: Any, expected: dict[str, Any]) -> None:
        """Check ``value`` (a size) equals the one the first row set for ``name``."""
        first = expected.setdefault(name, value)
        if value != first:
            raise self.fail(field, f"{name} is {value}, but earlier rows have {first}")


def _text_row(check: _RowChecker) -> dict[str, Any]:
    query = check.string("query")
    tokens = check.words("tokens")
    labels = check.numbers("labels", unit_interval=True, split_words=True)
    if labels.ndim != 1 or labels.size != len(tokens):
        raise check.fail("labels", f"expected one label per token ({len(tokens)}), got shape {labels.shape}")
    return {"query": query, "tokens": tokens, "labels": labels.tolist()}


def _load_image(check: _RowChecker, base: Path) -> np.ndarray:
    from PIL import Image

    path = base / check.string("image")
    try:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as err:
        raise check.fail("image", f"cannot read image {str(path)!r} ({err})") from err
    return pixels.transpose(2, 0, 1)


def _vision_row(check: _RowChecker, base: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"query": check.string("query")}
    relevance = check.numbers("relevance", unit_interval=True).reshape(-1)
    check.same("relevance", "N (relevance length)", relevance.size, sizes)
    out["labels"] = relevance.astype(np.float32)
    has_features = check.get("token_features", required=False) is not None
    has_image = check.get("image", required=False) is not None
    if has_features == has_image:
        raise check.fail("token_features", "give exactly one of 'token_features' and 'image'")
    if has_features:
        features = check.numbers("token_features", unit_interval=False)
        if features.ndim != 2 or features.shape[0] != relevance.size:
            raise check.fail(
                "token_features", f"expected [N={relevance.size}, C] numbers, got shape {features.shape}"
            )
        check.same("token_features", "C (channels)", features.shape[1], sizes)
        out["token_features"] = features.astype(np.float32)
    else:
        pixels = _load_image(check, base)
        check.same("image", "image size", tuple(pixels.shape[1:]), sizes)
        out["pixel_values"] = pixels
    if check.get("query_embedding", required=False) is not None:
        embedding = check.numbers("query_embedding", unit_interval=False)
        if embedding.ndim != 1:
            raise check.fail("query_embedding", f"expected a flat list of D numbers, got shape {embedding.shape}")
        check.same("query_embedding", "D (query_embedding length)", embedding.size, sizes)
        out["query_embedding"] = embedding.astype(np.float32)
    return out


def read_relevance_file(path: str | Path, kind: str) -> list[dict[str, Any]]:
    """Validate every row of one file and return the examples (see the module docstring for the schema)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise DataFileError(path, 0, None, "the file holds no examples (empty dataset)")
    sizes: dict[str, Any] = {}
    examples = []
    for row, record in rows:
        check = _RowChecker(path, row, record)
        examples.append(_text_row(check) if kind == "text" else _vision_row(check, path.parent, sizes))
    if kind == "vision":
        with_embedding = sum("query_embedding" in example for example in examples)
        if 0 < with_embedding < len(examples):
            row = next(r for (r, _), ex in zip(rows, examples) if "query_embedding" not in ex)
            raise DataFileError(path, row, "query_embedding", "missing, but other rows give one: give it in all or none")
    return examples


def load_relevance_files(
    files: dict[str, str | Path],
    kind: str,
    query_embedder: Callable[[Sequence[str]], np.ndarray] | str = "minilm",
):
    """Load ``{split: path}`` into a ``datasets.DatasetDict``.

    Text splits have columns ``query``, ``tokens``, ``labels`` (tokenise with
    :func:`~arrcoc_sam.relevance.collators.encode_token_relevance_batch`). Vision splits have ``query``,
    ``labels`` [N], ``query_embedding`` [D] and ``token_features`` [N, C] or ``pixel_values`` uint8
    [3, H, W], formatted as numpy. Missing query embeddings come from ``query_embedder``: ``"minilm"``,
    ``"hash"`` (see :mod:`arrcoc_sam.relevance.scenes`) or a callable ``list[str] -> [n, D]``.
    """
    from datasets import Dataset, DatasetDict

    if not files:
        raise ValueError("files must name at least one split, got an empty mapping")
    splits = {}
    for split, path in files.items():
        examples = read_relevance_file(path, kind)
        if kind == "vision" and "query_embedding" not in examples[0]:
            embedder = _resolve_embedder(query_embedder)
            embeddings = np.asarray(embedder([example["query"] for example in examples]), dtype=np.float32)
            for example, embedding in zip(examples, embeddings):
                example["query_embedding"] = embedding
        dataset = Dataset.from_list(examples)
        splits[split] = dataset.with_format("numpy") if kind == "vision" else dataset
    return DatasetDict(splits)


def _resolve_embedder(query_embedder) -> Callable[[Sequence[str]], np.ndarray]:
    if callable(query_embedder):
        return query_embedder
    from arrcoc_sam.relevance.scenes import HashQueryEmbedder, MiniLMQueryEmbedder

    factories = {"minilm": MiniLMQueryEmbedder, "hash": HashQueryEmbedder}
    if query_embedder not in factories:
        raise ValueError(f"query_embedder must be 'minilm', 'hash' or a callable, got {query_embedder!r}")
    return factories[query_embedder]()

