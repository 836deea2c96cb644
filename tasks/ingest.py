"""Ingest stage: read the recipe's raw files into canonical ``id, text, label`` rows.

Sources (``data.train_path`` and optional ``data.test_path``) are a file, a directory (every
non-hidden file in it, sorted by name, not recursive) or a glob; a ``.gz`` file is decompressed.
Formats (``data.format_for``):

* ``csv``: real CSV quoting (:mod:`csv`, strict), delimiter ``data.delimiter`` or ``,``.
* ``tsv``: delimited lines with **no quoting**: each line is split on ``data.delimiter`` (default
  tab) at most ``len(columns) - 1`` times, so the last column keeps any further delimiters (TREC's
  ``LABEL question ...`` with delimiter ``" "``). Quote characters are ordinary text.
* ``jsonl``: one JSON object per line.
* ``parquet``: any column types; labels are cast to strings (``0`` -> ``"0"``).

Text files are decoded with ``data.encoding`` and ``errors="replace"``; every replacement character
inserted for undecodable bytes is counted (``replaced_chars``). A leading byte-order mark is dropped.
Lines are physical lines split on ``\\n`` (a trailing ``\\r`` is removed); blank lines are not rows
(they are counted as ``blank_lines``). Row ids are ``"<file name>:<line>"`` (1-based physical line
where the row starts; row index + 1 for parquet). When two input files share a name, the path
relative to their common folder is used instead of the bare name.

A csv/tsv header names the columns; with ``data.has_header`` false, ``data.columns`` does (and
with both, ``data.columns`` replaces the header's names). Labels become strings with surrounding
whitespace removed; texts are kept exactly as read (validate and clean judge them).
``data.label_pattern`` is searched in the label and its first group (the whole match when it has
no group) becomes the label. ``data.max_rows`` caps the rows read per file
(accepted and rejected rows both count).

Row problems never crash: wrong field count, malformed CSV quoting, a bad JSON line, a null or
missing text or label, a label that does not match ``label_pattern`` -> the row goes to
``rejects.parquet`` with its reason and raw line. File problems raise :class:`DataError` with one
line naming the file: not found, glob or directory without files, unreadable, empty (no rows),
missing configured column (the message lists the columns that exist), a format that is not
text classification (conll, idx), a format that cannot be inferred.

Rows in = rows out + rows rejected, per file and per split.
"""

from __future__ import annotations

import codecs
import contextvars
import csv
import glob
import gzip
import json
import os
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NONE

from tasks.artifacts import ArtifactStore, DataError, StageRef, file_fingerprint, fingerprint, source_hash
from tasks.config import DataConfig, Recipe
from tasks.lineage import tracked

STAGE = "ingest"
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())])
REJECTS_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("split", pa.string()),
        ("reason", pa.string()),
        ("text", pa.string()),
        ("label", pa.string()),
        ("raw", pa.string()),
    ]
)
TEXT_FORMATS = ("csv", "tsv", "jsonl", "parquet")
REJECTS_SAMPLE_PER_REASON = 20
_ERROR_HANDLER = "nightshift-ingest-count"
_replacements: contextvars.ContextVar[list[int] | None] = contextvars.ContextVar("_replacements", default=None)


# --------------------------------------------------------------------------------------------
# results


