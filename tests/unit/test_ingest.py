"""Ingest stage: formats, ids, labels, decoding, quarantined rows, file errors, caching, real TREC."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.store import ArtifactStore, DataError, StageRef
from tasks.registry import Recipe, load_recipe, recipe_from_dict
from tasks.text import ingest

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
    # a text recipe refuses format: conll outright (tests/unit/test_config.py); by extension it is not inferred
    with pytest.raises(DataError, match=r"ner\.conll' from its extension: set data\.format"):
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


# --------------------------------------------------------------------------------------------
# bad input: JSON that is not JSON lines, non-string texts, numeric labels, CR-only files


def one_line_error(excinfo: pytest.ExceptionInfo[DataError], limit: int = 600) -> str:
    """The DataError's message, checked to be one bounded line."""
    message = str(excinfo.value)
    assert "\n" not in message and "\r" not in message and len(message) <= limit, message
    return message


@pytest.mark.parametrize("layout", ["indented", "one line", "one object per line"])
def test_json_array_is_a_file_error_naming_the_format(tmp_path: Path, store: ArtifactStore, layout: str) -> None:
    records = [{"text": f"text {i}", "label": i % 2} for i in range(30)]
    content = {
        "indented": json.dumps(records, indent=2),
        "one line": json.dumps(records),
        "one object per line": "[\n" + ",\n".join(json.dumps(r) for r in records) + "\n]\n",
    }[layout]
    path = tmp_path / "x.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        ingest.run(recipe(train_path=str(path)), store)
    message = one_line_error(err)
    assert message.startswith(f"{path}: a JSON array, not JSON lines (one object per line): convert it")


def test_json_that_is_not_json_lines(tmp_path: Path, store: ArtifactStore) -> None:
    pretty = tmp_path / "one.json"
    pretty.write_text(json.dumps({"text": "a", "label": "x"}, indent=2), encoding="utf-8")
    with pytest.raises(DataError, match=r"one\.json: one JSON object over 4 lines, not JSON lines"):
        ingest.run(recipe(train_path=str(pretty)), store)

    scalars = tmp_path / "scalars.jsonl"
    scalars.write_text("1\n\"a string\"\nnull\n[1, 2]\ntrue\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        ingest.run(recipe(train_path=str(scalars)), store)
    assert "scalars.jsonl: not JSON lines (one object per line): no line is a JSON object (line 1: 1)" in one_line_error(err)

    broken = tmp_path / "broken.json"  # an array cut short: not one JSON document, no object line
    broken.write_text("[\n" + ",\n".join(json.dumps({"text": "t", "label": 1}) for _ in range(5)) + ",\n",
                      encoding="utf-8")
    with pytest.raises(DataError) as err:
        ingest.run(recipe(train_path=str(broken)), store)
    assert "no line is a JSON object" in one_line_error(err) and "starts with '['" in str(err.value)

    # a single object on one line is a JSON lines file of one row
    single = tmp_path / "single.jsonl"
    single.write_text(json.dumps({"text": "a", "label": "x"}), encoding="utf-8")
    assert rows(ingest.run(recipe(train_path=str(single)), store)) == [{"id": "single.jsonl:1", "text": "a", "label": "x"}]


def test_jsonl_values_that_are_not_objects_or_strings_are_rejected_rows(tmp_path: Path, store: ArtifactStore) -> None:
    path = tmp_path / "mixed.jsonl"
    lines = [
        json.dumps({"text": "fine", "label": "a"}),
        "42",
        "[" * 100_000,  # too deep for the json module: a RecursionError, not a crash
        json.dumps({"text": 7, "label": "a"}),
        json.dumps({"text": True, "label": "b"}),
        json.dumps({"text": ["a", "b"], "label": "b"}),
        json.dumps({"text": "also fine", "label": "b"}),
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    ref = ingest.run(recipe(train_path=str(path)), store)
    assert [r["text"] for r in rows(ref)] == ["fine", "also fine"]
    reasons = {r["id"]: r["reason"] for r in rejects(ref)}
    assert reasons == {
        "mixed.jsonl:2": "bad JSON: expected an object, got number",
        "mixed.jsonl:3": "bad JSON: nested too deeply",
        "mixed.jsonl:4": "text is a JSON number, expected a string",
        "mixed.jsonl:5": "text is a JSON boolean, expected a string",
        "mixed.jsonl:6": "text is a JSON array, expected a string",
    }
    accounted(ref)


def test_all_rows_rejected_reaches_validate_as_a_data_error(tmp_path: Path, store: ArtifactStore) -> None:
    from tasks.text import validate

    path = tmp_path / "nulls.jsonl"
    path.write_text("".join(json.dumps({"text": None, "label": "a"}) + "\n" for _ in range(3)), encoding="utf-8")
    r = recipe(train_path=str(path))
    ref = ingest.run(r, store)
    assert ref.rows["accepted"] == 0
    # an empty train table used to end in pyarrow's ArrowNotImplementedError (count_distinct on null)
    with pytest.raises(DataError, match="validate failed: .*train_rows"):
        validate.run(r, ref, store)


def test_non_string_text_column_is_refused(tmp_path: Path, store: ArtifactStore) -> None:
    for name, values in (("ints", [1, 2, 3]), ("floats", [1.5, 2.0, 3.0]), ("bools", [True, False, True])):
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.table({"text": values, "label": [0, 1, 0]}), path)
        with pytest.raises(DataError) as err:
            ingest.run(recipe(train_path=str(path)), store)
        message = one_line_error(err)
        assert message.startswith(f"{path}: text column 'text' has type ")
        assert f"type {pa.array(values).type}, expected a string type" in message

    # string texts, plain or dictionary-encoded, with numeric labels, are fine
    ok = tmp_path / "ok.parquet"
    texts = pa.array(["a", "b", "a"]).dictionary_encode()
    pq.write_table(pa.table({"text": texts, "label": [0, 1, 0]}), ok)
    assert [r["text"] for r in rows(ingest.run(recipe(train_path=str(ok)), store))] == ["a", "b", "a"]

    numbers = tmp_path / "numbers.jsonl"
    numbers.write_text("".join(json.dumps({"text": i, "label": i % 2}) + "\n" for i in range(5)), encoding="utf-8")
    with pytest.raises(DataError) as err:
        ingest.run(recipe(train_path=str(numbers)), store)
    assert "numbers.jsonl: key 'text' holds no strings (5 number value(s))" in one_line_error(err)


def test_canonical_number() -> None:
    assert [ingest.canonical_number(x) for x in ("0.0", "1.00", "-0.0", "+2", "007", "2e3", "1.", ".0", "3")] == [
        "0", "1", "0", "2", "7", "2000", "1", "0", "3"]
    assert [ingest.canonical_number(x) for x in ("1.5", "-0.25", "1e-3", "1e400", "pos", "1,0", "")] == [
        "1.5", "-0.25", "1e-3", "1e400", "pos", "1,0", ""]
    assert ingest.is_numeric_label("-1.5e3") and not ingest.is_numeric_label("1.2.3")
    assert not ingest.is_numeric_label("nan") and not ingest.is_numeric_label(" 1")


def test_label_rewrites_only_when_every_label_is_numeric() -> None:
    assert ingest.label_rewrites(["0", "0.0", "1.00", "1.5", "1"]) == {"0.0": "0", "1.00": "1"}
    assert ingest.label_rewrites(["0", "0.0", "pos"]) == {}  # names, not numbers: left alone
    assert ingest.label_rewrites(["0", "1"]) == {}
    assert ingest.label_rewrites([]) == {}
    assert ingest.canonical_label_list(["1.0", "0.0", "1"]) == ["1", "0"]
    assert ingest.canonical_label_list(["1.0", "pos"]) == ["1.0", "pos"]
    assert ingest.canonical_label_list(None) is None
    table = pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "z"], "label": ["0.0", "1", "1.00"]})
    out, changed = ingest.rewrite_labels(table, {"0.0": "0", "1.00": "1"})
    assert out.column("label").to_pylist() == ["0", "1", "1"] and changed == 2
    assert out.schema == table.schema and ingest.rewrite_labels(table, {}) == (table, 0)


