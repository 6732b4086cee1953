"""Users' own relevance data from local JSONL, CSV or Parquet files, validated row by row.

Schema (one example per row; the format follows the file extension ``.jsonl``, ``.json`` (JSON lines, or
one JSON array of row objects), ``.csv``, ``.parquet``). Text files are UTF-8 (a byte-order mark is
allowed). In CSV, list fields are JSON arrays (``"[0, 1, 0]"``); ``tokens`` and ``labels`` may also be
whitespace-separated.

Text (``kind="text"``):
    ``query``: non-empty string; ``tokens``: non-empty list of strings (words);
    ``labels``: one number in [0, 1] per token (1 = relevant to the query).

Vision (``kind="vision"``):
    ``query``: non-empty string; ``relevance``: N numbers in [0, 1] (a G×G nested list is flattened);
    exactly one of ``token_features`` (N rows of C numbers) or ``image`` (an image file path, relative to the
    data file's folder; RGB, every image the same size); optional ``query_embedding`` (D numbers, else
    computed from ``query`` by an embedder). N, C, D, the image size, the input kind (``token_features`` or
    ``image``) and whether ``query_embedding`` is given must agree across all rows of all files of a run
    (:func:`load_relevance_files` checks every file before building any dataset).

A malformed row raises :class:`DataFileError` naming the file, the 1-based row (the line in JSONL, the
item of a ``.json`` array, the data row after the header in CSV, the row in Parquet) and the field; an empty file raises it with row 0.
"""

from __future__ import annotations

import csv
import io
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


def _decode(path: Path, header_lines: int = 0) -> str:
    """The text of a UTF-8 file (a leading byte-order mark dropped); other encodings raise DataFileError at the
    row of the offending line (``header_lines`` lines precede row 1)."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        message = f"not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); save the file as UTF-8"
        raise DataFileError(path, max(line - header_lines, 0), None, message) from err


def _json_records(path: Path, text: str) -> list[tuple[int, dict[str, Any]]] | None:
    """The rows of a ``.json`` file holding one JSON array of objects (or one object); None if it is JSON lines."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        return None
    records = document if isinstance(document, list) else [document]
    for number, record in enumerate(records, start=1):
        if not isinstance(record, dict):
            raise DataFileError(path, number, None, f"expected a JSON object, got {type(record).__name__}")
    return list(enumerate(records, start=1))


def _read_rows(path: Path) -> list[tuple[int, dict[str, Any]]]:
    """``[(row_number, record)]`` of a JSONL/JSON, CSV or Parquet file."""
    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataFileError(path, 0, None, f"unknown file type {path.suffix!r}; use one of {sorted(FILE_FORMATS)}")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        return list(enumerate(pq.read_table(path).to_pylist(), start=1))
    text = _decode(path, header_lines=1 if fmt == "csv" else 0)
    if fmt == "csv":
        return list(enumerate(csv.DictReader(io.StringIO(text, newline="")), start=1))
    if path.suffix.lower() == ".json" and text.strip():
        records = _json_records(path, text)
        if records is not None:
            return records
    rows: list[tuple[int, dict[str, Any]]] = []
    for line_number, line in enumerate(text.split("\n"), start=1):  # not splitlines(): U+2028 may be in a string
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
        raw = self.get(field)
        split = split_words and isinstance(raw, str) and not raw.strip().startswith("[")  # "1 0.5 0" (CSV)
        value = self._list(field, split_words)
        text = None if split else _first_text(value)
        if text is not None:  # np.asarray would read "0.5" as 0.5 without a word
            raise self.fail(field, f"expected numbers, got text such as {text!r} (quoted numbers?)")
        try:
            array = np.asarray(value, dtype=np.float64)
        except (TypeError, ValueError) as err:
            raise self.fail(field, f"expected numbers (a rectangular nested list), got {str(value)[:80]}") from err
        if array.size == 0:
            raise self.fail(field, f"expected numbers, got only empty lists {str(value)[:80]}")
        if not np.all(np.isfinite(array)):
            raise self.fail(field, "contains NaN or infinite values")
        if unit_interval and (array.min() < 0 or array.max() > 1):
            raise self.fail(field, f"values must lie in [0, 1], got min {array.min():g}, max {array.max():g}")
        return array

    def same(self, field: str, name: str, value: Any, expected: dict[str, tuple[Any, Path, int]],
             template: str = "{name} is {value}, but {where} {first}") -> None:
        """Check ``value`` (a size or kind) equals the one the first row (of this or an earlier file) set.

        ``expected`` maps ``name`` to ``(value, path, row)`` of the row that set it; share one dict between
        the files of a run to check them against each other. ``template`` words the complaint.
        """
        first, path, row = expected.setdefault(name, (value, self.path, self.row))
        if value == first:
            return
        where = "earlier rows have" if path == self.path else f"{path} (row {row}) has"
        detail = template.format(name=name, value=value, first=first, where=where)
        if path != self.path:
            detail += "; every file of a run (train, validation, held-out) must agree"
        raise self.fail(field, detail)