@dataclass
class FileResult:
    """Rows read from one file: accepted rows, rejected rows with reasons, and counters."""

    path: Path
    name: str
    format: str
    ids: list[str] = field(default_factory=list)
    texts: list[str] = field(default_factory=list)
    labels: list[str] = field(default_factory=list)
    reject_ids: list[str] = field(default_factory=list)
    reject_reasons: list[str] = field(default_factory=list)
    reject_texts: list[str | None] = field(default_factory=list)
    reject_labels: list[str | None] = field(default_factory=list)
    reject_raw: list[str | None] = field(default_factory=list)
    replaced_chars: int = 0
    blank_lines: int = 0
    truncated: bool = False  # stopped at data.max_rows
    label_regex: re.Pattern[str] | None = None  # compiled data.label_pattern
    # parquet: the accepted rows as a table (the ids/texts/labels lists stay empty)
    table: pa.Table | None = None

    @property
    def rows_accepted(self) -> int:
        return self.table.num_rows if self.table is not None else len(self.ids)

    @property
    def rows_rejected(self) -> int:
        return len(self.reject_ids)

    @property
    def rows_input(self) -> int:
        return self.rows_accepted + self.rows_rejected

    def accept(self, row_id: str, text: str, label: str) -> None:
        self.ids.append(row_id)
        self.texts.append(text)
        self.labels.append(label)

    def reject(self, row_id: str, reason: str, text: Any = None, label: Any = None, raw: str | None = None) -> None:
        self.reject_ids.append(row_id)
        self.reject_reasons.append(reason)
        self.reject_texts.append(text if isinstance(text, str) or text is None else str(text))
        self.reject_labels.append(label if isinstance(label, str) or label is None else str(label))
        self.reject_raw.append(raw)

    def accepted_table(self) -> pa.Table:
        if self.table is not None:
            return self.table
        return pa.table(
            {
                "id": pa.array(self.ids, pa.string()),
                "text": pa.array(self.texts, pa.string()),
                "label": pa.array(self.labels, pa.string()),
            },
            schema=SCHEMA,
        )

    def rejects_table(self, split: str) -> pa.Table:
        n = len(self.reject_ids)
        return pa.table(
            {
                "id": pa.array(self.reject_ids, pa.string()),
                "split": pa.array([split] * n, pa.string()),
                "reason": pa.array(self.reject_reasons, pa.string()),
                "text": pa.array(self.reject_texts, pa.string()),
                "label": pa.array(self.reject_labels, pa.string()),
                "raw": pa.array(self.reject_raw, pa.string()),
            },
            schema=REJECTS_SCHEMA,
        )

    def summary(self) -> dict[str, Any]:
        return {
            "file": str(self.path),
            "name": self.name,
            "format": self.format,
            "rows_input": self.rows_input,
            "rows_accepted": self.rows_accepted,
            "rows_rejected": self.rows_rejected,
            "replaced_chars": self.replaced_chars,
            "blank_lines": self.blank_lines,
            "stopped_at_max_rows": self.truncated,
        }


@dataclass
class SplitResult:
    """One split (train or test) read from all its files."""

    split: str
    files: list[FileResult]
    table: pa.Table
    rejects: pa.Table

    @property
    def rows_input(self) -> int:
        return sum(f.rows_input for f in self.files)

    @property
    def replaced_chars(self) -> int:
        return sum(f.replaced_chars for f in self.files)


# --------------------------------------------------------------------------------------------
# paths and decoding


def resolve_paths(spec: str, base_dir: Path | None = None) -> list[Path]:
    """The files named by ``spec``: a file, a directory's non-hidden files (sorted), or a glob.

    Relative specs are taken from ``base_dir`` (default: the working directory). Raises
    :class:`DataError` when nothing matches.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = base / path
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{spec}: directory contains no files")
        return files
    if glob.has_magic(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: glob matches no files")
        return files
    raise DataError(f"{spec}: file not found")


def display_names(paths: list[Path]) -> list[str]:
    """Names used in row ids: the file name, or the path below the common folder when names clash."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.relative_to(common).as_posix() for p in paths]


def _counting_handler(exc: UnicodeError) -> tuple[str, int]:
    counter = _replacements.get()
    if counter is not None:
        counter[0] += 1
    if isinstance(exc, UnicodeDecodeError):
        return "\ufffd", exc.end
    raise exc


def decode(data: bytes, encoding: str) -> tuple[str, int]:
    """Decode ``data`` with ``errors="replace"``; return the text and the number of replacements.

    Each U+FFFD inserted for undecodable bytes counts once (U+FFFD already present in the source
    does not count). A leading byte-order mark is removed.
    """
    try:
        text = data.decode(encoding)
        count = 0
    except UnicodeDecodeError:
        try:
            codecs.lookup_error(_ERROR_HANDLER)
        except LookupError:
            codecs.register_error(_ERROR_HANDLER, _counting_handler)
        counter = [0]
        token = _replacements.set(counter)
        try:
            text = data.decode(encoding, errors=_ERROR_HANDLER)
        finally:
            _replacements.reset(token)
        count = counter[0]
    if text.startswith("\ufeff"):
        text = text[1:]
    return text, count


