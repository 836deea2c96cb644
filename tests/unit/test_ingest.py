"""Ingest stage: formats, ids, labels, decoding, quarantined rows, file errors, caching, real TREC."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import ingest
from tasks.artifacts import ArtifactStore, DataError, StageRef
from tasks.config import Recipe, load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]


def recipe(**data: Any) -> Recipe:
    return recipe_from_dict({"name": "t", "task": "text-classification", "data": data})


@pytest.fixture
def store(tmp_path: Path) -> ArtifactStore:
    return ArtifactStore(tmp_path / "artifacts")


def rows(ref: StageRef, name: str = "train") -> list[dict[str, str]]:
    return pq.read_table(ref.file(f"{name}.parquet")).to_pylist()


def rejects(ref: StageRef) -> list[dict[str, Any]]:
    return pq.read_table(ref.file("rejects.parquet")).to_pylist()


def accounted(ref: StageRef) -> None:
    assert ref.rows["accepted"] + ref.rows["rejected"] == ref.rows["input"]
    assert ref.rows["train"] + ref.rows["test"] == ref.rows["accepted"]
    assert len(rejects(ref)) == ref.rows["rejected"]


def test_csv_with_real_quoting(tmp_path: Path, store: ArtifactStore) -> None:
    path = tmp_path / "reviews.csv"
    path.write_text(
        'review,stars,extra\n'
        '"great, really great",5,x\n'
        '"she said ""wow""",4,y\n'
        '"two\nlines",3,z\n'
        'plain,1,w\n',
        encoding="utf-8",
    )
    ref = ingest.run(recipe(train_path=str(path), text_column="review", label_column="stars"), store)
    got = rows(ref)
    assert [r["text"] for r in got] == ["great, really great", 'she said "wow"', "two\nlines", "plain"]
    assert [r["label"] for r in got] == ["5", "4", "3", "1"]
    # ids name the file and the physical line where the record starts
    assert [r["id"] for r in got] == ["reviews.csv:2", "reviews.csv:3", "reviews.csv:4", "reviews.csv:6"]
    assert ref.rows == {"input": 4, "accepted": 4, "rejected": 0, "train": 4, "test": 0}
    assert pq.read_table(ref.file("rejects.parquet")).schema == ingest.REJECTS_SCHEMA


def test_headerless_tsv_never_quotes_and_keeps_extra_tabs(tmp_path: Path, store: ArtifactStore) -> None:
    path = tmp_path / "data.tsv"
    path.write_text('neg\tit \'s "not" good \npos\ta\tb\tc\n\npos\t"quoted"\n', encoding="utf-8")
    ref = ingest.run(recipe(train_path=str(path), has_header=False, columns=["label", "text"]), store)
    got = rows(ref)
    assert got[0] == {"id": "data.tsv:1", "text": 'it \'s "not" good ', "label": "neg"}  # trailing space kept
    assert got[1]["text"] == "a\tb\tc"  # split at most len(columns)-1 times
    assert got[2] == {"id": "data.tsv:4", "text": '"quoted"', "label": "pos"}  # quotes are text; blank line skipped
    assert ref.extra["files"]["train"][0]["blank_lines"] == 1


def test_space_delimiter_with_maxsplit_and_label_pattern(tmp_path: Path, store: ArtifactStore) -> None:
    path = tmp_path / "q.label"
    path.write_text(
        "DESC:manner How did serfdom develop in and then leave Russia ?\n"
        "NUM:dist How far is it from Denver to Aspen ?\n"
        "lower:case does not match\n",
        encoding="utf-8",
    )
    r = recipe(
        train_path=str(path), format="tsv", has_header=False, delimiter=" ", columns=["label", "text"],
        label_pattern="^([A-Z]+):",
    )
    ref = ingest.run(r, store)
    got = rows(ref)
    assert got[0] == {"id": "q.label:1", "text": "How did serfdom develop in and then leave Russia ?", "label": "DESC"}
    assert got[1]["label"] == "NUM" and got[1]["text"] == "How far is it from Denver to Aspen ?"
    (rej,) = rejects(ref)
    assert rej["id"] == "q.label:3"
    assert rej["reason"].startswith("label does not match label_pattern")
    assert rej["label"] == "lower:case" and rej["raw"] == "lower:case does not match"
    accounted(ref)