def test_numeric_labels_are_one_class_across_train_and_test(tmp_path: Path, store: ArtifactStore) -> None:
    train = tmp_path / "train.csv"
    train.write_text("text,label\na,0\nb,0.0\nc,1.00\nd,1\ne,1.5\n", encoding="utf-8")
    test = tmp_path / "test.jsonl"  # JSON numbers: 0.0 reads as "0.0", 1 as "1"
    test.write_text(json.dumps({"text": "f", "label": 0.0}) + "\n" + json.dumps({"text": "g", "label": 1}) + "\n",
                    encoding="utf-8")
    ref = ingest.run(recipe(train_path=str(train), test_path=str(test)), store)
    assert [r["label"] for r in rows(ref)] == ["0", "0", "1", "1", "1.5"]
    assert [r["label"] for r in rows(ref, "test")] == ["0", "1"]
    assert ref.extra["labels_seen"] == ["0", "1", "1.5"]
    assert ref.extra["metrics"]["labels_canonicalised"] == 3
    assert ref.extra["metrics"]["train.labels_canonicalised"] == 2
    assert ref.extra["metrics"]["test.labels_canonicalised"] == 1
    assert ref.extra["labels_canonicalised"] == {"rows": 3, "rewrites": {"0.0": "0", "1.00": "1"}}

    # one non-numeric label anywhere (here in test) and every label is kept as written
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("text,label\nf,0.0\ng,other\n", encoding="utf-8")
    kept = ingest.run(recipe(train_path=str(train), test_path=str(mixed)), store)
    assert [r["label"] for r in rows(kept)] == ["0", "0.0", "1.00", "1", "1.5"]
    assert kept.extra["metrics"]["labels_canonicalised"] == 0


