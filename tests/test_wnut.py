"""WNUT-16 loading: pinned checksum, parsing, disjoint seeded splits, query-conditioned labels."""

from __future__ import annotations

import pytest

from arrcoc_sam.relevance.wnut import (
    ENTITY_QUERIES,
    WNUT16_NUM_TWEETS,
    WnutChecksumError,
    read_wnut16,
    relevance_examples,
    wnut16_path,
    wnut16_splits,
)


@pytest.fixture(scope="module")
def tweets():
    return read_wnut16()


def test_the_pinned_file_parses_to_the_documented_counts(tweets):
    assert len(tweets) == WNUT16_NUM_TWEETS
    assert sum(len(t.tokens) for t in tweets) == 46469
    assert set().union(*(t.entity_types() for t in tweets)) == set(ENTITY_QUERIES)
    assert all(len(t.tokens) == len(t.tags) for t in tweets)


def test_a_changed_file_fails_the_sha256_check(tmp_path):
    data = bytearray(wnut16_path().read_bytes())
    data[10] ^= 1
    changed = tmp_path / "ner.txt"
    changed.write_bytes(bytes(data))
    with pytest.raises(WnutChecksumError, match=r"ner\.txt: sha256 is [0-9a-f]{64}, expected 8573ac2f"):
        read_wnut16(changed)


def test_splits_are_disjoint_cover_every_tweet_and_depend_on_the_seed():
    splits = wnut16_splits(seed=3, validation_tweets=200, heldout_tweets=300)
    sets = {name: set(ids) for name, ids in splits.items()}
    assert len(sets["validation"]) == 200 and len(sets["heldout"]) == 300
    assert not (sets["train"] & sets["validation"] or sets["train"] & sets["heldout"]
                or sets["validation"] & sets["heldout"])
    assert sets["train"] | sets["validation"] | sets["heldout"] == set(range(WNUT16_NUM_TWEETS))
    assert wnut16_splits(seed=3) == splits
    assert wnut16_splits(seed=4)["heldout"] != splits["heldout"]
    with pytest.raises(ValueError, match="must leave training tweets"):
        wnut16_splits(validation_tweets=2000, heldout_tweets=394)


def test_examples_mark_exactly_the_queried_entity_type(tweets):
    ids = [i for i, t in enumerate(tweets) if len(t.entity_types()) >= 2][:20]
    examples = relevance_examples(tweets, ids, negatives_per_tweet=2, seed=0)
    for example in examples:
        tags = tweets[example["tweet_id"]].tags
        assert example["query"] == ENTITY_QUERIES[example["entity_type"]]
        assert example["labels"] == [int(tag[2:] == example["entity_type"]) for tag in tags]
    per_tweet = {i: [e for e in examples if e["tweet_id"] == i] for i in ids}
    for i, group in per_tweet.items():
        present = tweets[i].entity_types()
        positives = {e["entity_type"] for e in group if any(e["labels"])}
        negatives = [e for e in group if not any(e["labels"])]
        assert positives == present
        assert len(negatives) == 2 and all(e["entity_type"] not in present for e in negatives)
