"""Split stage: stratified, seeded, leakage-free, accounted."""

from __future__ import annotations

import random
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.grouping import SPLITS
from tasks.core.store import ArtifactStore, StageKey, StageRef
from tasks.registry import Recipe, recipe_from_dict
from tasks.text import split
from tasks.text.textnorm import match_key

WORDS = "good bad plot actor scene film story music slow fast funny dull bright dark long short".split()


def make_rows(n: int, labels: dict[str, float], seed: int = 0, prefix: str = "r") -> list[dict[str, str]]:
    """``n`` rows with distinct texts and labels in the given proportions."""
    rng = random.Random(seed)
    names = list(labels)
    counts = [round(n * labels[name]) for name in names]
    rows = []
    i = 0
    for name, count in zip(names, counts):
        for _ in range(count):
            text = " ".join(rng.choice(WORDS) for _ in range(5)) + f" item{i}"
            rows.append({"id": f"{prefix}{i}", "text": text, "label": name})
            i += 1
    rng.shuffle(rows)
    return rows


def stage_input(store: ArtifactStore, train: list[dict], test: list[dict] | None = None, fp: str = "clean-fp") -> StageRef:
    """A fake upstream stage directory holding train.parquet (and test.parquet)."""
    schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())])
    with store.writer(StageKey("clean", fp, {}, [], 'test')) as w:
        w.write_table("train.parquet", pa.Table.from_pylist(train, schema=schema))
        if test is not None:
            w.write_table("test.parquet", pa.Table.from_pylist(test, schema=schema))
        return w.write_manifest(rows={"train": len(train)})


def recipe(**split_cfg) -> Recipe:
    return recipe_from_dict({"name": "t", "data": {"train_path": "unused.csv"}, "split": split_cfg})


def read(ref: StageRef, name: str) -> pa.Table:
    return pq.read_table(ref.file(f"{name}.parquet"))


def ids(ref: StageRef, name: str) -> list[str]:
    return read(ref, name).column("id").to_pylist()


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def test_stratified_fractions_without_test_file(store):
    ref = split.run(recipe(validation_fraction=0.1, test_fraction=0.2), stage_input(store, make_rows(1000, {"a": 0.7, "b": 0.3})), store)
    assert ref.rows == {"input": 1000, "train": 700, "validation": 100, "test": 200, "rejected": 0}
    counts = ref.extra["label_counts"]
    assert counts["validation"] == {"a": 70, "b": 30}
    assert counts["test"] == {"a": 140, "b": 60}
    assert counts["train"] == {"a": 490, "b": 210}
    assert ref.extra["labels"] == ["a", "b"]
    assert ref.extra["test_source"] == "split"
    for name in SPLITS:
        assert Counter(read(ref, name).column("label").to_pylist()) == counts[name]
    assert set(ref.extra["metrics"]) >= {"rows_train", "rows_validation", "rows_test", "rows_rejected"}
    assert "rejects.parquet" in ref.extra["log_files"]


def test_stratification_with_duplicate_groups_within_tolerance(store):
    rows = make_rows(600, {"x": 0.5, "y": 0.25, "z": 0.25}, seed=3)
    # groups of 1-4 rows sharing a normalised text
    extra = []
    for row in rows[:150]:
        for k in range(random.Random(row["id"]).randint(0, 3)):
            extra.append({"id": f"{row['id']}-dup{k}", "text": row["text"].upper() + " !", "label": row["label"]})
    ref = split.run(recipe(validation_fraction=0.2, test_fraction=0.1), stage_input(store, rows + extra), store)
    total = Counter(r["label"] for r in rows + extra)
    for name, frac in (("validation", 0.2), ("test", 0.1)):
        got = ref.extra["label_counts"][name]
        for label, n in total.items():
            assert abs(got[label] - frac * n) <= 4, (name, label, got[label], frac * n)


def test_reproducible_and_seed_dependent(tmp_path):
    rows = make_rows(500, {"a": 0.5, "b": 0.5})
    runs = []
    for i, seed in enumerate((7, 7, 8)):
        store = ArtifactStore(tmp_path / f"s{i}")
        ref = split.run(recipe(seed=seed), stage_input(store, rows), store)
        runs.append({name: ids(ref, name) for name in SPLITS})
    assert runs[0] == runs[1]
    assert runs[0]["validation"] != runs[2]["validation"]


def test_independent_of_input_order(tmp_path):
    rows = make_rows(400, {"a": 0.6, "b": 0.4})
    shuffled = rows[::-1]
    a_store, b_store = ArtifactStore(tmp_path / "a"), ArtifactStore(tmp_path / "b")
    a = split.run(recipe(), stage_input(a_store, rows), a_store)
    b = split.run(recipe(), stage_input(b_store, shuffled), b_store)
    for name in SPLITS:
        assert sorted(ids(a, name)) == sorted(ids(b, name))


