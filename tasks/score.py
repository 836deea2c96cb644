"""Batch scoring: stream a file through a registered model, in batches, accounting for every row.

``nightshift score --model NAME [--alias champion] --input FILE --output OUT.parquet`` (the Prefect
flow ``flows/score.py``) calls :func:`score_file` with the loaded model. The input is read in batches
and never whole, so a file larger than memory works:

- ``parquet``: ``pyarrow.parquet.ParquetFile.iter_batches`` (only the id and input columns are read);
- ``csv`` / ``tsv``: ``pyarrow.csv.open_csv``, a streaming reader (``tsv``: tab-separated, no
  quoting, as the text kind's ingest reads it); a malformed row (wrong field count) is a reject;
- ``jsonl``: one JSON object per line, read line by line; a bad JSON line or one that is not an
  object is a reject, blank lines are not rows (as in ingest).

``.gz`` files are decompressed on the fly. The text kind's ingest readers are not reused: they read
a whole file into memory to report on it, which is what scoring must not do.

Each row is accepted or rejected with a reason (``missing text``, ``text is not a string``, ``empty
text``, ``missing pixels``, ``pixels: expected 784 values, got 3`` ..., ``prediction failed: ...``):
rows in = rows scored + rows rejected. The output Parquet has ``id``, ``prediction`` (the label, or
the entities as JSON for a model without one), the model's other outputs (``label_name``, ``score``,
``probabilities``, ``entities`` ...) and ``model_version``; rejects go to ``<OUT stem>.rejects.parquet``
next to it (``id, split, reason, row, raw``). Ids come from the ``id`` column, else
``"<file name>:<row>"``. ``row`` is the same number for scored and rejected rows: the 1-based data
row of a CSV / TSV (header excluded, malformed rows counted), the line number of a JSONL file, the
row of a Parquet file.

An output column whose values are dicts or lists of dicts (``entities``, ``<task>.entities``) is JSON
text in every row, ``[]`` included, so every batch writes the same Parquet type
(:func:`tasks.core.jsonable.json_columns` decides once, on the first scored batch).
"""

from __future__ import annotations

import gzip
import io
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.core.jsonable import dumps, json_columns, plain
from tasks.core.rejects import reason_kind, rejects_schema
from tasks.core.store import DataError

FORMATS = ("csv", "tsv", "jsonl", "parquet")
REJECTS_SCHEMA = rejects_schema(("row", pa.int64()), ("raw", pa.string()))
RAW_CHARS = 1000


class ScoreResult(BaseModel):
    """What a scoring run did: the row accounting MLflow gets."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="Registered model name.")
    model_version: str = Field(description="The version that scored every row.")
    input: str = Field(description="The input file.")
    output: str = Field(description="The scored Parquet file.")
    rejects: str = Field(description="The rejects Parquet file next to it.")
    rows_in: int = Field(description="Rows read.")
    rows_scored: int = Field(description="Rows written to the output.")
    rows_rejected: int = Field(description="Rows written to the rejects file.")
    rejected_by_reason: dict[str, int] = Field(description="Rejected rows per reason kind.")
    batches: int = Field(description="Batches predicted.")
    seconds: float = Field(description="Wall time.")


def format_of(path: Path) -> str:
    """The input format from the file name (``.gz`` looked through)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1].lstrip(".") if suffixes else ""
    ext = {"json": "jsonl", "ndjson": "jsonl", "txt": "tsv", "pq": "parquet"}.get(ext, ext)
    if ext not in FORMATS:
        raise DataError(f"{path}: cannot score a {ext or 'suffix-less'} file (formats: {', '.join(FORMATS)})")
    return ext


def rejects_path(output: Path) -> Path:
    return output.with_name(f"{output.name.removesuffix('.parquet')}.rejects.parquet")


# ---------------------------------------------------------------------------------------------- readers
# each yields (row numbers, ids or None, inputs, rejects) per batch: rejects are (row, id, reason, raw)
# found while reading; the row numbers are those the rejects use, so ids "<file>:<row>" never collide


Batch = tuple[list[int], list[str | None], list[Any], list[tuple[int, str, str, str]]]


def _columns(names: list[str], path: Path, input_column: str, id_column: str) -> tuple[str, str | None]:
    if input_column not in names:
        raise DataError(f"{path}: no column {input_column!r} to score (columns: {', '.join(names[:20])}); "
                        f"pass --input-column")
    return input_column, id_column if id_column in names else None


