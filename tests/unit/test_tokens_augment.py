"""Dai & Adel augmentation on hand-made sentences: mention replacement (other lengths, tags rebuilt),
label-wise token replacement (tags kept), seeded and train-only pools."""

from __future__ import annotations

import numpy as np

from tasks.tokens.augment import (
    augment_rows,
    mention_pool,
    mention_replacement,
    token_pool,
    token_replacement,
)
from tasks.tokens.config import TokenAugmentConfig
from tasks.tokens.tags import bio_errors, entity_spans

TOKENS = [["Ann", "Lee", "flew", "to", "Paris"], ["Bob", "likes", "New", "York", "City"], ["no", "entity", "here"]]
TAGS = [["B-PER", "I-PER", "O", "O", "B-LOC"], ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC"], ["O", "O", "O"]]


def test_pools_come_from_the_sentences_given() -> None:
    assert mention_pool(TOKENS, TAGS) == {"PER": [("Ann", "Lee"), ("Bob",)], "LOC": [("Paris",), ("New", "York", "City")]}
    assert token_pool(TOKENS, TAGS)["I-LOC"] == ["York", "City"]


def test_mention_replacement_with_other_lengths_rebuilds_the_tags() -> None:
    pool = {"PER": [("Bob",)], "LOC": [("New", "York", "City")]}
    tokens, tags = mention_replacement(TOKENS[0], TAGS[0], pool, p=1.0, rng=np.random.default_rng(0))
    assert tokens == ["Bob", "flew", "to", "New", "York", "City"]
    assert tags == ["B-PER", "O", "O", "B-LOC", "I-LOC", "I-LOC"]
    assert len(tokens) == len(tags) and bio_errors(tags) == []
    assert [k for k, _, _ in entity_spans(tags)] == ["PER", "LOC"]


def test_mention_replacement_keeps_adjacent_entities_apart_and_leaves_o_alone() -> None:
    tokens, tags = mention_replacement(["A", "B"], ["B-PER", "B-PER"], {"PER": [("X", "Y")]}, 1.0, np.random.default_rng(1))
    assert tokens == ["X", "Y", "X", "Y"] and tags == ["B-PER", "I-PER", "B-PER", "I-PER"]
    assert mention_replacement(TOKENS[2], TAGS[2], {"PER": [("X",)]}, 1.0, np.random.default_rng(1)) == (TOKENS[2], TAGS[2])
    # p = 0 and a type missing from the pool change nothing
    assert mention_replacement(TOKENS[0], TAGS[0], {"PER": [("X",)]}, 1e-12, np.random.default_rng(1))[0] == TOKENS[0]


def test_token_replacement_draws_tokens_of_the_same_tag() -> None:
    pool = token_pool(TOKENS, TAGS)
    tokens, tags = token_replacement(TOKENS[1], TAGS[1], pool, 1.0, np.random.default_rng(3))
    assert tags == TAGS[1]
    for token, tag in zip(tokens, tags):
        assert token in pool[tag]


def test_augment_rows_is_seeded_flags_ids_and_skips_unchangeable_copies() -> None:
    cfg = TokenAugmentConfig(enabled=True, copies=2, p=1.0, operations=["mention_replacement"], seed=7)
    first = augment_rows(["a", "b", "c"], TOKENS, TAGS, cfg)
    assert first == augment_rows(["a", "b", "c"], TOKENS, TAGS, cfg)
    ids, tokens, tags, counts = first
    assert set(ids) <= {"a#aug1", "a#aug2", "b#aug1", "b#aug2"}  # "c" has no entity to replace
    assert counts["unchanged"] == 2 + (4 - len(ids))
    for t, g in zip(tokens, tags):
        assert len(t) == len(g) and bio_errors(g) == []
    other = augment_rows(["a", "b", "c"], TOKENS, TAGS, cfg.model_copy(update={"seed": 8}))
    assert other[1] != tokens or other[0] != ids