def test_disjoint_ids_and_no_shared_match_key(store):
    rows = make_rows(300, {"a": 0.5, "b": 0.5})
    variants = []
    for i, row in enumerate(rows[:100]):
        variants.append({"id": f"v{i}a", "text": "  " + row["text"].title() + "...", "label": row["label"]})
        variants.append({"id": f"v{i}b", "text": row["text"].replace(" ", ",  "), "label": row["label"]})
    ref = split.run(recipe(), stage_input(store, rows + variants), store)
    keys: dict[str, set[str]] = {}
    all_ids: list[str] = []
    for name in SPLITS:
        table = read(ref, name)
        all_ids += table.column("id").to_pylist()
        keys[name] = set(match_key(table.column("text")).to_pylist())
    assert len(all_ids) == len(set(all_ids)) == len(rows) + len(variants)
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]


def test_leakage_into_given_test_file_is_rejected_and_accounted(store):
    rows = make_rows(200, {"a": 0.5, "b": 0.5})
    test_rows = [
        {"id": "t0", "text": rows[0]["text"].upper() + " !!", "label": rows[0]["label"]},
        {"id": "t1", "text": "a completely fresh sentence", "label": "a"},
        {"id": "t2", "text": ":)", "label": "b"},
        {"id": "t3", "text": "nothing like it in train", "label": "c"},
    ]
    train = rows + [
        {"id": "dup-of-0", "text": rows[0]["text"], "label": rows[0]["label"]},
        {"id": "smiley", "text": ":)", "label": "b"},
        {"id": "frown", "text": ":(", "label": "a"},  # normalises to "" too, but is another text
    ]
    ref = split.run(recipe(validation_fraction=0.2), stage_input(store, train, test_rows), store)
    rejects = read(ref, "rejects")
    assert rejects.column_names == ["id", "split", "reason", "text", "label"]
    by_id = dict(zip(rejects.column("id").to_pylist(), rejects.column("reason").to_pylist()))
    assert by_id == {
        rows[0]["id"]: "leaks into test: same normalised text as t0",
        "dup-of-0": "leaks into test: same normalised text as t0",
        "smiley": "leaks into test: same normalised text as t2",
    }
    assert ids(ref, "test") == ["t0", "t1", "t2", "t3"]
    assert ref.extra["warnings"] == ["test labels never seen in train: ['c']"]
    assert ref.extra["test_source"] == "file"
    r = ref.rows
    assert r["input"] == len(train) + len(test_rows)
    assert r["train"] + r["validation"] + r["test"] + r["rejected"] == r["input"]
    assert r["rejected"] == 3 and r["test"] == 4
    kept = set(ids(ref, "train")) | set(ids(ref, "validation"))
    assert "frown" in kept and not kept & set(by_id)
    assert abs(r["validation"] - 0.2 * (len(train) - 3)) <= 2


def test_no_leaks_writes_empty_typed_rejects(store):
    ref = split.run(recipe(), stage_input(store, make_rows(100, {"a": 0.5, "b": 0.5})), store)
    rejects = read(ref, "rejects")
    assert rejects.num_rows == 0
    assert rejects.schema.field("text").type == pa.string()


def test_tiny_class_stays_in_train_with_warning(store):
    rows = make_rows(200, {"a": 0.5, "b": 0.5}) + [{"id": "lonely", "text": "one of a kind", "label": "rare"}]
    ref = split.run(recipe(), stage_input(store, rows), store)
    assert "lonely" in ids(ref, "train")
    assert any("'rare'" in w for w in ref.extra["warnings"])
    assert ref.extra["labels"] == ["a", "b", "rare"]
    assert sum(ref.rows[name] for name in SPLITS) == 201


def test_cache_hit_and_force(store):
    source = stage_input(store, make_rows(100, {"a": 0.5, "b": 0.5}))
    first = split.run(recipe(), source, store)
    second = split.run(recipe(), source, store)
    assert not first.cache_hit and second.cache_hit
    assert second.fingerprint == first.fingerprint and second.rows == first.rows
    assert split.run(recipe(seed=99), source, store).fingerprint != first.fingerprint
    forced = split.run(recipe(), source, store, force=True)
    assert not forced.cache_hit and forced.fingerprint == first.fingerprint
    assert Path(forced.path, "train.parquet").exists()


def test_assign_groups_keeps_every_split_populated():
    import numpy as np

    labels = np.array([0, 0, 0, 1, 1, 1, 1, 1, 1, 1])
    sizes = np.ones(10, dtype=np.int64)
    assignment, warnings = split.assign_groups(labels, sizes, (0.1, 0.1), seed=1)
    assert not warnings
    for code in (0, 1):
        assert set(assignment[labels == code]) == {split.TRAIN, split.VALIDATION, split.TEST}
