"""Augment stage: EDA operations, determinism, originals kept, re-encoding, pass-through."""

from __future__ import annotations

import json
import random
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from tasks.core.store import ArtifactStore, StageKey, StageRef
from tasks.registry import Recipe, recipe_from_dict
from tasks.text import augment
from tasks.text import encode as tokenize
from tasks.text.config import AugmentConfig

WORDS = "the a movie film plot actor scene story music was is very quite good bad dull great boring fun".split()
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())])


def rows(n: int, prefix: str, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = [
        {"id": f"{prefix}{i}", "text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 12))), "label": rng.choice(["pos", "neg"])}
        for i in range(n)
    ]
    out.append({"id": f"{prefix}-single", "text": "great", "label": "pos"})
    return out


def recipe(**aug) -> Recipe:
    return recipe_from_dict(
        {
            "name": "t",
            "data": {"train_path": "x.csv"},
            "tokenizer": {"vocab_size": 200, "min_frequency": 1, "max_length": 32},
            "augment": aug,
        }
    )


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> tuple[ArtifactStore, StageRef]:
    store = ArtifactStore(tmp_path_factory.mktemp("aug") / "artifacts")
    with store.writer(StageKey("split", "split-fp", {}, [], 'test')) as w:
        for name, seed in (("train", 1), ("validation", 2), ("test", 3)):
            w.write_table(f"{name}.parquet", pa.Table.from_pylist(rows(60, name, seed), schema=SCHEMA))
        source = w.write_manifest(rows={})
    return store, tokenize.run(recipe(), source, store)


@pytest.fixture(scope="module")
def vocab(tokenized) -> list[str]:
    _, ref = tokenized
    return augment.insertion_vocab(Tokenizer.from_file(str(ref.file("tokenizer.json"))))


def test_random_swap_keeps_the_multiset_of_words():
    rng = np.random.default_rng(0)
    words = "one two three four five six".split()
    changed = 0
    for _ in range(50):
        out = augment.random_swap(words, 2, rng)
        assert Counter(out) == Counter(words)
        changed += out != words
    assert changed > 40
    assert augment.random_swap(["solo"], 3, rng) == ["solo"]
    assert words == "one two three four five six".split()  # input not mutated


def test_random_deletion_never_empties_and_deletes_something():
    rng = np.random.default_rng(1)
    for n in range(1, 8):
        words = [f"w{i}" for i in range(n)]
        for p in (0.1, 0.5, 0.99):
            for _ in range(30):
                out = augment.random_deletion(words, p, rng)
                assert 1 <= len(out) <= n
                assert out == [w for w in words if w in out]  # order kept, only deletions
                if n >= 2:
                    assert len(out) < n
    assert augment.random_deletion(["only"], 0.5, rng) == ["only"]


def test_random_insertion_adds_in_vocab_words(vocab):
    rng = np.random.default_rng(2)
    words = "alpha beta gamma".split()
    for n in (1, 3):
        out = augment.random_insertion(words, n, vocab, rng)
        assert len(out) == len(words) + n
        added = Counter(out) - Counter(words)
        assert sum(added.values()) == n and all(w in vocab for w in added)
        assert [w for w in out if w in words] == words


def test_insertion_vocab_is_whole_alphabetic_words(vocab):
    assert vocab and "movie" in vocab and "boring" in vocab
    for word in vocab:
        assert word.isalpha() and len(word) >= 2 and not word.startswith("##")
    assert not set(vocab) & set(tokenize.SPECIAL_TOKENS)


def test_augment_texts_is_deterministic_and_seeded(vocab):
    texts = [r["text"] for r in rows(40, "x", 5)]
    cfg = AugmentConfig(enabled=True, copies=3, p=0.2, seed=4)
    first = augment.augment_texts(texts, cfg, vocab)
    assert first == augment.augment_texts(texts, cfg, vocab)
    assert first != augment.augment_texts(texts, cfg.model_copy(update={"seed": 5}), vocab)
    assert [i for i, _ in first] == [i for i in range(len(texts)) for _ in range(3)]
    changed = sum(text != texts[i] for i, text in first)
    assert changed >= 0.8 * len(first)


def test_each_operation_only_does_its_job(vocab):
    texts = ["the movie was a very dull film indeed"] * 20
    for op in ("swap", "delete", "insert"):
        cfg = AugmentConfig(enabled=True, copies=2, p=0.25, operations=[op], seed=0)
        for _, text in augment.augment_texts(texts, cfg, vocab):
            words, orig = text.split(), texts[0].split()
            if op == "swap":
                assert Counter(words) == Counter(orig)
            elif op == "delete":
                assert 1 <= len(words) < len(orig) and not Counter(words) - Counter(orig)
            else:
                assert len(words) == len(orig) + 2  # round(0.25 * 8)
                assert all(w in vocab for w in (Counter(words) - Counter(orig)))


def test_run_keeps_originals_and_adds_reencoded_copies(tokenized):
    store, tok_ref = tokenized
    ref = augment.run(recipe(enabled=True, copies=2, p=0.2, seed=3), tok_ref, store)
    source = pq.read_table(tok_ref.file("train.parquet"))
    out = pq.read_table(ref.file("train.parquet"))
    n = source.num_rows
    assert out.num_rows == n * 3
    assert ref.rows == {"input": n, "original": n, "augmented": 2 * n, "train": 3 * n, "rejected": 0}
    assert out.column_names == source.column_names + ["augmented"]
    originals = out.filter(pa.compute.invert(out.column("augmented")))
    assert originals.drop_columns(["augmented"]).equals(source)
    copies = out.filter(out.column("augmented")).to_pylist()
    by_id = {r["id"]: r for r in source.to_pylist()}
    tok = Tokenizer.from_file(str(tok_ref.file("tokenizer.json")))
    assert {r["id"] for r in copies} == {f"{i}#aug{k}" for i in by_id for k in (1, 2)}
    for row in copies:
        orig = by_id[row["id"].rsplit("#aug", 1)[0]]
        assert (row["label"], row["label_id"]) == (orig["label"], orig["label_id"])
        assert row["input_ids"] == tok.encode(row["text"]).ids
        assert row["length"] == len(row["input_ids"])
    single = [r for r in copies if r["id"].startswith("train-single#")]
    assert all(len(r["text"].split()) == 2 for r in single)  # one word: insertion instead
    samples = json.loads(ref.file("augmentation_samples.json").read_text())
    assert 0 < len(samples) <= 20 and {"original", "augmented", "operation", "id"} <= set(samples[0])
    assert "augmentation_samples.json" in ref.extra["log_files"]
    assert ref.extra["source_path"] == tok_ref.path
    assert ref.extra["labels"] == tok_ref.extra["labels"] and ref.extra["pad_id"] == 0
    assert ref.extra["metrics"]["rows_augmented"] == 2 * n
    assert pq.read_table(ref.file("rejects.parquet")).num_rows == 0


def test_run_is_deterministic_and_cached(tokenized, tmp_path):
    store, tok_ref = tokenized
    cfg = recipe(enabled=True, copies=1, seed=11)
    first = augment.run(cfg, tok_ref, store)
    second = augment.run(cfg, tok_ref, store)
    assert second.cache_hit and second.fingerprint == first.fingerprint
    forced = augment.run(cfg, tok_ref, store, force=True)
    assert not forced.cache_hit
    assert pq.read_table(forced.file("train.parquet")).equals(pq.read_table(first.file("train.parquet")))


def test_disabled_passes_train_through(tokenized):
    store, tok_ref = tokenized
    ref = augment.run(recipe(enabled=False, copies=4), tok_ref, store)
    source = pq.read_table(tok_ref.file("train.parquet"))
    out = pq.read_table(ref.file("train.parquet"))
    assert out.drop_columns(["augmented"]).equals(source)
    assert not any(out.column("augmented").to_pylist())
    assert ref.rows["train"] == ref.rows["input"] == source.num_rows and ref.rows["augmented"] == 0
    assert ref.extra["source_path"] == tok_ref.path and ref.extra["enabled"] is False
    # knobs that do nothing while disabled do not change the fingerprint
    assert augment.run(recipe(enabled=False, copies=2), tok_ref, store).cache_hit
    assert ref.file("augmentation_samples.json").exists()