def test_jsonl_with_malformed_lines_quarantined(tmp_path: Path, store: ArtifactStore) -> None:
    path = tmp_path / "data.jsonl"
    lines = [
        json.dumps({"text": "fine", "label": 1}),
        "{not json",
        json.dumps({"text": "no label here"}),
        json.dumps({"text": None, "label": "a"}),
        json.dumps(["a", "list"]),
        json.dumps({"text": "string label", "label": " b "}),
        json.dumps({"text": {"nested": 1}, "label": "a"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ref = ingest.run(recipe(train_path=str(path)), store)
    assert rows(ref) == [
        {"id": "data.jsonl:1", "text": "fine", "label": "1"},
        {"id": "data.jsonl:6", "text": "string label", "label": "b"},
    ]
    reasons = {r["id"]: r["reason"] for r in rejects(ref)}
    assert reasons["data.jsonl:2"].startswith("bad JSON")
    assert reasons["data.jsonl:3"] == "missing key 'label'"
    assert reasons["data.jsonl:4"] == "missing text value"
    assert reasons["data.jsonl:5"].startswith("bad JSON: expected an object")
    assert "expected a string" in reasons["data.jsonl:7"]
    assert ref.rows == {"input": 7, "accepted": 2, "rejected": 5, "train": 2, "test": 0}
    assert ref.extra["metrics"]["rows_rejected"] == 5
    accounted(ref)


def test_parquet_int_labels_and_null_values(tmp_path: Path, store: ArtifactStore) -> None:
    path = tmp_path / "sst.parquet"
    pq.write_table(pa.table({"sentence": ["good ", "bad ", None, "meh"], "label": [1, 0, 1, None]}), path)
    test_path = tmp_path / "dev.parquet"
    pq.write_table(pa.table({"sentence": ["fine"], "label": [1]}), test_path)
    r = recipe(train_path=str(path), test_path=str(test_path), text_column="sentence")
    ref = ingest.run(r, store)
    assert rows(ref) == [
        {"id": "sst.parquet:1", "text": "good ", "label": "1"},
        {"id": "sst.parquet:2", "text": "bad ", "label": "0"},
    ]
    assert rows(ref, "test") == [{"id": "dev.parquet:1", "text": "fine", "label": "1"}]
    assert {r["id"]: r["reason"] for r in rejects(ref)} == {
        "sst.parquet:3": "missing text value",
        "sst.parquet:4": "missing label value",
    }
    assert ref.rows == {"input": 5, "accepted": 3, "rejected": 2, "train": 2, "test": 1}
    assert ref.extra["has_test"] is True


def test_glob_directory_and_gzip(tmp_path: Path, store: ArtifactStore) -> None:
    folder = tmp_path / "parts"
    folder.mkdir()
    (folder / "part-1.csv").write_text("text,label\na,x\nb,y\n", encoding="utf-8")
    with gzip.open(folder / "part-2.csv.gz", "wt", encoding="utf-8") as handle:
        handle.write("text,label\nc,x\n")
    (folder / ".hidden.csv").write_text("text,label\nnope,x\n", encoding="utf-8")
    ref = ingest.run(recipe(train_path=str(folder / "part-*.csv*")), store)
    assert [r["id"] for r in rows(ref)] == ["part-1.csv:2", "part-1.csv:3", "part-2.csv.gz:2"]
    assert ref.extra["metrics"]["files"] == 2
    ref_dir = ingest.run(recipe(train_path=str(folder)), store)  # a directory: its non-hidden files
    assert [r["text"] for r in rows(ref_dir)] == ["a", "b", "c"]


def test_invalid_byte_is_replaced_and_counted(tmp_path: Path, store: ArtifactStore) -> None:
    path = tmp_path / "bytes.tsv"
    path.write_bytes(b"text\tlabel\nsister\xf0city\tLOC\nplain\tNUM\n")
    ref = ingest.run(recipe(train_path=str(path)), store)
    assert rows(ref)[0]["text"] == "sister\ufffdcity"
    assert ref.extra["replaced_chars"] == 1
    assert ref.extra["metrics"]["replaced_chars"] == 1
    assert ref.extra["metrics"]["train.replaced_chars"] == 1


def test_decode_counts_only_inserted_replacements() -> None:
    text, count = ingest.decode("ok \ufffd".encode() + b" \xff\xfe x", "utf-8")
    assert count == 2 and text.count("\ufffd") == 3
    assert ingest.decode("\ufeffhead".encode(), "utf-8") == ("head", 0)


def test_malformed_csv_rows_quarantined_and_accounted(tmp_path: Path, store: ArtifactStore) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(
        "text,label\n"
        "good,pos\n"
        "too,many,fields\n"
        "short\n"
        '"broken"quote,neg\n'
        "fine,neg\n"
        ",\n"
        '"unterminated,pos\n',
        encoding="utf-8",
    )
    ref = ingest.run(recipe(train_path=str(path)), store)
    assert [r["id"] for r in rows(ref)] == ["bad.csv:2", "bad.csv:6"]
    reasons = {r["id"]: r["reason"] for r in rejects(ref)}
    assert reasons["bad.csv:3"] == "wrong field count: expected 2 fields, got 3"
    assert reasons["bad.csv:4"] == "wrong field count: expected 2 fields, got 1"
    assert reasons["bad.csv:5"].startswith("malformed csv")
    assert reasons["bad.csv:7"] == "empty label"
    assert reasons["bad.csv:8"].startswith("malformed csv")
    assert ref.rows["input"] == 7 == ref.rows["accepted"] + ref.rows["rejected"]
    raw = {r["id"]: r["raw"] for r in rejects(ref)}
    assert raw["bad.csv:3"] == "too,many,fields"
    assert (Path(ref.path) / "rejects_sample.csv").exists()


def test_max_rows_caps_each_file(tmp_path: Path, store: ArtifactStore) -> None:
    path = tmp_path / "many.csv"
    path.write_text("text,label\n" + "".join(f"t{i},x\n" for i in range(10)), encoding="utf-8")
    ref = ingest.run(recipe(train_path=str(path), max_rows=3), store)
    assert [r["text"] for r in rows(ref)] == ["t0", "t1", "t2"]
    assert ref.extra["files"]["train"][0]["stopped_at_max_rows"] is True


def test_file_level_errors(tmp_path: Path, store: ArtifactStore) -> None:
    with pytest.raises(DataError, match=r"nope\.csv: file not found"):
        ingest.run(recipe(train_path=str(tmp_path / "nope.csv")), store)
    with pytest.raises(DataError, match="glob matches no files"):
        ingest.run(recipe(train_path=str(tmp_path / "*.csv")), store)

    empty = tmp_path / "empty.csv"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        ingest.run(recipe(train_path=str(empty)), store)
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"header\.csv: empty file \(no rows\)"):
        ingest.run(recipe(train_path=str(header_only)), store)

    cols = tmp_path / "cols.csv"
    cols.write_text("sentence,label\nhi,1\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        ingest.run(recipe(train_path=str(cols)), store)
    message = str(err.value)
    assert "cols.csv" in message and "missing column 'text'" in message and "columns: sentence, label" in message
    assert "\n" not in message

    pq_path = tmp_path / "cols.parquet"
    pq.write_table(pa.table({"review": ["a"], "y": [1]}), pq_path)
    with pytest.raises(DataError, match=r"cols\.parquet: missing column 'text', 'label' \(columns: review, y\)"):
        ingest.run(recipe(train_path=str(pq_path)), store)

    conll = tmp_path / "ner.conll"
    conll.write_text("EU\tB-ORG\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"ner\.conll: format 'conll' is not a text-classification source"):
        ingest.run(recipe(train_path=str(conll)), store)

    not_parquet = tmp_path / "broken.parquet"
    not_parquet.write_bytes(b"this is not parquet")
    with pytest.raises(DataError, match=r"broken\.parquet: unreadable parquet file"):
        ingest.run(recipe(train_path=str(not_parquet)), store)
    assert not (store.root / "ingest").exists() or not any((store.root / "ingest").iterdir())


def test_cache_hit_force_and_config_change(tmp_path: Path, store: ArtifactStore) -> None:
    path = tmp_path / "d.csv"
    path.write_text("text,label\na,x\nb,y\n", encoding="utf-8")
    first = ingest.run(recipe(train_path=str(path)), store)
    assert first.cache_hit is False
    second = ingest.run(recipe(train_path=str(path)), store)
    assert second.cache_hit is True and second.fingerprint == first.fingerprint
    assert second.rows == first.rows and second.extra["metrics"] == first.extra["metrics"]
    forced = ingest.run(recipe(train_path=str(path)), store, force=True)
    assert forced.cache_hit is False and forced.fingerprint == first.fingerprint
    other = ingest.run(recipe(train_path=str(path), max_rows=1), store)
    assert other.fingerprint != first.fingerprint and other.rows["train"] == 1
    # allowed labels are validate's business: they do not change ingest's fingerprint
    same = ingest.run(recipe(train_path=str(path), labels=["x", "y"]), store)
    assert same.cache_hit is True and same.fingerprint == first.fingerprint
    path.write_text("text,label\na,x\nb,z\n", encoding="utf-8")  # new content -> new fingerprint
    changed = ingest.run(recipe(train_path=str(path)), store)
    assert changed.fingerprint != first.fingerprint


def test_real_trec_train_file(store: ArtifactStore) -> None:
    trec = load_recipe(ROOT / "configs" / "trec.yaml", ["data.test_path=null"])
    ref = ingest.run(trec, store, base_dir=ROOT)
    assert ref.rows == {"input": 5452, "accepted": 5452, "rejected": 0, "train": 5452, "test": 0}
    assert ref.extra["replaced_chars"] == 1
    assert ref.extra["labels_seen"] == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    table = pq.read_table(ref.file("train.parquet"))
    row66 = table.slice(65, 1).to_pylist()[0]
    assert row66["id"] == "train_5500.label:66" and "\ufffd" in row66["text"] and row66["label"] == "LOC"
    assert table.slice(0, 1).to_pylist()[0] == {
        "id": "train_5500.label:1", "text": "How did serfdom develop in and then leave Russia ?", "label": "DESC",
    }