def read_parquet(path: Path, input_column: str, id_column: str, batch_size: int) -> Iterator[Batch]:
    try:
        file = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: not a readable Parquet file: {exc}") from None
    col, ids = _columns(file.schema_arrow.names, path, input_column, id_column)
    seen = 0
    for batch in file.iter_batches(batch_size=batch_size, columns=[c for c in (ids, col) if c]):
        values = batch.column(col).to_pylist()
        row_ids = batch.column(ids).cast(pa.string()).to_pylist() if ids else [None] * len(values)
        yield list(range(seen + 1, seen + len(values) + 1)), row_ids, values, []
        seen += len(values)


def read_delimited(path: Path, input_column: str, id_column: str, batch_size: int, tsv: bool) -> Iterator[Batch]:
    import pyarrow.csv as pacsv

    bad: list[tuple[int, str, str, str]] = []
    malformed: set[int] = set()

    def invalid(row: Any) -> str:
        # pyarrow counts the header as row 1: the data row is one less (the numbering valid rows get below)
        number = int(row.number) - 1 if row.number else 0
        malformed.add(number)
        reason = f"malformed row: expected {row.expected_columns} fields, got {row.actual_columns}"
        bad.append((number, f"{path.name}:{number}", reason, str(row.text)[:RAW_CHARS]))
        return "skip"

    parse = pacsv.ParseOptions(delimiter="\t" if tsv else ",", quote_char=False if tsv else '"',
                               invalid_row_handler=invalid)
    # strings_can_be_null=False keeps an empty field "" (an empty text), not null
    convert = pacsv.ConvertOptions(strings_can_be_null=False, quoted_strings_can_be_null=False)
    try:
        reader = pacsv.open_csv(str(path), read_options=pacsv.ReadOptions(use_threads=False, block_size=1 << 22),
                                parse_options=parse, convert_options=convert)
    except (OSError, pa.ArrowException) as exc:
        raise DataError(f"{path}: cannot read as {'tsv' if tsv else 'csv'}: {str(exc).splitlines()[0]}") from None
    col, ids = _columns(reader.schema.names, path, input_column, id_column)
    last = 0  # the data row of the last valid row numbered
    while True:
        try:
            batch = reader.read_next_batch()
        except StopIteration:
            break
        except pa.ArrowException as exc:
            raise DataError(f"{path}: cannot read as {'tsv' if tsv else 'csv'}: {str(exc).splitlines()[0]}") from None
        column = batch.column(col)
        values = column.cast(pa.string()).to_pylist() if pa.types.is_integer(column.type) or pa.types.is_floating(
            column.type) or pa.types.is_boolean(column.type) else column.to_pylist()
        row_ids = batch.column(ids).cast(pa.string()).to_pylist() if ids else [None] * len(values)
        # the handler ran while this batch was parsed, so every malformed row before these is in `malformed`
        numbers = []
        for _ in values:
            last += 1
            while last in malformed:
                last += 1
            numbers.append(last)
        for start in range(0, len(values), batch_size):
            found, bad[:] = list(bad), []
            yield (numbers[start:start + batch_size], row_ids[start:start + batch_size],
                   values[start:start + batch_size], found)
    if bad:
        yield [], [], [], list(bad)


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix.lower() == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return path.open("r", encoding="utf-8", errors="replace")


def read_jsonl(path: Path, input_column: str, id_column: str, batch_size: int) -> Iterator[Batch]:
    rows: list[int] = []
    ids: list[str | None] = []
    values: list[Any] = []
    bad: list[tuple[int, str, str, str]] = []
    with _open_text(path) as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue  # blank lines are not rows
            try:
                obj = json.loads(line)
            except ValueError as exc:
                bad.append((line_no, f"{path.name}:{line_no}", f"malformed JSON: {exc}", line[:RAW_CHARS]))
                continue
            if not isinstance(obj, dict):
                bad.append((line_no, f"{path.name}:{line_no}", f"not a JSON object ({type(obj).__name__})",
                            line[:RAW_CHARS]))
                continue
            row_id = obj.get(id_column)
            rows.append(line_no)
            ids.append(None if row_id is None else str(row_id))
            values.append(obj.get(input_column))
            if len(values) >= batch_size:
                yield rows, ids, values, bad
                rows, ids, values, bad = [], [], [], []
    if values or bad:
        yield rows, ids, values, bad


