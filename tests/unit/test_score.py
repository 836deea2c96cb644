"""Batch scoring's streaming core with a stand-in model: every format, every reject reason, rows in = scored + rejected."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks import score
from tasks.core.store import DataError


class Model:
    """Labels a text ``pos`` when it contains "good"; refuses texts containing "boom"; records batch sizes."""

    def __init__(self) -> None:
        self.batches: list[int] = []

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        texts = frame["text"].tolist()
        self.batches.append(len(texts))
        if any("boom" in t for t in texts):
            raise ValueError("cannot tokenize boom")
        pos = [0.9 if "good" in t else 0.2 for t in texts]
        return pd.DataFrame({"label": ["pos" if p > 0.5 else "neg" for p in pos], "score": [max(p, 1 - p) for p in pos],
                             "probabilities": [[1 - p, p] for p in pos]})


ROWS = [("a", "a good film"), ("b", "a dull film"), ("c", ""), ("d", "good and boom"), ("e", "good")]


def _write(path: Path, fmt: str) -> Path:
    frame = pd.DataFrame(ROWS, columns=["id", "text"])
    if fmt == "csv":
        path.write_text("id,text\n" + "".join(f'{i},"{t}"\n' for i, t in ROWS) + 'f,"x",extra\n')
    elif fmt == "tsv":
        path.write_text("id\ttext\n" + "".join(f"{i}\t{t}\n" for i, t in ROWS) + "f\n")
    elif fmt == "jsonl":
        lines = [json.dumps({"id": i, "text": t}) for i, t in ROWS] + ["{broken", "[1, 2]", json.dumps({"id": "g", "text": 3}),
                                                                     "", json.dumps({"id": "h"})]
        path.write_text("\n".join(lines) + "\n")
    else:
        pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
    return path


EXPECTED_REASONS = {
    "csv": {"empty text": 1, "prediction failed": 1, "malformed row": 1},
    "tsv": {"empty text": 1, "prediction failed": 1, "malformed row": 1},
    "jsonl": {"empty text": 1, "prediction failed": 1, "malformed JSON": 1, "not a JSON object": 1,
              "text is not a string": 1, "missing text": 1},
    "parquet": {"empty text": 1, "prediction failed": 1},
}


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_every_row_is_scored_or_rejected_with_a_reason(tmp_path: Path, fmt: str) -> None:
    source = _write(tmp_path / f"in.{fmt}", fmt)
    model = Model()
    result = score.score_file(model, "clf", "7", source, tmp_path / "out.parquet", "text", batch_size=2)
    assert result.rows_in == result.rows_scored + result.rows_rejected
    assert result.rows_scored == 3  # a, b, e
    assert result.rejected_by_reason == EXPECTED_REASONS[fmt]
    out = pq.read_table(tmp_path / "out.parquet").to_pandas()
    assert out["id"].tolist() == ["a", "b", "e"]
    assert out["prediction"].tolist() == ["pos", "neg", "pos"]
    assert out["model_version"].unique().tolist() == ["7"]
    assert [list(p) for p in out["probabilities"]] == [[pytest.approx(0.1), 0.9], [0.8, 0.2], [pytest.approx(0.1), 0.9]]
    rejects = pq.read_table(result.rejects)
    assert Path(result.rejects) == tmp_path / "out.rejects.parquet"
    assert rejects.num_rows == result.rows_rejected and rejects.column_names[:3] == ["id", "split", "reason"]
    assert "d" in rejects.column("id").to_pylist()  # the row the model refused, found by rescoring its batch row by row
    assert max(model.batches) <= 2  # streamed: never more than one batch at a time


def test_ids_default_to_file_and_row_and_gzip_is_read(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl.gz"
    with gzip.open(path, "wt") as handle:
        handle.write("\n".join(json.dumps({"text": t}) for t in ("good", "bad", "good")) + "\n")
    result = score.score_file(Model(), "clf", "1", path, tmp_path / "o.parquet", "text")
    assert pq.read_table(tmp_path / "o.parquet").column("id").to_pylist() == ["in.jsonl.gz:1", "in.jsonl.gz:2",
                                                                              "in.jsonl.gz:3"]
    assert (result.rows_in, result.rows_scored) == (3, 3)


def test_a_large_file_streams_in_many_batches(tmp_path: Path) -> None:
    n = 25_000
    path = tmp_path / "big.csv"
    path.write_text("text\n" + "".join(("good day\n" if i % 3 else "dull day\n") for i in range(n)))
    model = Model()
    result = score.score_file(model, "clf", "2", path, tmp_path / "big.parquet", "text", batch_size=1000)
    assert (result.rows_in, result.rows_scored, result.rows_rejected) == (n, n, 0)
    assert len(model.batches) == result.batches >= 25 and max(model.batches) <= 1000
    assert pq.ParquetFile(tmp_path / "big.parquet").metadata.num_rows == n


def test_pixels_are_checked_against_the_image_shape() -> None:
    assert score.check_input([0] * 4, "pixels", 4) is None
    assert score.check_input([0] * 3, "pixels", 4) == "pixels: expected 4 values, got 3"
    assert score.check_input([0, 1, 2, 300], "pixels", 4) == "pixels: values must be integers 0-255"
    assert score.check_input("0 1 2 3", "pixels", 4) == "pixels is not a list (str)"
    assert score.check_input(None, "pixels", 4) == "missing pixels"


def test_file_problems_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="input file not found"):
        score.score_file(Model(), "clf", "1", tmp_path / "nope.csv", tmp_path / "o.parquet", "text")
    (tmp_path / "in.xlsx").write_text("x")
    with pytest.raises(DataError, match="cannot score a xlsx file"):
        score.score_file(Model(), "clf", "1", tmp_path / "in.xlsx", tmp_path / "o.parquet", "text")
    (tmp_path / "in.csv").write_text("id,body\n1,good\n")
    with pytest.raises(DataError, match=r"no column 'text' to score \(columns: id, body\)"):
        score.score_file(Model(), "clf", "1", tmp_path / "in.csv", tmp_path / "o.parquet", "text")
    assert not (tmp_path / "o.parquet").exists()  # a failed run leaves no half-written output


def _is_text(kind: pa.DataType) -> bool:
    return pa.types.is_string(kind) or pa.types.is_large_string(kind)


class Tagger:
    """A token-classification stand-in: the tokens predictor's columns, ``entities`` empty unless a word is capitalised."""

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        tags = [["B-name" if w[:1].isupper() else "O" for w in t.split()] for t in frame["text"]]
        entities = [[{"type": "name", "text": w, "start": t.index(w), "score": np.float32(0.75)}
                     for w in t.split() if w[:1].isupper()] for t in frame["text"]]
        return pd.DataFrame({"entities": entities, "tags": tags, "label": [" ".join(t) for t in tags],
                             "score": [np.float64(0.5)] * len(tags)})