def _text_row(check: _RowChecker) -> dict[str, Any]:
    query = check.string("query")
    tokens = check.words("tokens")
    labels = check.numbers("labels", unit_interval=True, split_words=True)
    if labels.ndim != 1 or labels.size != len(tokens):
        raise check.fail("labels", f"expected one label per token ({len(tokens)}), got shape {labels.shape}")
    return {"query": query, "tokens": tokens, "labels": labels.tolist()}


def _load_image(check: _RowChecker, base: Path) -> np.ndarray:
    from PIL import Image, ImageOps

    path = base / check.string("image")
    try:
        with Image.open(path) as image:
            image = ImageOps.exif_transpose(image)  # as a viewer shows it, where its labels were drawn
            pixels = _rgb8(image)
    except (OSError, ValueError) as err:
        raise check.fail("image", f"cannot read image {str(path)!r} ({err})") from err
    return pixels.transpose(2, 0, 1)


def _rgb8(image) -> np.ndarray:
    """``[H, W, 3]`` uint8 of a PIL image. Alpha is dropped (transparent pixels keep their stored colour).
    16-bit images (modes I;16*, and I, as which older Pillow opens 16-bit files) are scaled to 8 bits
    (``convert("RGB")`` would clip them at 255, a white image), whatever their own maximum, so that one dataset's
    images share one scale; values outside 0..65535 and float images (mode F) are refused (ValueError)."""
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.int64)
        if values.min() < 0 or values.max() > 65535:
            raise ValueError(f"mode {image.mode} pixels span {values.min()}..{values.max()}, outside 16-bit 0..65535")
        gray = np.round(values / 257.0).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=-1)
    if image.mode == "F":
        raise ValueError("mode F (32-bit float) images have no fixed range: save 8- or 16-bit images")
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _vision_row(check: _RowChecker, base: Path, sizes: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"query": check.string("query")}
    relevance = check.numbers("relevance", unit_interval=True).reshape(-1)
    check.same("relevance", "N (relevance length)", relevance.size, sizes)
    out["labels"] = relevance.astype(np.float32)
    has_features = check.get("token_features", required=False) is not None
    has_image = check.get("image", required=False) is not None
    if has_features == has_image:
        raise check.fail("token_features", "give exactly one of 'token_features' and 'image'")
    kind = "token_features" if has_features else "image"
    check.same(kind, "input", kind, sizes, template="this row gives {value!r}, but {where} {first!r}")
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
    has_embedding = check.get("query_embedding", required=False) is not None
    check.same("query_embedding", "query_embedding given", has_embedding, sizes,
               template=("given, but {where} none" if has_embedding else "missing, but {where} one")
               + ": give it in all or none (a computed embedding lives in another space than yours)")
    if has_embedding:
        embedding = check.numbers("query_embedding", unit_interval=False)
        if embedding.ndim != 1:
            raise check.fail("query_embedding", f"expected a flat list of D numbers, got shape {embedding.shape}")
        check.same("query_embedding", "D (query_embedding length)", embedding.size, sizes)
        out["query_embedding"] = embedding.astype(np.float32)
    return out


def read_relevance_file(path: str | Path, kind: str,
                        sizes: dict[str, tuple[Any, Path, int]] | None = None) -> list[dict[str, Any]]:
    """Validate every row of one file and return the examples (see the module docstring for the schema).

    ``sizes``: vision sizes and kinds already set by earlier files of the run (filled in by this call), so
    that this file is checked against them; by default the file is checked against itself only.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    path = Path(path)
    rows = _read_rows(path)
    if not rows:
        raise DataFileError(path, 0, None, "the file holds no examples (empty dataset)")
    sizes = {} if sizes is None else sizes
    examples = []
    for row, record in rows:
        check = _RowChecker(path, row, record)
        examples.append(_text_row(check) if kind == "text" else _vision_row(check, path.parent, sizes))
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
    sizes: dict[str, tuple[Any, Path, int]] = {}  # shared: every file is checked against the earlier ones
    read = {split: read_relevance_file(path, kind, sizes) for split, path in files.items()}
    splits, embedder = {}, None
    for split, examples in read.items():
        if kind == "vision" and "query_embedding" not in examples[0]:
            embedder = embedder or _resolve_embedder(query_embedder)
            try:
                embeddings = np.asarray(embedder([example["query"] for example in examples]), dtype=np.float32)
            except ValueError as error:  # a query with nothing to embed
                raise ValueError(f"{files[split]}: {error}") from error
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


def _first_text(value: Any) -> str | None:
    """The first string in a nested list of ``value`` (depth first), or None."""
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_text(item)
            if found is not None:
                return found
    return None