def batches(path: Path, input_column: str, id_column: str, batch_size: int) -> Iterator[Batch]:
    """The file's rows in batches: ``(row numbers, ids, inputs, rejects found while reading)``."""
    if not path.is_file():
        raise DataError(f"{path}: input file not found")
    fmt = format_of(path)
    if fmt == "parquet":
        return read_parquet(path, input_column, id_column, batch_size)
    if fmt == "jsonl":
        return read_jsonl(path, input_column, id_column, batch_size)
    return read_delimited(path, input_column, id_column, batch_size, tsv=fmt == "tsv")


# ---------------------------------------------------------------------------------------------- checks


def check_input(value: Any, column: str, pixels: int | None) -> str | None:
    """Why an input cannot be scored, or None."""
    if column == "pixels":
        if value is None:
            return "missing pixels"
        if not isinstance(value, (list, tuple)):
            return f"pixels is not a list ({type(value).__name__})"
        if pixels is not None and len(value) != pixels:
            return f"pixels: expected {pixels} values, got {len(value)}"
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value):
            return "pixels: values must be integers 0-255"
        return None
    if value is None:
        return f"missing {column}"
    if not isinstance(value, str):
        return f"{column} is not a string ({type(value).__name__})"
    if not value.strip():
        return f"empty {column}"
    return None


