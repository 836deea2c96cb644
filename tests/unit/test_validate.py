"""Validate stage: report numbers on a hand-made table, rejects, thresholds, caching."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.store import ArtifactStore, DataError, StageKey, StageRef
from tasks.registry import Recipe, recipe_from_dict
from tasks.text import validate
from tasks.text.textnorm import match_key

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())])
LONG = " ".join(f"w{i}" for i in range(20))  # 20 tokens + [CLS]/[SEP] > max_length 8

TRAIN = [
    ("t1", "Good movie", "pos"),
    ("t2", "good movie!", "pos"),  # normalised duplicate of t1
    ("t3", "Good movie", "pos"),  # exact duplicate of t1
    ("t4", "bad film", "neg"),
    ("t5", "Bad film.", "pos"),  # conflicts with t4
    ("t6", "   ", "pos"),  # empty -> rejected
    ("t7", "ok then", "maybe"),  # unknown label -> rejected
    ("t8", LONG, "neg"),  # truncated at max_length 8
]
TEST = [
    ("s1", "GOOD movie", "pos"),  # leaks (same key as t1)
    ("s2", "fresh text here", "neg"),
    ("s3", "another one", "maybe"),  # unknown label -> rejected
]
LOOSE = {
    "max_reject_fraction": 0.5, "max_empty_fraction": 0.5, "max_conflict_fraction": 0.5,
    "max_leakage_fraction": 0.6, "max_truncation_rate": 0.5,
}


def table(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "text": t, "label": lab} for i, t, lab in rows], schema=SCHEMA)


def recipe(labels: list[str] | None = ["neg", "pos"], **validate_cfg: Any) -> Recipe:
    return recipe_from_dict(
        {
            "name": "t",
            "data": {"train_path": "unused.csv", "labels": labels},
            "validate": validate_cfg,
            "tokenizer": {"max_length": 8},
        }
    )


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def ingested(store: ArtifactStore, train: list, test: list | None, rejected: int = 0, fp: str = "ingest-fp") -> StageRef:
    """A fake ingest output."""
    n = len(train) + len(test or [])
    with store.writer(StageKey("ingest", fp, {}, [], 'test')) as w:
        w.write_table("train.parquet", table(train))
        if test is not None:
            w.write_table("test.parquet", table(test))
        return w.write_manifest(rows={"input": n + rejected, "accepted": n, "rejected": rejected, "train": len(train), "test": len(test or [])},
        )


def test_report_numbers_on_hand_made_table(store: ArtifactStore) -> None:
    ref = validate.run(recipe(**LOOSE), ingested(store, TRAIN, TEST), store)
    report = json.loads(ref.file("validation_report.json").read_text())
    train = report["splits"]["train"]
    assert train["rows"] == 6
    assert train["duplicates"]["exact_rows"] == 1
    assert train["duplicates"]["normalised_rows"] == 2
    assert train["conflicts"]["rows"] == 2 and train["conflicts"]["keys"] == 1
    assert train["conflicts"]["fraction"] == pytest.approx(2 / 6)
    assert train["conflicts"]["examples"][0]["labels"] == {"neg": 1, "pos": 1}
    assert train["length"]["truncated_rows"] == 1
    assert train["length"]["truncation_rate"] == pytest.approx(1 / 6)
    assert train["length"]["max"] == 20
    assert train["labels"]["counts"] == {"neg": 2, "pos": 4}
    assert train["labels"]["imbalance_ratio"] == pytest.approx(2.0)
    assert report["leakage"]["test_rows_leaked"] == 1
    assert report["leakage"]["fraction"] == pytest.approx(0.5)
    assert report["rejects_by_reason"] == {"empty text": 1, "unknown label": 2}
    assert report["rows"]["reject_fraction"] == pytest.approx(3 / 11)
    statuses = {(c["name"], c["split"]): c["status"] for c in report["checks"]}
    assert statuses[("conflict_fraction", "train")] == "warn"
    assert statuses[("leakage_fraction", "test")] == "warn"
    assert statuses[("conflict_fraction", "test")] == "ok"
    assert report["status"] == "warn"
    assert any("conflict_fraction" in w for w in ref.extra["warnings"])
    assert "| conflict_fraction | train | warn |" in ref.file("validation_report.md").read_text()

    # rejected rows carry reasons; passing rows are unchanged
    rej = {r["id"]: r["reason"] for r in pq.read_table(ref.file("rejects.parquet")).to_pylist()}
    assert rej["t6"] == "empty text"
    assert rej["t7"] == "unknown label 'maybe' (allowed: neg, pos)"
    assert rej["s3"].startswith("unknown label 'maybe'")
    out = pq.read_table(ref.file("train.parquet")).to_pylist()
    assert [r["id"] for r in out] == ["t1", "t2", "t3", "t4", "t5", "t8"]
    assert out[1]["text"] == "good movie!"
    assert ref.rows == {"input": 11, "train": 6, "test": 2, "rejected": 3}
    assert ref.rows["train"] + ref.rows["test"] + ref.rows["rejected"] == ref.rows["input"]
    assert ref.extra["metrics"]["train.conflict_fraction"] == pytest.approx(2 / 6)
    assert ref.extra["metrics"]["leakage_fraction"] == pytest.approx(0.5)
    assert ref.extra["labels"] == ["neg", "pos"]
    assert set(ref.extra["log_files"]) >= {"validation_report.json", "validation_report.md"}


def test_threshold_failure_raises_with_report(store: ArtifactStore) -> None:
    with pytest.raises(DataError) as err:
        validate.run(recipe(**{**LOOSE, "max_conflict_fraction": 0.05}), ingested(store, TRAIN, TEST), store)
    message = str(err.value)
    assert "conflict_fraction[train] 0.3333 > 0.05" in message
    assert "leakage" not in message  # only the failing check is named
    failed = list((store.root / "validate").glob("failed-*/validation_report.md"))
    assert len(failed) == 1 and str(failed[0]) in message
    assert json.loads((failed[0].parent / "validation_report.json").read_text())["status"] == "fail"
    # nothing cached under the real fingerprint: a failing stage is not a cache hit later
    assert not [p for p in (store.root / "validate").iterdir() if not p.name.startswith("failed-")]


def test_default_thresholds_fail_on_several_checks(store: ArtifactStore) -> None:
    with pytest.raises(DataError) as err:
        validate.run(recipe(), ingested(store, TRAIN, TEST), store)
    message = str(err.value)
    for check in ("reject_fraction", "empty_fraction", "conflict_fraction[train]", "leakage_fraction[test]"):
        assert check in message
    assert "truncation_rate" not in message  # 1/6 is under the default 0.5


def test_reject_fraction_counts_ingest_rejects(store: ArtifactStore) -> None:
    clean = [("a", "one text", "neg"), ("b", "two text", "pos")]
    ok = validate.run(recipe(), ingested(store, clean, None, rejected=0, fp="f1"), store)
    assert ok.extra["metrics"]["reject_fraction"] == 0
    with pytest.raises(DataError, match=r"reject_fraction 0\.5 > 0\.05"):
        validate.run(recipe(), ingested(store, clean, None, rejected=2, fp="f2"), store)


def test_unknown_test_label_when_labels_not_set(store: ArtifactStore) -> None:
    train = [("a", "one", "x"), ("b", "two", "y"), ("c", "three", "z")]
    test = [("d", "four", "x"), ("e", "five", "w")]
    result = validate.validate_tables(table(train), table(test), recipe(labels=None).validate_, None, 64)
    assert result.train.num_rows == 3  # every train label is allowed
    (reason,) = result.rejects.column("reason").to_pylist()
    assert reason == "unknown label 'w' (not seen in train; train labels: x, y, z)"
    assert result.test.column("id").to_pylist() == ["d"]


def test_min_class_fraction_and_single_label(store: ArtifactStore) -> None:
    train = [(f"r{i}", f"text {i}", "pos") for i in range(19)] + [("n", "rare one", "neg")]
    cfg = recipe(min_class_fraction=0.1).validate_
    result = validate.validate_tables(table(train), None, cfg, ["neg", "pos"], 64)
    (check,) = [c for c in result.checks if c.name == "min_class_fraction"]
    assert check.status == "fail" and check.observed == pytest.approx(0.05)
    one = validate.validate_tables(table(train[:3]), None, recipe().validate_, ["neg", "pos"], 64)
    assert {c.name for c in one.failed} == {"num_labels"}
    assert [c.status for c in one.checks if c.name == "min_class_fraction"] == ["warn"]  # 'neg' has no rows


def test_token_counts_are_a_word_punctuation_split() -> None:
    counts = validate.token_counts(pa.array(["Hello, world! café's", "", "a  b\tc", "東京"]))
    assert counts.tolist() == [7, 0, 3, 1]


def test_match_key_keeps_punctuation_only_texts_apart() -> None:
    keys = match_key(pa.array(["Good, movie", "good movie", "...", ":)"])).to_pylist()
    assert keys[0] == keys[1] == "good movie"
    assert keys[2] != keys[3]


def test_cache_hit_and_fingerprint_changes(store: ArtifactStore) -> None:
    src = ingested(store, TRAIN, TEST)
    first = validate.run(recipe(**LOOSE), src, store)
    again = validate.run(recipe(**LOOSE), src, store)
    assert again.cache_hit is True and again.fingerprint == first.fingerprint
    assert again.extra["warnings"] == first.extra["warnings"]
    other = validate.run(recipe(**{**LOOSE, "max_truncation_rate": 0.4}), src, store)
    assert other.fingerprint != first.fingerprint and other.cache_hit is False


def test_truncation_counts_cls_and_sep() -> None:
    six, seven = " ".join("abcdef"), " ".join("abcdefg")
    stats = validate.length_stats(pa.array([six, seven, "x"]), max_length=8)
    # 6 words + [CLS] + [SEP] = 8 fits; 7 + 2 = 9 is truncated
    assert stats["truncated_rows"] == 1 and stats["truncation_rate"] == pytest.approx(1 / 3)
    assert stats["max"] == 7 and stats["p50"] == 6


def test_numeric_allowed_labels_compare_in_canonical_form(store: ArtifactStore) -> None:
    rows_ = [("a", "one text", "0"), ("b", "two text", "1"), ("c", "three text", "1")]
    result = validate.validate_tables(table(rows_), None, recipe().validate_, ["0.0", "1.0"], 64)
    assert result.rejects.num_rows == 0 and result.train.num_rows == 3
    assert result.report["allowed_labels"] == ["0", "1"]
    ref = validate.run(recipe(labels=["0.0", "1.00"]), ingested(store, rows_, None), store)
    assert ref.extra["labels"] == ["0", "1"]  # what later stages map label ids from
    # names are not numbers: "1.0" stays "1.0" and the "1" rows are unknown
    named = validate.validate_tables(table(rows_), None, recipe().validate_, ["1.0", "pos"], 64)
    assert named.rejects.column("reason").to_pylist()[0] == "unknown label '0' (allowed: 1.0, pos)"


def test_canonicalised_labels_are_a_warning_line(store: ArtifactStore) -> None:
    rows_ = [("a", "one text", "0"), ("b", "two text", "1")]
    with store.writer(StageKey("ingest", "canon-fp", {}, [], 'test')) as w:
        w.write_table("train.parquet", table(rows_))
        src = w.write_manifest(rows={"input": 2, "accepted": 2, "rejected": 0, "train": 2, "test": 0},
            extra={"labels_canonicalised": {"rows": 1, "rewrites": {"1.0": "1"}}},
        )
    ref = validate.run(recipe(labels=None), src, store)
    (warning,) = [w for w in ref.extra["warnings"] if "rewritten" in w]
    assert warning.startswith("1 row label(s) rewritten by ingest as integers ('1.0' -> '1')")
    report = json.loads(ref.file("validation_report.json").read_text())
    assert report["labels_canonicalised"] == {"rows": 1, "rewrites": {"1.0": "1"}}
    assert "| labels_canonicalised | - | warn |" in ref.file("validation_report.md").read_text()
    plain = validate.validate_tables(table(rows_), None, recipe().validate_, None, 64)
    assert not [c for c in plain.checks if c.name == "labels_canonicalised"]


def test_empty_train_and_bad_schema_are_data_errors() -> None:
    cfg = recipe().validate_
    empty = pa.table({"id": pa.chunked_array([], pa.string()), "text": pa.chunked_array([], pa.string()),
                      "label": pa.chunked_array([], pa.string())})
    result = validate.validate_tables(empty, None, cfg, None, 64)  # no pyarrow kernel error on zero chunks
    assert {c.name for c in result.failed} >= {"train_rows"}

    ints = pa.table({"id": ["a"], "text": pa.array([5]), "label": ["x"]})
    with pytest.raises(DataError, match=r"schema check failed: column 'text' is int64, expected string"):
        validate.validate_tables(ints, None, cfg, None, 64)

    wide = pa.table({f"col{i}": [1] for i in range(3000)})
    with pytest.raises(DataError) as err:
        validate.validate_tables(wide, None, cfg, None, 64)
    message = str(err.value)
    assert "missing column(s) ['id', 'text', 'label']" in message and "more characters)" in message
    assert len(message) < 600
