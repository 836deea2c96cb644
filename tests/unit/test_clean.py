"""Clean stage: text normalisation, length / duplicate / conflict rejects, accounting, caching."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.store import ArtifactStore, StageKey, StageRef
from tasks.registry import Recipe, recipe_from_dict
from tasks.text import clean
from tasks.text.config import CleanConfig

SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())])


def texts(values: list[str | None], **cfg: Any) -> list[str | None]:
    return clean.clean_texts(pa.array(values, pa.string()), CleanConfig(**cfg)).to_pylist()


def table(rows: list[tuple[str, str, str]]) -> pa.Table:
    return pa.Table.from_pylist([{"id": i, "text": t, "label": lab} for i, t, lab in rows], schema=SCHEMA)


def recipe(**clean_cfg: Any) -> Recipe:
    return recipe_from_dict({"name": "t", "data": {"train_path": "unused.csv"}, "clean": clean_cfg})


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def validated(store: ArtifactStore, train: list, test: list | None = None, fp: str = "validate-fp") -> StageRef:
    """A fake validate output."""
    with store.writer(StageKey("validate", fp, {}, [], 'test')) as w:
        w.write_table("train.parquet", table(train))
        if test is not None:
            w.write_table("test.parquet", table(test))
        return w.write_manifest(rows={"train": len(train)}, extra={"labels": ["neg", "pos"]})


def test_nfkc_html_controls_and_whitespace() -> None:
    out = texts(
        [
            "ｆｕｌｌ　ｗｉｄｔｈ ﬁne",  # NFKC: full-width letters, ideographic space, ligature
            "<p>Great <b>film</b></p>&amp; it&#39;s &quot;fun&quot;",
            "a < b and c > d <3",  # not tags
            "&lt;b&gt; stays text",  # escaped tag is text, not markup
            "tab\there\nnewline\r\nend",
            "ctrl\x00\x07char\u200bs and soft\u00adhyphen",
            "  many    spaces\u00a0\u00a0here  ",
            "<script>var x = 1;</script>kept<!-- note --> text<br/>next",
            None,
        ]
    )
    assert out == [
        "full width fine",
        "Great film & it's \"fun\"",
        "a < b and c > d <3",
        "<b> stays text",
        "tab here newline end",
        "ctrlchars and softhyphen",
        "many spaces here",
        "kept text next",
        None,
    ]


def test_nfkc_composes_accents() -> None:
    # pyarrow 25.0.1's utf8_normalize("NFKC") decomposes (apache/arrow#51225); clean must compose
    out = texts(["e\u0301cole caf\u00e9 \u212b"])
    assert out == ["\u00e9cole caf\u00e9 \u00c5"]


def test_strip_html_off_and_lowercase_option() -> None:
    assert texts(["<b>Bold</b> &amp;"], strip_html=False) == ["<b>Bold</b> &amp;"]
    assert texts(["<b>Bold</b> ÉCOLE"], lowercase=True) == ["bold école"]
    assert texts(["<b>Bold</b>"]) == ["Bold"]  # lowercase is off by default


def test_clean_texts_accepts_chunked_arrays() -> None:
    chunked = pa.chunked_array([["  a  b "], ["c\td"]])
    assert clean.clean_texts(chunked, CleanConfig()).to_pylist() == ["a b", "c d"]


def test_length_rejects() -> None:
    rows = [("a", "ok text", "pos"), ("b", "ab", "pos"), ("c", "<br>", "neg"), ("d", "x" * 30, "neg")]
    result = clean.clean_table(table(rows), CleanConfig(min_chars=3, max_chars=20))
    assert result.table.column("id").to_pylist() == ["a"]
    reasons = dict(zip(result.rejects.column("id").to_pylist(), result.rejects.column("reason").to_pylist()))
    assert reasons == {
        "b": "too short: 2 chars < min_chars 3",
        "c": "too short: 0 chars < min_chars 3",
        "d": "too long: 30 chars > max_chars 20",
    }
    assert result.rejects.column("raw").to_pylist() == ["ab", "<br>", "x" * 30]


def test_dedupe_keeps_first_and_conflicts_drop_every_row() -> None:
    rows = [
        ("a", "Good film", "pos"),
        ("b", "bad film", "neg"),
        ("c", "good film!", "pos"),  # duplicate of a (same match_key and label)
        ("d", "GOOD FILM", "pos"),  # duplicate of a
        ("e", "Meh.", "pos"),
        ("f", "meh", "neg"),  # conflicts with e: both go
        ("g", "meh!!", "neg"),  # conflicts too (a conflict wins over duplicate)
    ]
    result = clean.clean_table(table(rows), CleanConfig())
    assert result.table.to_pylist() == [
        {"id": "a", "text": "Good film", "label": "pos"},
        {"id": "b", "text": "bad film", "label": "neg"},
    ]
    reasons = dict(zip(result.rejects.column("id").to_pylist(), result.rejects.column("reason").to_pylist()))
    assert reasons == {
        "c": "duplicate of a",
        "d": "duplicate of a",
        "e": "conflicting labels for the same text: neg, pos",
        "f": "conflicting labels for the same text: neg, pos",
        "g": "conflicting labels for the same text: neg, pos",
    }
    assert result.stats["duplicates"] == 2 and result.stats["conflicts"] == 3

    keep_conflicts = clean.clean_table(table(rows), CleanConfig(drop_conflicts=False))
    assert keep_conflicts.table.column("id").to_pylist() == ["a", "b", "e", "f"]  # one per (text, label)
    assert dict(zip(keep_conflicts.rejects.column("id").to_pylist(),
                    keep_conflicts.rejects.column("reason").to_pylist()))["g"] == "duplicate of f"
    no_dedupe = clean.clean_table(table(rows), CleanConfig(dedupe=False))
    assert no_dedupe.table.column("id").to_pylist() == ["a", "b", "c", "d"]


def test_run_accounting_outputs_and_cache(store: ArtifactStore) -> None:
    train = [("a", "<i>Nice</i>  one", "pos"), ("b", "nice one", "pos"), ("c", "", "neg"), ("d", "bad", "neg")]
    test = [("t1", "fine &amp; good", "pos"), ("t2", "Fine & good.", "pos")]
    src = validated(store, train, test)
    ref = clean.run(recipe(), src, store)
    assert ref.rows == {"input": 6, "train": 2, "test": 1, "rejected": 3}
    assert ref.rows["train"] + ref.rows["test"] + ref.rows["rejected"] == ref.rows["input"]
    assert pq.read_table(ref.file("train.parquet")).to_pylist() == [
        {"id": "a", "text": "Nice one", "label": "pos"},
        {"id": "d", "text": "bad", "label": "neg"},
    ]
    assert pq.read_table(ref.file("test.parquet")).column("text").to_pylist() == ["fine & good"]
    rejects = pq.read_table(ref.file("rejects.parquet"))
    assert rejects.schema == clean.REJECTS_SCHEMA
    assert dict(zip(rejects.column("id").to_pylist(), rejects.column("split").to_pylist())) == {
        "b": "train", "c": "train", "t2": "test",
    }
    assert ref.extra["rejects_by_reason"] == {"duplicate": 2, "too short": 1}
    assert ref.extra["metrics"]["train.texts_changed"] == 1
    assert ref.extra["labels"] == ["neg", "pos"]
    assert (Path(ref.path) / "clean_report.json").exists()

    again = clean.run(recipe(), src, store)
    assert again.cache_hit is True and again.fingerprint == ref.fingerprint
    lower = clean.run(recipe(lowercase=True), src, store)
    assert lower.fingerprint != ref.fingerprint and lower.cache_hit is False
    assert pq.read_table(lower.file("train.parquet")).column("text").to_pylist() == ["nice one", "bad"]
    forced = clean.run(recipe(), src, store, force=True)
    assert forced.cache_hit is False and forced.fingerprint == ref.fingerprint


def test_empty_rejects_file_has_the_schema(store: ArtifactStore) -> None:
    ref = clean.run(recipe(), validated(store, [("a", "one", "pos"), ("b", "two", "neg")]), store)
    rejects = pq.read_table(ref.file("rejects.parquet"))
    assert rejects.num_rows == 0 and rejects.schema == clean.REJECTS_SCHEMA
    assert ref.rows == {"input": 2, "train": 2, "test": 0, "rejected": 0}
    assert ref.extra["warnings"] == []
