"""Token ingest: CoNLL-2003-style IOB1 four-column files, malformed CoNLL lines, jsonl and parquet lists,
row accounting, and the recipe class the union picks."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.config import RecipeError
from tasks.core.store import ArtifactStore, DataError
from tasks.registry import recipe_from_dict
from tasks.tokens import ingest
from tasks.tokens.config import TokenRecipe

CONLL2003 = """-DOCSTART- -X- -X- O

EU NNP B-NP I-ORG
rejects VBZ B-VP O
German JJ B-NP I-MISC
call NN I-NP O
to TO B-VP O
boycott VB I-VP O
British JJ B-NP I-MISC
lamb NN I-NP O
. . O O

Peter NNP B-NP I-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP I-LOC
1996-08-22 CD I-NP O
"""

MALFORMED = "Paris\tB-LOC\nis\tO\n\nBerlin\tB-LOC\nrocks\n\nRome\tX-LOC\n\nMadrid B-LOC extra\n\nOslo\tB-LOC\n"


def recipe(tmp_path: Path, **data) -> TokenRecipe:
    raw = {"name": "t", "task": "token-classification", "data": data}
    r = recipe_from_dict(raw)
    assert isinstance(r, TokenRecipe)
    return r


def read(tmp_path: Path, text: str, name: str = "train.conll", **data):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    r = recipe(tmp_path, train_path=str(path), **data)
    ref = ingest.run(r, ArtifactStore(tmp_path / "store"), base_dir=tmp_path)
    return ref, pq.read_table(ref.file("train.parquet")), pq.read_table(ref.file("rejects.parquet"))


def test_conll2003_iob1_four_columns_by_configuration(tmp_path: Path) -> None:
    ref, table, rejects = read(tmp_path, CONLL2003, columns=["token", "pos", "chunk", "ner"], label_column="ner",
                               tag_scheme="iob1")
    assert table.num_rows == 3 and rejects.num_rows == 0
    assert table.column("tokens")[0].as_py()[:3] == ["EU", "rejects", "German"]
    assert table.column("tags")[0].as_py() == ["B-ORG", "O", "B-MISC", "O", "O", "O", "B-MISC", "O", "O"]
    assert table.column("tags")[1].as_py() == ["B-PER", "I-PER"]
    assert table.column("id").to_pylist() == ["train.conll:3", "train.conll:13", "train.conll:18"]
    assert ref.extra["metrics"]["docstarts"] == 2
    assert ref.extra["labels_seen"] == ["LOC", "MISC", "ORG", "PER"]


def test_wrong_tag_column_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no column 'tag'"):
        read(tmp_path, CONLL2003, columns=["token", "pos", "chunk", "ner"])


def test_malformed_lines_reject_their_sentence_with_the_line(tmp_path: Path) -> None:
    ref, table, rejects = read(tmp_path, MALFORMED)
    assert table.column("tokens").to_pylist() == [["Paris", "is"], ["Oslo"]]
    reasons = dict(zip(rejects.column("id").to_pylist(), rejects.column("reason").to_pylist()))
    assert reasons["train.conll:4"] == "token without a tag (line 5)"
    assert reasons["train.conll:7"].startswith("tag matches no scheme (line 7)")
    # whitespace-separated by default: three fields where two are expected
    assert reasons["train.conll:9"].startswith("wrong field count (line 9): expected 2")
    assert ref.rows == {"input": 5, "accepted": 2, "rejected": 3, "train": 2, "test": 0}
    assert ref.extra["rejects_by_reason"] == {"token without a tag": 1, "tag matches no scheme": 1, "wrong field count": 1}


def test_tab_delimiter_keeps_spaces_inside_a_field(tmp_path: Path) -> None:
    _, table, rejects = read(tmp_path, "New York\tB-LOC\nis\tO\n", delimiter="\t")
    assert table.column("tokens")[0].as_py() == ["New York", "is"] and rejects.num_rows == 0


def test_bioes_is_converted(tmp_path: Path) -> None:
    _, table, _ = read(tmp_path, "a S-PER\nb B-LOC\nc E-LOC\n", tag_scheme="bioes")
    assert table.column("tags")[0].as_py() == ["B-PER", "B-LOC", "I-LOC"]


def test_jsonl_and_parquet_lists(tmp_path: Path) -> None:
    rows = [{"tokens": ["Ann", "runs"], "tags": ["B-PER", "O"]}, {"tokens": ["x"], "tags": ["O", "O"]}, "not json"]
    text = "\n".join(json.dumps(r) if isinstance(r, dict) else r for r in rows) + "\n"
    ref, table, rejects = read(tmp_path, text, name="train.jsonl")
    assert table.column("tags").to_pylist() == [["B-PER", "O"]]
    assert min(rejects.column("reason").to_pylist()).startswith("bad JSON (line 3)")
    assert any("differ in length" in r for r in rejects.column("reason").to_pylist())
    assert ref.rows["input"] == 3
    pq.write_table(pa.table({"words": [["Bo", "sings"], None], "ner": [["B-PER", "O"], ["O"]]}), tmp_path / "t.parquet")
    r = recipe(tmp_path, train_path=str(tmp_path / "t.parquet"), text_column="words", label_column="ner")
    ref = ingest.run(r, ArtifactStore(tmp_path / "store2"))
    assert ref.rows == {"input": 2, "accepted": 1, "rejected": 1, "train": 1, "test": 0}


def test_empty_and_unreadable_files_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty file"):
        read(tmp_path, "\n\n")
    with pytest.raises(DataError, match="no sentences"):
        read(tmp_path, "-DOCSTART- O\n\n")


def test_recipe_defaults_and_foreign_keys() -> None:
    r = recipe_from_dict({"name": "t", "task": "token-classification", "data": {"train_path": "x.conll"}})
    assert r.model.arch == "pretrained" and r.train.lr == 1e-4 and r.evaluate.primary_metric == "f1"
    assert r.data.columns_for("conll") == ("token", "tag") and r.data.columns_for("jsonl") == ("tokens", "tags")
    scratch = recipe_from_dict({"name": "t", "task": "token-classification", "data": {"train_path": "x"},
                                "model": {"arch": "scratch"}})
    assert scratch.train.lr == 1e-3
    with pytest.raises(RecipeError, match="label_pattern"):
        recipe_from_dict({"name": "t", "task": "token-classification", "data": {"train_path": "x", "label_pattern": "x"}})
    with pytest.raises(RecipeError, match="tag_scheme"):
        recipe_from_dict({"name": "t", "task": "token-classification", "data": {"train_path": "x", "tag_scheme": "bilou2"}})
