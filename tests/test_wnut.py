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


def test_repeated_tweets_never_straddle_splits_and_split_sizes_stay_exact(tweets):
    from arrcoc_sam.relevance.wnut import load_wnut16_relevance, tweet_text_key

    data = load_wnut16_relevance(seed=0)
    texts = {name: {tuple(t.lower() for t in row) for row in data[name]["tokens"]} for name in data}
    assert not texts["train"] & texts["heldout"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["heldout"]
    tweet_counts = {name: len(set(data[name]["tweet_id"])) for name in data}
    assert tweet_counts == {"train": 1894, "validation": 200, "heldout": 300}
    keys = [tweet_text_key(t) for t in tweets]
    assert len(set(keys)) == WNUT16_NUM_TWEETS - 99  # the pinned file's repeated tweets


def test_grouped_splits_keep_each_group_whole_and_singletons_match_the_ungrouped_split():
    groups = [i // 3 for i in range(60)]  # 20 groups of three
    splits = wnut16_splits(60, seed=1, validation_tweets=7, heldout_tweets=10, groups=groups)
    owner = {i: name for name, ids in splits.items() for i in ids}
    assert sorted(owner) == list(range(60))
    assert all(owner[i] == owner[3 * (i // 3)] for i in range(60))
    assert (len(splits["heldout"]), len(splits["validation"])) == (9, 6)  # whole groups, never over the ask
    assert wnut16_splits(60, seed=1, validation_tweets=7, heldout_tweets=10, groups=range(60)) == \
        wnut16_splits(60, seed=1, validation_tweets=7, heldout_tweets=10)
    with pytest.raises(ValueError, match="one key per tweet"):
        wnut16_splits(60, validation_tweets=7, heldout_tweets=10, groups=[0] * 59)



def test_tweet_text_keys_ignore_case_so_case_variants_of_a_tweet_share_a_split():
    from arrcoc_sam.relevance.wnut import Tweet, tweet_text_key

    upper, lower = Tweet(("RT", "Go", "LAKERS"), ("O", "O", "B-sportsteam")), Tweet(("rt", "go", "lakers"), ("O",) * 3)
    assert tweet_text_key(upper) == tweet_text_key(lower) == ("rt", "go", "lakers")
    splits = wnut16_splits(4, seed=0, validation_tweets=1, heldout_tweets=1,
                           groups=[tweet_text_key(t) for t in (upper, lower, Tweet(("a",), ("O",)), Tweet(("b",), ("O",)))])
    owner = {i: name for name, ids in splits.items() for i in ids}
    assert owner[0] == owner[1]


def test_a_file_without_a_final_separator_line_keeps_its_last_tweet(tmp_path):
    import hashlib

    from arrcoc_sam.relevance.wnut import Tweet

    path = tmp_path / "ner.txt"
    path.write_bytes(b"Go\tO\nLakers\tB-sportsteam\n\t\nhi\tO\nParis\tB-geo-loc")  # separator only between tweets
    tweets = read_wnut16(path, sha256=hashlib.sha256(path.read_bytes()).hexdigest())
    assert tweets == [Tweet(("Go", "Lakers"), ("O", "B-sportsteam")), Tweet(("hi", "Paris"), ("O", "B-geo-loc"))]


@pytest.mark.parametrize("seed", [0, 5])
def test_shuffled_tweets_are_dealt_to_heldout_first_then_validation(seed):
    """The documented order: the seed's shuffle of the tweets (each its own group), the first ``heldout_tweets`` to
    held-out, the next ``validation_tweets`` to validation, the rest to train."""
    import random

    order = list(range(50))
    random.Random(seed).shuffle(order)
    splits = wnut16_splits(50, seed=seed, validation_tweets=7, heldout_tweets=10)
    assert splits == {"train": sorted(order[17:]), "validation": sorted(order[10:17]), "heldout": sorted(order[:10])}


def test_absent_entity_types_are_drawn_at_random_per_tweet_not_taken_in_a_fixed_order(tweets):
    """With one negative per tweet, 60 tweets draw it from their 8-9 absent types: a fixed choice (the first absent
    type) would name one or two types in all; a uniform draw names nearly all ten."""
    ids = list(range(60))
    negatives = [e["entity_type"] for e in relevance_examples(tweets, ids, negatives_per_tweet=1, seed=0)
                 if not any(e["labels"])]
    assert len(negatives) == 60 and len(set(negatives)) >= 6