def read_bytes(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when its name ends in ``.gz``; DataError when unreadable."""
    try:
        if path.name.lower().endswith(".gz"):
            with gzip.open(path, "rb") as handle:
                return handle.read()
        return path.read_bytes()
    except (gzip.BadGzipFile, EOFError, OSError) as exc:
        what = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise DataError(f"{path}: unreadable: {what}") from None


# --------------------------------------------------------------------------------------------
# per-format readers


def _lines(text: str) -> list[str]:
    """Physical lines split on \\n, each without its trailing \\r."""
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _column_positions(names: list[str], cfg: DataConfig, path: Path) -> tuple[int, int]:
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in names]
    if missing:
        raise DataError(
            f"{path}: missing column {', '.join(repr(m) for m in missing)} "
            f"(columns: {', '.join(names) if names else 'none'})"
        )
    return names.index(cfg.text_column), names.index(cfg.label_column)


def _header_names(fields: list[str]) -> list[str]:
    return [f.strip() for f in fields]


def _check_label(result: FileResult, row_id: str, text: Any, label: Any, raw: str | None) -> None:
    """Accept or reject one parsed row by its text and label values."""
    if text is None:
        result.reject(row_id, "missing text value", text, label, raw)
        return
    if label is None:
        result.reject(row_id, "missing label value", text, label, raw)
        return
    label = label.strip()
    if not label:
        result.reject(row_id, "empty label", text, label, raw)
        return
    if result.label_regex is not None:
        extracted = extract_label(result.label_regex, label)
        if extracted is None:
            result.reject(row_id, no_match_reason(result.label_regex), text, label, raw)
            return
        label = extracted
    result.accept(row_id, text, label)


def read_tsv(path: Path, name: str, text: str, cfg: DataConfig, result: FileResult) -> None:
    """Delimited lines without quoting: split on the delimiter at most len(columns)-1 times."""
    delimiter = cfg.delimiter or "\t"
    lines = _lines(text)
    start = 0
    if cfg.has_header:
        while start < len(lines) and not lines[start].strip():
            result.blank_lines += 1
            start += 1
        if start == len(lines):
            raise DataError(f"{path}: empty file (no header, no rows)")
        header = _header_names(lines[start].split(delimiter))
        names = list(cfg.columns) if cfg.columns else header
        start += 1
    else:
        names = list(cfg.columns or [])
    text_pos, label_pos = _column_positions(names, cfg, path)
    n_fields = len(names)
    maxsplit = n_fields - 1
    limit = cfg.max_rows
    for index in range(start, len(lines)):
        line = lines[index]
        if not line.strip():
            result.blank_lines += 1
            continue
        if limit is not None and result.rows_input >= limit:
            result.truncated = True
            break
        row_id = f"{name}:{index + 1}"
        fields = line.split(delimiter, maxsplit) if maxsplit > 0 else [line]
        if len(fields) != n_fields:
            reason = f"wrong field count: expected {n_fields} fields separated by {delimiter!r}, got {len(fields)}"
            result.reject(row_id, reason, raw=line)
            continue
        _check_label(result, row_id, fields[text_pos], fields[label_pos], line)


def read_csv(path: Path, name: str, text: str, cfg: DataConfig, result: FileResult) -> None:
    """CSV with real quoting (strict); a malformed record is rejected and reading resumes after it."""
    delimiter = cfg.delimiter or ","
    if len(delimiter) != 1:
        raise DataError(f"{path}: csv delimiter must be one character, got {delimiter!r}")
    raw_lines = text.split("\n")
    if raw_lines and raw_lines[-1] == "":
        raw_lines.pop()
    physical = [line + "\n" for line in raw_lines]
    names: list[str] | None = None if cfg.has_header else list(cfg.columns or [])
    positions: tuple[int, int] | None = None if names is None else _column_positions(names, cfg, path)
    limit = cfg.max_rows
    offset = 0  # index of the physical line the current reader starts at
    while offset < len(physical):
        lines = (physical[i] for i in range(offset, len(physical)))
        reader = csv.reader(lines, delimiter=delimiter, strict=True)
        consumed = 0  # lines consumed by this reader before the current record
        try:
            for fields in reader:
                first_line = offset + consumed  # 0-based line where this record starts
                consumed = reader.line_num
                if not fields or (len(fields) == 1 and not fields[0].strip()):
                    result.blank_lines += 1
                    continue
                if names is None:
                    names = list(cfg.columns) if cfg.columns else _header_names(fields)
                    positions = _column_positions(names, cfg, path)
                    continue
                if limit is not None and result.rows_input >= limit:
                    result.truncated = True
                    return
                assert positions is not None
                row_id = f"{name}:{first_line + 1}"
                raw = "".join(physical[first_line : offset + consumed]).rstrip("\r\n")
                if len(fields) != len(names):
                    reason = f"wrong field count: expected {len(names)} fields, got {len(fields)}"
                    result.reject(row_id, reason, raw=raw)
                    continue
                _check_label(result, row_id, fields[positions[0]], fields[positions[1]], raw)
            offset = len(physical)
        except csv.Error as exc:
            bad = offset + consumed  # the record that failed starts here
            if names is None:
                raise DataError(f"{path}: malformed csv header at line {bad + 1}: {exc}") from None
            if limit is not None and result.rows_input >= limit:
                result.truncated = True
                return
            result.reject(f"{name}:{bad + 1}", f"malformed csv: {exc}", raw=physical[bad].rstrip("\r\n"))
            offset = bad + 1  # resume on the next physical line
    if names is None:
        raise DataError(f"{path}: empty file (no header, no rows)")


def _json_scalar(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    raise TypeError(type(value).__name__)


def read_jsonl(path: Path, name: str, text: str, cfg: DataConfig, result: FileResult) -> None:
    """One JSON object per line; the text and label keys are ``data.text_column`` / ``label_column``."""
    limit = cfg.max_rows
    seen_keys: dict[str, None] = {}
    found_text = found_label = False
    for index, line in enumerate(_lines(text)):
        if not line.strip():
            result.blank_lines += 1
            continue
        if limit is not None and result.rows_input >= limit:
            result.truncated = True
            break
        row_id = f"{name}:{index + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            result.reject(row_id, f"bad JSON: {exc.msg} at column {exc.colno}", raw=line)
            continue
        if not isinstance(obj, dict):
            result.reject(row_id, f"bad JSON: expected an object, got {type(obj).__name__}", raw=line)
            continue
        for key in obj:
            seen_keys.setdefault(key, None)
        found_text |= cfg.text_column in obj
        found_label |= cfg.label_column in obj
        if cfg.text_column not in obj:
            result.reject(row_id, f"missing key {cfg.text_column!r}", raw=line)
            continue
        if cfg.label_column not in obj:
            result.reject(row_id, f"missing key {cfg.label_column!r}", raw=line)
            continue
        try:
            text_value = _json_scalar(obj[cfg.text_column])
        except TypeError as exc:
            result.reject(row_id, f"text is a JSON {exc}, expected a string", raw=line)
            continue
        try:
            label_value = _json_scalar(obj[cfg.label_column])
        except TypeError as exc:
            result.reject(row_id, f"label is a JSON {exc}, expected a string or number", text_value, raw=line)
            continue
        _check_label(result, row_id, text_value, label_value, line)
    if result.rows_input and not (found_text and found_label) and seen_keys:
        missing = [c for c, ok in ((cfg.text_column, found_text), (cfg.label_column, found_label)) if not ok]
        raise DataError(
            f"{path}: missing column {', '.join(repr(m) for m in missing)} "
            f"(keys: {', '.join(seen_keys)})"
        )


def _to_string(column: pa.ChunkedArray, what: str, path: Path) -> pa.ChunkedArray:
    """Cast a parquet column to string (labels: ints -> '0', bools -> 'true')."""
    typ = column.type
    if pa.types.is_dictionary(typ):
        column = column.cast(typ.value_type)
        typ = typ.value_type
    if pa.types.is_string(typ):
        return column
    if pa.types.is_large_string(typ) or pa.types.is_string_view(typ):
        return column.cast(pa.string())
    if pa.types.is_boolean(typ):
        return pc.if_else(column, "true", "false")
    if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_decimal(typ):
        return column.cast(pa.string())
    if pa.types.is_binary(typ) or pa.types.is_large_binary(typ):
        try:
            return column.cast(pa.string())
        except pa.ArrowInvalid:
            raise DataError(f"{path}: {what} is binary and not valid UTF-8") from None
    raise DataError(f"{path}: {what} has type {typ}, expected a string")


def read_parquet(path: Path, name: str, data: bytes | None, cfg: DataConfig, result: FileResult) -> None:
    """A parquet file; rows with a null text or label are rejected, labels cast to string."""
    try:
        source: Any = pa.BufferReader(data) if data is not None else path
        parquet = pq.ParquetFile(source)
        columns = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable parquet file: {exc}") from None
    _column_positions(columns, cfg, path)
    wanted = [cfg.text_column] if cfg.text_column == cfg.label_column else [cfg.text_column, cfg.label_column]
    try:
        table = parquet.read(columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable parquet file: {exc}") from None
    if cfg.max_rows is not None and table.num_rows > cfg.max_rows:
        table = table.slice(0, cfg.max_rows)
        result.truncated = True
    n = table.num_rows
    texts = _to_string(table.column(cfg.text_column), f"column {cfg.text_column!r}", path).combine_chunks()
    labels = _to_string(table.column(cfg.label_column), f"column {cfg.label_column!r}", path).combine_chunks()
    labels = pc.utf8_trim_whitespace(labels)
    line_no = pa.array(np.arange(1, n + 1, dtype=np.int64)).cast(pa.string())
    ids = pc.binary_join_element_wise(pa.scalar(f"{name}:"), line_no, "")
    ok = pc.and_(pc.is_valid(texts), pc.not_equal(pc.fill_null(labels, ""), ""))
    final_labels = labels
    if result.label_regex is not None:
        regex = result.label_regex
        extracted = [None if v is None else extract_label(regex, v) for v in labels.to_pylist()]
        final_labels = pa.array(extracted, pa.string())
        ok = pc.and_(ok, pc.is_valid(final_labels))
    result.table = pa.table({"id": ids, "text": texts, "label": final_labels}, schema=SCHEMA).filter(ok)
    bad = pa.array(np.flatnonzero(~ok.to_numpy(zero_copy_only=False)), pa.int64())
    for row_id, text_value, label_value in zip(
        ids.take(bad).to_pylist(), texts.take(bad).to_pylist(), labels.take(bad).to_pylist()
    ):
        if text_value is None:
            reason = "missing text value"
        elif label_value is None:
            reason = "missing label value"
        elif label_value == "":
            reason = "empty label"
        else:
            reason = no_match_reason(result.label_regex) if result.label_regex else "invalid label"
        result.reject(row_id, reason, text_value, label_value)


# --------------------------------------------------------------------------------------------
# files, label pattern, splits


def read_file(path: Path, name: str, cfg: DataConfig) -> FileResult:
    """Read one file into accepted and rejected rows (before ``label_pattern``)."""
    try:
        fmt = cfg.format_for(str(path))
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    if fmt not in TEXT_FORMATS:
        raise DataError(f"{path}: format {fmt!r} is not a text-classification source (use csv, tsv, jsonl or parquet)")
    if fmt in ("csv", "tsv") and not cfg.has_header and not cfg.columns:
        raise DataError(f"{path}: headerless {fmt} needs data.columns")
    result = FileResult(path=path, name=name, format=fmt, label_regex=compile_label_pattern(cfg.label_pattern))
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    gz = path.name.lower().endswith(".gz")
    if fmt == "parquet":
        read_parquet(path, name, read_bytes(path) if gz else None, cfg, result)
    else:
        raw = read_bytes(path)
        if not raw.strip():
            raise DataError(f"{path}: empty file")
        try:
            text, result.replaced_chars = decode(raw, cfg.encoding)
        except LookupError:
            raise DataError(f"{path}: unknown encoding {cfg.encoding!r}") from None
        reader = {"csv": read_csv, "tsv": read_tsv, "jsonl": read_jsonl}[fmt]
        reader(path, name, text, cfg, result)
    if result.rows_input == 0:
        raise DataError(f"{path}: empty file (no rows)")
    return result


def compile_label_pattern(pattern: str | None) -> re.Pattern[str] | None:
    """``data.label_pattern`` compiled; DataError when it is not a valid regex."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise DataError(f"data.label_pattern {pattern!r}: invalid regex: {exc}") from None


def extract_label(regex: re.Pattern[str], label: str) -> str | None:
    """The label taken from ``label`` by ``regex`` (first group, else whole match); None when no match."""
    match = regex.search(label)
    if match is None:
        return None
    value = match.group(1 if regex.groups else 0)
    value = value.strip() if value else ""
    return value or None


def no_match_reason(regex: re.Pattern[str]) -> str:
    return f"label does not match label_pattern {regex.pattern!r}"


def read_split(paths: list[Path], split: str, cfg: DataConfig) -> SplitResult:
    """Read every file of one split (see :func:`resolve_paths`): accepted rows (canonical) and rejects."""
    files = [read_file(path, name, cfg) for path, name in zip(paths, display_names(paths))]
    table = pa.concat_tables([f.accepted_table() for f in files])
    rejects = pa.concat_tables([f.rejects_table(split) for f in files])
    return SplitResult(split=split, files=files, table=table.combine_chunks(), rejects=rejects.combine_chunks())


def ingest_config(cfg: DataConfig) -> dict[str, Any]:
    """The part of the data config that ingest depends on (``data.labels`` is validate's)."""
    config = cfg.model_dump(mode="json")
    config.pop("labels", None)
    return config


def rejects_sample(rejects: pa.Table, per_reason: int = REJECTS_SAMPLE_PER_REASON) -> pa.Table:
    """The first ``per_reason`` rejected rows of each reason (reasons grouped by their prefix)."""
    if rejects.num_rows == 0:
        return rejects
    reasons = rejects.column("reason").to_pylist()
    seen: Counter[str] = Counter()
    keep = []
    for i, reason in enumerate(reasons):
        kind = reason_kind(reason)
        if seen[kind] < per_reason:
            seen[kind] += 1
            keep.append(i)
    return rejects.take(pa.array(keep, pa.int64()))


_REASON_DETAIL = re.compile(r":| of | \(| '| \"|,")


def reason_kind(reason: str) -> str:
    """A reason without its row-specific details (``"duplicate of x:3"`` -> ``"duplicate"``,
    ``"unknown label 'x' (allowed: a, b)"`` -> ``"unknown label"``)."""
    return _REASON_DETAIL.split(reason, maxsplit=1)[0].strip() or reason


def metric_name(text: str) -> str:
    """``text`` usable in an MLflow metric name (letters, digits, ``_ - . /`` and spaces -> ``_``)."""
    return re.sub(r"[^\w\-./]", "_", text.strip()) or "_"


def write_csv_sample(path: Path, table: pa.Table) -> None:
    """Write a small table as CSV (for MLflow artifacts); nested columns (image pixels) are left out,
    CSV cannot hold them."""
    pacsv.write_csv(table.select([f.name for f in table.schema if not pa.types.is_nested(f.type)]), path)


# --------------------------------------------------------------------------------------------
# stage entry point


def run(
    recipe: Recipe, store: ArtifactStore, force: bool = False, base_dir: Path | None = None
) -> StageRef:
    """Ingest the recipe's train (and test) files into the store; cached by fingerprint.

    ``base_dir`` is where relative data paths start (default: the working directory).
    Returns a ref whose ``rows`` are ``input, accepted, rejected, train, test`` and whose ``extra``
    holds ``metrics``, ``log_files``, ``files`` (per-file counts), ``replaced_chars``,
    ``has_test``, ``rejects_by_reason`` and ``labels_seen``.
    """
    start = time.perf_counter()
    cfg = recipe.data
    if recipe.task != "text-classification":
        raise DataError(f"ingest: task {recipe.task!r} is not read by this stage (text-classification only)")
    specs = {"train": cfg.train_path}
    if cfg.test_path:
        specs["test"] = cfg.test_path
    paths = {split: resolve_paths(spec, base_dir) for split, spec in specs.items()}
    config = ingest_config(cfg)
    code = source_hash(sys.modules[__name__])
    inputs = [file_fingerprint(p) for p in paths.values()]
    fp = fingerprint(STAGE, config, inputs, code)
    if not force and (hit := store.lookup(STAGE, fp)) is not None:
        return hit

    results = {split: read_split(split_paths, split, cfg) for split, split_paths in paths.items()}
    train = results["train"]
    test = results.get("test")
    rejects = pa.concat_tables([r.rejects for r in results.values()]).combine_chunks()

    rows = {
        "input": sum(r.rows_input for r in results.values()),
        "accepted": sum(r.table.num_rows for r in results.values()),
        "rejected": rejects.num_rows,
        "train": train.table.num_rows,
        "test": test.table.num_rows if test else 0,
    }
    for r in results.values():
        if r.table.num_rows + r.rejects.num_rows != r.rows_input:  # pragma: no cover - invariant
            raise RuntimeError(f"{STAGE}: row accounting broken for {r.split}")
    if rows["accepted"] + rows["rejected"] != rows["input"]:  # pragma: no cover - invariant
        raise RuntimeError(f"{STAGE}: row accounting broken: {rows}")

    by_reason = dict(Counter(reason_kind(x) for x in rejects.column("reason").to_pylist()))
    metrics: dict[str, float] = {
        "rows_input": rows["input"],
        "rows_accepted": rows["accepted"],
        "rows_rejected": rows["rejected"],
        "replaced_chars": sum(r.replaced_chars for r in results.values()),
        "files": sum(len(r.files) for r in results.values()),
    }
    for split, r in results.items():
        metrics[f"{split}.rows_input"] = r.rows_input
        metrics[f"{split}.rows_accepted"] = r.table.num_rows
        metrics[f"{split}.rows_rejected"] = r.rejects.num_rows
        metrics[f"{split}.replaced_chars"] = r.replaced_chars
    labels_seen = sorted(set(pc.unique(train.table.column("label")).to_pylist()))
    files_info = {split: [f.summary() for f in r.files] for split, r in results.items()}
    for kind, count in by_reason.items():
        metrics[f"rejected.{metric_name(kind)}"] = count
    metrics["duration_s"] = round(time.perf_counter() - start, 4)
    report = {
        "rows": rows,
        "files": files_info,
        "replaced_chars": int(metrics["replaced_chars"]),
        "rejects_by_reason": by_reason,
        "labels_seen": labels_seen,
    }
    extra = {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "log_files": ["ingest_report.json", "rejects_sample.csv"],
        "files": files_info,
        "replaced_chars": int(metrics["replaced_chars"]),
        "has_test": test is not None,
        "rejects_by_reason": by_reason,
        "labels_seen": labels_seen,
    }
    with store.writer(STAGE, fp) as w:
        w.write_table("train.parquet", train.table)
        if test is not None:
            w.write_table("test.parquet", test.table)
        w.write_table("rejects.parquet", rejects)
        w.write_json("ingest_report.json", report)
        write_csv_sample(w.path / "rejects_sample.csv", rejects_sample(rejects))
        ref = w.write_manifest(config=config, inputs=inputs, code=code, rows=rows, extra=extra)
    return ref


@task(name="ingest", cache_policy=NONE)
def ingest_task(recipe: Recipe, run_id: str | None, force: bool = False) -> StageRef:
    """Read the recipe's files into canonical rows; malformed rows go to rejects with their reason."""
    if recipe.task == "image-classification":
        from tasks.vision import ingest as vision_ingest

        return tracked(run_id, STAGE, lambda store: vision_ingest.run(recipe, store, force))
    return tracked(run_id, STAGE, lambda store: run(recipe, store, force))