def test_cr_only_files_are_read_line_by_line(tmp_path: Path, store: ArtifactStore) -> None:
    tsv = tmp_path / "mac.tsv"
    tsv.write_bytes(b"text\tlabel\r" + b"".join(b"some text %d\t%d\r" % (i, i % 2) for i in range(2000)))
    ref = ingest.run(recipe(train_path=str(tsv)), store)
    got = rows(ref)
    assert len(got) == 2000 and got[0] == {"id": "mac.tsv:2", "text": "some text 0", "label": "0"}

    csv_path = tmp_path / "mac.csv"  # a quoted field may still hold a line break
    csv_path.write_bytes(b'text,label\r"two\rlines",a\rplain,b\r')
    assert [(r["id"], r["text"]) for r in rows(ingest.run(recipe(train_path=str(csv_path)), store))] == [
        ("mac.csv:2", "two\rlines"), ("mac.csv:4", "plain")]

    jsonl = tmp_path / "mac.jsonl"  # and a final LF after CR lines does not turn it into one line
    jsonl.write_bytes(b"".join(json.dumps({"text": f"t{i}", "label": "x"}).encode() + b"\r" for i in range(3)) + b"\n")
    assert [r["id"] for r in rows(ingest.run(recipe(train_path=str(jsonl)), store))] == [
        "mac.jsonl:1", "mac.jsonl:2", "mac.jsonl:3"]

    # in an ordinary LF (or CRLF) file a stray CR inside a line stays text, as before
    lf = tmp_path / "lf.tsv"
    lf.write_bytes(b"text\tlabel\r\nold\rmac text\tx\r\nnext\ty\r\n")
    assert [r["text"] for r in rows(ingest.run(recipe(train_path=str(lf)), store))] == ["old\rmac text", "next"]


def test_physical_lines() -> None:
    assert ingest.physical_lines("a\nb\r\nc") == ["a\n", "b\r\n", "c\n"]
    assert ingest.physical_lines("a\rb\r\rc") == ["a\r", "b\r", "\r", "c\n"]
    assert ingest.physical_lines("a\rb\rc\n") == ["a\r", "b\r", "c\n"]
    assert ingest.physical_lines("") == []
    assert [ingest.strip_line_break(x) for x in ("a\r\n", "a\r", "a\n", "a", "a\r\r\n")] == ["a", "a", "a", "a", "a\r"]


def test_bounded() -> None:
    from tasks.core.store import bounded

    assert bounded("short") == "short"
    long = "x" * 1000
    cut = bounded(long, limit=100)
    assert len(cut) <= 100 and cut.endswith(" more characters)") and cut.startswith("xxx")
    kept = len(cut) - len(cut[cut.index("…"):])
    assert cut == "x" * kept + f"… ({1000 - kept} more characters)"
    assert bounded(cut, limit=100) == cut  # bounding twice changes nothing
    assert bounded("a\rb\nc\x00d\x1b[2J") == "a\\rb\\nc\\x00d\\x1b[2J"  # one plain line, whatever the file held
    error = DataError("f.tsv: " + "y" * 50_000)
    assert len(str(error)) <= 2000 and str(error).startswith("f.tsv: yyy")


def test_error_messages_quote_file_content_bounded(tmp_path: Path, store: ArtifactStore) -> None:
    # a csv read with the wrong delimiter: every line is one column; no line break at all
    one_line = tmp_path / "one.tsv"
    content = ",".join(f"column{i}" for i in range(3000))
    one_line.write_text(content, encoding="utf-8")
    with pytest.raises(DataError) as err:
        ingest.run(recipe(train_path=str(one_line)), store)
    message = one_line_error(err)
    assert message.startswith(f"{one_line}: missing column 'text', 'label' (columns: column0,column1,")
    assert "more characters)" in message and f"found 1 line of {len(content)} characters, no line breaks" in message

    wide = tmp_path / "wide.tsv"
    wide.write_text("\t".join(f"c{i}" for i in range(500)) + "\nx\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        ingest.run(recipe(train_path=str(wide)), store)
    assert "(500 columns: c0, c1, c2" in one_line_error(err)

    mixed = tmp_path / "mixed.csv"  # CRs in the header of an otherwise LF file
    mixed.write_text("text\rlabel\na\n" * 1 + "b\nc\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        ingest.run(recipe(train_path=str(mixed)), store)
    assert "carriage return(s) inside the line: CR line endings?" in one_line_error(err)

    utf16 = tmp_path / "utf16.tsv"
    utf16.write_bytes("text\tlabel\nhello\tx\n".encode("utf-16-le"))
    with pytest.raises(DataError) as err:
        ingest.run(recipe(train_path=str(utf16)), store)
    assert "NUL characters: UTF-16 text? set data.encoding" in one_line_error(err)
    assert "\x00" not in str(err.value) and "t\\x00e\\x00x\\x00t" in str(err.value)

    many_keys = tmp_path / "keys.jsonl"
    many_keys.write_text(json.dumps({f"key{i}": i for i in range(2000)}) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as err:
        ingest.run(recipe(train_path=str(many_keys)), store)
    assert "missing column 'text', 'label' (keys: key0, key1" in one_line_error(err)