@pytest.mark.parametrize("batch_size", [1, 2, 3, 10])
def test_entities_with_and_without_records_share_one_column_type(tmp_path: Path, batch_size: int) -> None:
    # batch 1 (of size 2) has no entity at all, batch 2 mixes both: every value must still be JSON text
    texts = ["no one here", "nor here", "ask Ada", "quiet", "Bob and Eve met"]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = score.score_file(Tagger(), "ner", "3", path, tmp_path / "out.parquet", "text", batch_size=batch_size)
    assert (result.rows_scored, result.rows_rejected) == (5, 0)
    table = pq.read_table(tmp_path / "out.parquet")
    assert _is_text(table.schema.field("entities").type)
    tags = table.schema.field("tags").type
    assert pa.types.is_list(tags) and _is_text(tags.value_type)  # flat lists stay lists
    entities = [json.loads(v) for v in table.column("entities").to_pylist()]
    assert [[e["text"] for e in row] for row in entities] == [[], [], ["Ada"], [], ["Bob", "Eve"]]
    assert entities[2][0]["score"] == 0.75  # numpy float32 made a JSON number
    assert table.column("prediction").to_pylist()[2] == "O B-name"


def test_multitask_columns_with_empty_entity_batches_are_json_too(tmp_path: Path) -> None:
    class Multi(Tagger):
        def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
            out = super().predict(frame)
            return pd.DataFrame({"label": [json.dumps({"ner": len(e)}) for e in out["entities"]],
                                 "ner.entities": out["entities"], "sentiment.probabilities": [[0.3, 0.7]] * len(out)})

    path = tmp_path / "in.csv"
    path.write_text("text\nnothing\nnobody\nmeet Ada\n")
    score.score_file(Multi(), "multi", "1", path, tmp_path / "out.parquet", "text", batch_size=2)
    table = pq.read_table(tmp_path / "out.parquet")
    assert [len(json.loads(v)) for v in table.column("ner.entities").to_pylist()] == [0, 0, 1]
    assert table.schema.field("sentiment.probabilities").type == pa.list_(pa.float64())


def test_row_numbers_and_ids_agree_around_a_malformed_row(tmp_path: Path) -> None:
    path = tmp_path / "in.csv"
    # data rows: 1 ok, 2 malformed, 3 ok, 4 empty, 5 refused by the model, 6 ok
    path.write_text('text\ngood one\n"x",extra\ndull\n""\nboom\ngood end\n')
    result = score.score_file(Model(), "clf", "1", path, tmp_path / "out.parquet", "text", batch_size=2)
    out = pq.read_table(tmp_path / "out.parquet").column("id").to_pylist()
    rejects = pq.read_table(result.rejects).to_pandas().set_index("row")
    assert out == ["in.csv:1", "in.csv:3", "in.csv:6"]
    assert sorted(rejects.index) == [2, 4, 5]
    assert rejects.loc[2, "reason"].startswith("malformed row") and rejects.loc[2, "id"] == "in.csv:2"
    assert rejects.loc[4, "reason"] == "empty text" and rejects.loc[4, "id"] == "in.csv:4"
    assert rejects.loc[5, "reason"].startswith("prediction failed") and rejects.loc[5, "id"] == "in.csv:5"
    assert not set(out) & set(rejects["id"])  # no id names two rows


def test_jsonl_rows_are_numbered_by_line(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "good"}) + "\n{broken\n\n" + json.dumps({"text": ""}) + "\n"
                    + json.dumps({"text": "boom"}) + "\n" + json.dumps({"text": "dull"}) + "\n")
    result = score.score_file(Model(), "clf", "1", path, tmp_path / "out.parquet", "text", batch_size=2)
    assert pq.read_table(tmp_path / "out.parquet").column("id").to_pylist() == ["in.jsonl:1", "in.jsonl:6"]
    rejects = pq.read_table(result.rejects).to_pandas()
    assert dict(zip(rejects["row"], rejects["id"])) == {2: "in.jsonl:2", 4: "in.jsonl:4", 5: "in.jsonl:5"}