def _raw(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(plain(value), default=str)
    return text[:RAW_CHARS]


def _as_json(value: Any) -> str | None:
    if value is None or isinstance(value, str):  # already text (a predictor that encodes its own records)
        return value
    return dumps(value, default=str)


def output_frame(predicted: pd.DataFrame, ids: list[str], version: str,
                 as_json: set[str] | None = None) -> pd.DataFrame:
    """``id``, ``prediction``, the model's other output columns, ``model_version``.

    The columns named in ``as_json`` (default: :func:`json_columns` of this frame) are JSON text in
    every row; pass the first batch's choice for every later batch so all batches share one schema.
    """
    columns = {str(name): [plain(v) for v in predicted[name].tolist()] for name in predicted.columns}
    as_json = json_columns(columns) if as_json is None else as_json
    out = pd.DataFrame({"id": ids})
    if "label" in columns:
        out["prediction"] = [str(v) for v in columns["label"]]
    elif "entities" in columns:
        out["prediction"] = [_as_json(v) for v in columns["entities"]]
    else:
        out["prediction"] = [_as_json(v) for v in next(iter(columns.values()))]
    for name, values in columns.items():
        if name != "label":
            out[name] = [_as_json(v) for v in values] if name in as_json else values
    out["model_version"] = str(version)
    return out


def _conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` in the first batch's ``schema``; a column whose type changed is a clear error, not an Arrow trace."""
    try:
        return table.cast(schema)
    except (pa.ArrowException, ValueError) as exc:
        changed = [f.name for f in schema if f.name in table.column_names and table.schema.field(f.name).type != f.type]
        raise DataError(f"score: the model's output column {', '.join(changed) or '?'} changed type between batches "
                        f"({str(exc).splitlines()[0][:200]})") from None


def _predict(model: Any, column: str, inputs: list[Any]) -> tuple[pd.DataFrame | None, list[str | None]]:
    """Predict a batch; when the batch fails, row by row, so one bad row is one reject and not a failed run."""
    try:
        frame = model.predict(pd.DataFrame({column: inputs}))
        if len(frame) == len(inputs):
            return frame.reset_index(drop=True), [None] * len(inputs)
    except Exception:
        pass
    rows, errors = [], []
    for item in inputs:
        try:
            rows.append(model.predict(pd.DataFrame({column: [item]})).reset_index(drop=True))
            errors.append(None)
        except Exception as exc:
            errors.append(f"prediction failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
    return (pd.concat(rows, ignore_index=True) if rows else None), errors


def score_file(model: Any, name: str, version: str, input_path: Path, output_path: Path, column: str,
               batch_size: int = 1024, id_column: str = "id", pixels: int | None = None) -> ScoreResult:
    """Score ``input_path`` with ``model`` (anything with ``predict(DataFrame) -> DataFrame``) into ``output_path``.

    Streams: one batch in memory at a time. Rows in = rows scored + rows rejected, checked before returning.
    """
    if batch_size < 1:
        raise DataError(f"score: batch size must be at least 1, got {batch_size}")
    started = time.perf_counter()
    input_path, output_path = Path(input_path), Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    rejects_file = rejects_path(output_path)
    tmp_out, tmp_rej = output_path.with_name(output_path.name + ".tmp"), rejects_file.with_name(rejects_file.name + ".tmp")
    rows_in = scored = 0
    n_batches = 0
    reasons: Counter[str] = Counter()
    writer: pq.ParquetWriter | None = None
    schema: pa.Schema | None = None
    rejects_writer = pq.ParquetWriter(tmp_rej, REJECTS_SCHEMA)
    as_json: set[str] | None = None  # the first scored batch's JSON columns, kept for every later batch

    def reject(rows: list[tuple[int, str, str, str]]) -> None:
        if rows:
            reasons.update(reason_kind(r[2]) for r in rows)
            rejects_writer.write_table(pa.table({"id": [r[1] for r in rows], "split": ["score"] * len(rows),
                                                 "reason": [r[2] for r in rows], "row": [r[0] for r in rows],
                                                 "raw": [r[3] for r in rows]}, schema=REJECTS_SCHEMA))

    try:
        for rows, ids, values, read_rejects in batches(input_path, column, id_column, batch_size):
            for number, row_id, reason, raw in read_rejects:
                rows_in += 1
                reject([(number, row_id or f"{input_path.name}:{number}", reason, raw)])
            keep_rows, keep_ids, keep, bad = [], [], [], []
            for row, row_id, value in zip(rows, ids, values):
                row_id = row_id if row_id is not None else f"{input_path.name}:{row}"
                why = check_input(value, column, pixels)
                if why is None:
                    keep_rows.append(row)
                    keep_ids.append(row_id)
                    keep.append(value)
                else:
                    bad.append((row, row_id, why, _raw(value)))
            rows_in += len(values)
            if keep:
                predicted, errors = _predict(model, column, keep)
                n_batches += 1
                ok = [i for i, e in enumerate(errors) if e is None]
                bad.extend((keep_rows[i], keep_ids[i], errors[i], _raw(keep[i]))
                           for i in range(len(keep)) if errors[i] is not None)
                if ok and predicted is not None:
                    if as_json is None:
                        as_json = json_columns({str(c): [plain(v) for v in predicted[c].tolist()]
                                                for c in predicted.columns})
                    table = pa.Table.from_pandas(output_frame(predicted, [keep_ids[i] for i in ok], version, as_json),
                                                 preserve_index=False)
                    if writer is None:
                        schema = table.schema
                        writer = pq.ParquetWriter(tmp_out, schema)
                    writer.write_table(_conform(table, schema))
                    scored += table.num_rows
            reject(bad)
    except BaseException:
        rejects_writer.close()
        if writer is not None:
            writer.close()
        tmp_out.unlink(missing_ok=True)
        tmp_rej.unlink(missing_ok=True)
        raise
    rejects_writer.close()
    if writer is None:  # nothing scored: an empty output with the id / prediction / version columns
        pq.write_table(pa.table({"id": pa.array([], pa.string()), "prediction": pa.array([], pa.string()),
                                 "model_version": pa.array([], pa.string())}), tmp_out)
    else:
        writer.close()
    rejected = sum(reasons.values())
    if rows_in != scored + rejected:  # the contract of every Nightshift stage; a bug here must not pass silently
        raise AssertionError(f"score: {rows_in} rows in != {scored} scored + {rejected} rejected")
    tmp_out.replace(output_path)
    tmp_rej.replace(rejects_file)
    return ScoreResult(model=name, model_version=str(version), input=str(input_path), output=str(output_path),
                       rejects=str(rejects_file), rows_in=rows_in, rows_scored=scored, rows_rejected=rejected,
                       rejected_by_reason=dict(reasons), batches=n_batches,
                       seconds=round(time.perf_counter() - started, 3))


def model_inputs(model: Any) -> tuple[str, int | None]:
    """A pyfunc model's input column (from its signature) and, for images, the pixel count."""
    meta = getattr(model, "metadata", None)
    column = "text"
    try:
        names = meta.get_input_schema().input_names()
        column = names[0] if names else column
    except Exception:
        pass
    shape = ((getattr(meta, "metadata", None) or {}).get("image_shape") if meta is not None else None)
    pixels = None
    if shape:
        pixels = 1
        for dim in shape:
            pixels *= int(dim)
    return column, pixels
