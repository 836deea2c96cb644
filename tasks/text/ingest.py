"""Ingest stage: read the recipe's raw files into canonical ``id, text, label`` rows.

Sources (``data.train_path`` and optional ``data.test_path``) are a file, a directory (every
non-hidden file in it, sorted by name, not recursive) or a glob; a ``.gz`` file is decompressed.
Formats (``data.format_for``):

* ``csv``: real CSV quoting (:mod:`csv`, strict), delimiter ``data.delimiter`` or ``,``.
* ``tsv``: delimited lines with **no quoting**: each line is split on ``data.delimiter`` (default
  tab) at most ``len(columns) - 1`` times, so the last column keeps any further delimiters (TREC's
  ``LABEL question ...`` with delimiter ``" "``). Quote characters are ordinary text.
* ``jsonl``: one JSON object per line (a JSON array file is refused: see below); texts must be
  JSON strings, labels may be strings or numbers.
* ``parquet``: the text column must be a string column (binary holding UTF-8 counts); labels of
  any scalar type are cast to strings (``0`` -> ``"0"``).

Text files are decoded with ``data.encoding`` and ``errors="replace"``; every replacement character
inserted for undecodable bytes is counted (``replaced_chars``). A leading byte-order mark is dropped.
Lines are physical lines split on ``\\n`` (a trailing ``\\r`` is removed); a file whose line breaks
are mostly a lone ``\\r`` (CR-only, classic Mac OS) is split at ``\\r``, ``\\r\\n`` and ``\\n``
instead, as Python's universal newlines do. Blank lines are not rows (they are counted as
``blank_lines``). Row ids are ``"<file name>:<line>"`` (1-based physical line
where the row starts; row index + 1 for parquet). When two input files share a name, the path
relative to their common folder is used instead of the bare name.

A csv/tsv header names the columns; with ``data.has_header`` false, ``data.columns`` does (and
with both, ``data.columns`` replaces the header's names). Labels become strings with surrounding
whitespace removed; texts are kept exactly as read (validate and clean judge them).
``data.label_pattern`` is searched in the label and its first group (the whole match when it has
no group) becomes the label. When every accepted label of train and test is numeric-looking,
integral ones are written as integers (``"0.0"`` and ``"0"`` are one class ``"0"``; ``"1.5"``
stays): :func:`label_rewrites`; the rewritten rows are counted (``labels_canonicalised``).
``data.max_rows`` caps the rows read per file (accepted and rejected rows both count).

Row problems never crash: wrong field count, malformed CSV quoting, a bad JSON line or one that is
not an object, a JSON text that is not a string, a null or missing text or label, a label that
does not match ``label_pattern`` -> the row goes to ``rejects.parquet`` with its reason and raw
line. File problems raise :class:`DataError` with one line naming the file: not found, glob or
directory without files, unreadable, empty (no rows), missing configured column (the message lists
the columns that exist, bounded, and what looks odd about the header line), a parquet text column
that is not a string column, a JSON file that is one array (or one multi-line object) or has no
object line, a format that is not text classification (conll, idx), a format that cannot be
inferred. File content quoted in a message is bounded (:func:`tasks.core.store.bounded`).

Rows in = rows out + rows rejected, per file and per split.
"""

from __future__ import annotations

import codecs
import contextvars
import csv
import gzip
import json
import re
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.rejects import (
    metric_name,
    reason_kind,
    rejects_sample,
    rejects_schema,
    write_csv_sample,
)
from tasks.core.sources import (
    display_names,
    file_fingerprint,
    ingest_config,
    resolve_paths,
)
from tasks.core.store import (
    ECHO_LIMIT,
    ArtifactStore,
    DataError,
    StageRef,
    bounded,
    stage_key,
)
from tasks.text.config import DataConfig, TextRecipe

STAGE = "ingest"
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())])
REJECTS_SCHEMA = rejects_schema(("text", pa.string()), ("label", pa.string()), ("raw", pa.string()))
TEXT_FORMATS = ("csv", "tsv", "jsonl", "parquet")
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


_ANY_LINE_BREAK = re.compile(r"(\r\n|\r|\n)")


def cr_line_breaks(text: str) -> bool:
    """True when most of ``text``'s line breaks are a lone ``\\r`` (classic Mac OS, some
    spreadsheet exports) rather than ``\\n`` or ``\\r\\n``."""
    lone_cr = text.count("\r") - text.count("\r\n")
    return lone_cr > text.count("\n")


def physical_lines(text: str) -> list[str]:
    """The physical lines of ``text``, each ending in its line break (the last one in ``\\n`` when
    the text has none at its end).

    Lines end at ``\\n``. A file whose line breaks are mostly lone ``\\r`` (see
    :func:`cr_line_breaks`) is split at ``\\r\\n``, ``\\r`` and ``\\n`` instead, as Python's universal
    newlines do; the majority decides so that a stray ``\\r`` inside a line of an ordinary file
    stays text, as it always was.
    """
    if not text:
        return []
    if not cr_line_breaks(text):
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()
        return [line + "\n" for line in lines]
    parts = _ANY_LINE_BREAK.split(text)  # line, break, line, break, ..., last line
    lines = [parts[i] + parts[i + 1] for i in range(0, len(parts) - 1, 2)]
    if parts[-1]:
        lines.append(parts[-1] + "\n")
    return lines


def strip_line_break(line: str) -> str:
    """``line`` without the line break :func:`physical_lines` left at its end (and, for ``\\n``,
    one ``\\r`` before it)."""
    if line.endswith("\r\n"):
        return line[:-2]
    return line[:-1] if line.endswith(("\n", "\r")) else line


def _lines(text: str) -> list[str]:
    """Physical lines (see :func:`physical_lines`) without their line breaks."""
    return [strip_line_break(line) for line in physical_lines(text)]


def layout_hint(header: str, n_lines: int) -> str:
    """What a header line that names no usable column looks like, for the error: ``""`` when
    nothing is odd, else e.g. ``"; found 1 line of 22000 characters, no line breaks"``."""
    found = []
    if n_lines == 1 and len(header) > ECHO_LIMIT:
        found.append(f"1 line of {len(header)} characters, no line breaks")
    if "\r" in header:
        found.append(f"{header.count(chr(13))} carriage return(s) inside the line: CR line endings?")
    if "\x00" in header:
        # UTF-16 text read as UTF-8 decodes without errors, one NUL between characters
        found.append("NUL characters: UTF-16 text? set data.encoding")
    return f"; found {', '.join(found)}" if found else ""


def _column_positions(names: list[str], cfg: DataConfig, path: Path, hint: str = "") -> tuple[int, int]:
    """Where the text and label columns are in ``names``; DataError naming the missing ones and
    (bounded) the columns there are, plus ``hint`` (see :func:`layout_hint`)."""
    missing = [c for c in (cfg.text_column, cfg.label_column) if c not in names]
    if missing:
        shown = bounded(", ".join(names)) if names else "none"
        count = f"{len(names)} " if len(names) > 20 else ""  # "(500 columns: ...)": the list is cut
        raise DataError(
            f"{path}: missing column {', '.join(repr(m) for m in missing)} ({count}columns: {shown}){hint}"
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
        hint = layout_hint(lines[start], len(lines))
        start += 1
    else:
        names = list(cfg.columns or [])
        hint = layout_hint(lines[0], len(lines)) if lines else ""
    text_pos, label_pos = _column_positions(names, cfg, path, hint)
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
    physical = physical_lines(text)
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
                    header = strip_line_break("".join(physical[first_line : offset + consumed]))
                    hint = layout_hint(header, len(physical))
                    positions = _column_positions(names, cfg, path, hint)
                    continue
                if limit is not None and result.rows_input >= limit:
                    result.truncated = True
                    return
                assert positions is not None
                row_id = f"{name}:{first_line + 1}"
                raw = strip_line_break("".join(physical[first_line : offset + consumed]))
                if len(fields) != len(names):
                    reason = f"wrong field count: expected {len(names)} fields, got {len(fields)}"
                    result.reject(row_id, reason, raw=raw)
                    continue
                _check_label(result, row_id, fields[positions[0]], fields[positions[1]], raw)
            offset = len(physical)
        except csv.Error as exc:
            bad = offset + consumed  # the record that failed starts here
            if names is None:
                hint = layout_hint(strip_line_break(physical[bad]), len(physical))
                raise DataError(f"{path}: malformed csv header at line {bad + 1}: {bounded(str(exc))}{hint}") from None
            if limit is not None and result.rows_input >= limit:
                result.truncated = True
                return
            result.reject(f"{name}:{bad + 1}", f"malformed csv: {exc}", raw=strip_line_break(physical[bad]))
            offset = bad + 1  # resume on the next physical line
    if names is None:
        raise DataError(f"{path}: empty file (no header, no rows)")


def json_type(value: Any) -> str:
    """The JSON name of a decoded value's type: string, number, boolean, null, array or object."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _json_label(value: Any) -> str | None:
    """A JSON label as a string (numbers as Python writes them, booleans as ``true`` / ``false``);
    TypeError naming the JSON type for arrays and objects."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    raise TypeError(json_type(value))


def json_document_kind(text: str, lines: list[str]) -> str | None:
    """``"array"`` or ``"object"`` when ``text`` is one JSON document rather than JSON lines: an
    array (on one line or many), or one object written over several lines (pretty-printed).
    None otherwise: JSON lines, or text that is not one JSON document. ``lines`` are its lines.

    Parses the whole text only when its first non-blank line is not a JSON value by itself, so
    ordinary JSON lines cost one extra parse of one line.
    """
    stripped = text.strip()
    if not stripped.startswith(("[", "{")):
        return None
    first = next(line for line in lines if line.strip())
    try:
        json.loads(first)
    except (ValueError, RecursionError):
        pass
    else:
        # the first line is a value of its own: JSON lines, unless that line is the whole file
        return "array" if first.strip() == stripped and stripped.startswith("[") else None
    try:
        document = json.loads(text)
    except (ValueError, RecursionError):
        return None
    return "array" if isinstance(document, list) else "object" if isinstance(document, dict) else None


def read_jsonl(path: Path, name: str, text: str, cfg: DataConfig, result: FileResult) -> None:
    """One JSON object per line; the text and label keys are ``data.text_column`` / ``label_column``.

    A line that is not JSON, or a JSON value other than an object, is a rejected row; a text that
    is not a JSON string (or null) is a rejected row. File problems are a DataError: the file is one
    JSON array or one multi-line object, no line is an object, a key is in no object, or no row's
    text is a string (a numeric "text" column).
    """
    lines = _lines(text)
    kind = json_document_kind(text, lines)
    if kind == "array":
        raise DataError(
            f"{path}: a JSON array, not JSON lines (one object per line): convert it, "
            f"e.g. jq -c '.[]' {path.name} > rows.jsonl"
        )
    if kind == "object":
        raise DataError(
            f"{path}: one JSON object over {sum(1 for x in lines if x.strip())} lines, not JSON lines "
            "(one object per line): write each row as one object on its own line"
        )
    limit = cfg.max_rows
    seen_keys: dict[str, None] = {}
    found_text = found_label = False
    objects = 0  # lines that are JSON objects
    first_line: tuple[int, str] | None = None  # the first non-blank line, quoted when no line is an object
    text_types: Counter[str] = Counter()  # JSON types of the non-null texts
    for index, line in enumerate(lines):
        if not line.strip():
            result.blank_lines += 1
            continue
        if limit is not None and result.rows_input >= limit:
            result.truncated = True
            break
        row_id = f"{name}:{index + 1}"
        if first_line is None:
            first_line = (index + 1, line)
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            result.reject(row_id, f"bad JSON: {exc.msg} at column {exc.colno}", raw=line)
            continue
        except RecursionError:
            result.reject(row_id, "bad JSON: nested too deeply", raw=line)
            continue
        if not isinstance(obj, dict):
            result.reject(row_id, f"bad JSON: expected an object, got {json_type(obj)}", raw=line)
            continue
        objects += 1
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
        text_value = obj[cfg.text_column]
        if text_value is not None:
            text_types[json_type(text_value)] += 1
            if not isinstance(text_value, str):
                # never str() a number or a list into a text: that trains on "42" or "['a']"
                result.reject(row_id, f"text is a JSON {json_type(text_value)}, expected a string", raw=line)
                continue
        try:
            label_value = _json_label(obj[cfg.label_column])
        except TypeError as exc:
            result.reject(row_id, f"label is a JSON {exc}, expected a string or number", text_value, raw=line)
            continue
        _check_label(result, row_id, text_value, label_value, line)
    if first_line is not None and objects == 0:
        number, line = first_line
        array = "; it starts with '[' like a JSON array, but is not valid JSON" if text.lstrip().startswith("[") else ""
        raise DataError(
            f"{path}: not JSON lines (one object per line): no line is a JSON object "
            f"(line {number}: {bounded(line, 80)}){array}"
        )
    if result.rows_input and not (found_text and found_label) and seen_keys:
        missing = [c for c, ok in ((cfg.text_column, found_text), (cfg.label_column, found_label)) if not ok]
        raise DataError(
            f"{path}: missing column {', '.join(repr(m) for m in missing)} "
            f"(keys: {bounded(', '.join(seen_keys))})"
        )
    if text_types and not text_types["string"]:
        found = ", ".join(f"{n} {t} value(s)" for t, n in text_types.most_common())
        raise DataError(
            f"{path}: key {cfg.text_column!r} holds no strings ({found}): texts must be JSON strings "
            "(labels may be numbers)"
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


def _text_column(column: pa.ChunkedArray, what: str, path: Path) -> pa.ChunkedArray:
    """A parquet text column as strings: it must be a string column (dictionary-encoded or not;
    binary holding UTF-8, as writers without the string annotation leave it, is read as text).

    Numbers, booleans, lists ... are refused, never cast: a model trained on ``"42"`` learns nothing
    the user meant (labels, unlike texts, may be numeric: see :func:`_to_string`).
    """
    typ = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
    textual = (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)
               or pa.types.is_binary(typ) or pa.types.is_large_binary(typ))
    if not textual:
        raise DataError(f"{path}: {what} has type {typ}, expected a string type (texts are never cast; "
                        "labels may be numeric)")
    return _to_string(column, what, path)


def read_parquet(path: Path, name: str, data: bytes | None, cfg: DataConfig, result: FileResult) -> None:
    """A parquet file; rows with a null text or label are rejected, labels cast to string."""
    try:
        source: Any = pa.BufferReader(data) if data is not None else path
        parquet = pq.ParquetFile(source)
        columns = parquet.schema_arrow.names
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable parquet file: {bounded(str(exc))}") from None
    _column_positions(columns, cfg, path)
    wanted = [cfg.text_column] if cfg.text_column == cfg.label_column else [cfg.text_column, cfg.label_column]
    try:
        table = parquet.read(columns=wanted)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable parquet file: {bounded(str(exc))}") from None
    if cfg.max_rows is not None and table.num_rows > cfg.max_rows:
        table = table.slice(0, cfg.max_rows)
        result.truncated = True
    n = table.num_rows
    texts = _text_column(table.column(cfg.text_column), f"text column {cfg.text_column!r}", path).combine_chunks()
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


_NUMERIC_LABEL = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_MAX_INTEGER_DIGITS = 30  # larger integral values stay as written: no label is a 10**400 class


def is_numeric_label(label: str) -> bool:
    """Whether ``label`` is written as a decimal number (``"3"``, ``"-0.5"``, ``"1.00"``, ``"2e3"``)."""
    return _NUMERIC_LABEL.fullmatch(label) is not None


def canonical_number(label: str) -> str:
    """A numeric-looking label in canonical form: an integral value as an integer (``"0.0"`` ->
    ``"0"``, ``"1.00"`` -> ``"1"``, ``"+2"`` -> ``"2"``, ``"007"`` -> ``"7"``); any other label as is
    (``"1.5"`` stays ``"1.5"``)."""
    if not is_numeric_label(label):
        return label
    value = Decimal(label)
    if value.is_zero():
        return "0"
    if value != value.to_integral_value() or value.adjusted() >= _MAX_INTEGER_DIGITS:
        return label
    return str(int(value))


def label_rewrites(labels: Iterable[str]) -> dict[str, str]:
    """How to canonicalise a label set: ``{label: canonical}`` for each distinct label that
    :func:`canonical_number` changes, when **every** label is numeric-looking; ``{}`` otherwise.

    Numeric labels read from text come as the writer spelled them: ``0`` in one file, ``0.0`` in
    another (pandas writes an int column with a NaN as floats), and as strings they would be two
    classes. A label set with any non-number (``"pos"``, ``"3 stars"``) is left alone: its labels
    are names, and ``"1"`` and ``"1.0"`` there may well be meant apart.
    """
    distinct = set(labels)
    if not distinct or not all(is_numeric_label(label) for label in distinct):
        return {}
    return {label: canonical_number(label) for label in sorted(distinct) if canonical_number(label) != label}


def canonical_label_list(labels: list[str] | None) -> list[str] | None:
    """``data.labels`` canonicalised like the data's labels (see :func:`label_rewrites`), in order,
    without the repeats canonicalisation makes (``["0", "0.0"]`` -> ``["0"]``); None stays None."""
    if labels is None:
        return None
    rewrites = label_rewrites(labels)
    return list(dict.fromkeys(rewrites.get(label, label) for label in labels))


def rewrite_labels(table: pa.Table, rewrites: dict[str, str]) -> tuple[pa.Table, int]:
    """``table`` with its labels rewritten by ``rewrites`` (labels not in it unchanged), and the
    number of rows whose label changed."""
    if not rewrites or table.num_rows == 0:
        return table, 0
    labels = table.column("label")
    where = pc.index_in(labels, value_set=pa.array(list(rewrites), pa.string()))
    changed = int(pc.sum(pc.is_valid(where)).as_py() or 0)
    if not changed:
        return table, 0
    new = pc.take(pa.array(list(rewrites.values()), pa.string()), where)
    labels = pc.if_else(pc.is_valid(where), new, labels)
    return table.set_column(table.schema.get_field_index("label"), "label", labels), changed


def read_split(paths: list[Path], split: str, cfg: DataConfig) -> SplitResult:
    """Read every file of one split (see :func:`resolve_paths`): accepted rows (canonical) and rejects."""
    files = [read_file(path, name, cfg) for path, name in zip(paths, display_names(paths))]
    table = pa.concat_tables([f.accepted_table() for f in files])
    rejects = pa.concat_tables([f.rejects_table(split) for f in files])
    return SplitResult(split=split, files=files, table=table.combine_chunks(), rejects=rejects.combine_chunks())


# --------------------------------------------------------------------------------------------
# stage entry point


def run(
    recipe: TextRecipe, store: ArtifactStore, force: bool = False, base_dir: Path | None = None
) -> StageRef:
    """Ingest the recipe's train (and test) files into the store; cached by fingerprint.

    ``base_dir`` is where relative data paths start (default: the working directory).
    Returns a ref whose ``rows`` are ``input, accepted, rejected, train, test`` and whose ``extra``
    holds ``metrics``, ``log_files``, ``files`` (per-file counts), ``replaced_chars``,
    ``has_test``, ``rejects_by_reason``, ``labels_seen`` and ``labels_canonicalised`` (``rows``
    whose label was rewritten, and the ``rewrites``, see :func:`label_rewrites`).
    """
    start = time.perf_counter()
    cfg = recipe.data
    specs = {"train": cfg.train_path}
    if cfg.test_path:
        specs["test"] = cfg.test_path
    paths = {split: resolve_paths(spec, base_dir) for split, spec in specs.items()}
    key = stage_key(STAGE, ingest_config(cfg), [file_fingerprint(p) for p in paths.values()], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit

    results = {split: read_split(split_paths, split, cfg) for split, split_paths in paths.items()}
    # one decision over train and test together, so that both spell a class the same way
    rewrites = label_rewrites(
        label for r in results.values() for label in pc.unique(r.table.column("label")).to_pylist()
    )
    canonicalised: dict[str, int] = {}
    for split, r in results.items():
        r.table, canonicalised[split] = rewrite_labels(r.table, rewrites)
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
        "labels_canonicalised": sum(canonicalised.values()),
    }
    for split, r in results.items():
        metrics[f"{split}.rows_input"] = r.rows_input
        metrics[f"{split}.rows_accepted"] = r.table.num_rows
        metrics[f"{split}.rows_rejected"] = r.rejects.num_rows
        metrics[f"{split}.replaced_chars"] = r.replaced_chars
        metrics[f"{split}.labels_canonicalised"] = canonicalised[split]
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
        "labels_canonicalised": {"rows": sum(canonicalised.values()), "rewrites": rewrites},
    }
    extra = {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "log_files": ["ingest_report.json", "rejects_sample.csv"],
        "files": files_info,
        "replaced_chars": int(metrics["replaced_chars"]),
        "has_test": test is not None,
        "rejects_by_reason": by_reason,
        "labels_seen": labels_seen,
        "labels_canonicalised": {"rows": sum(canonicalised.values()), "rewrites": rewrites},
    }
    with store.writer(key) as w:
        w.write_table("train.parquet", train.table)
        if test is not None:
            w.write_table("test.parquet", test.table)
        w.write_table("rejects.parquet", rejects)
        w.write_json("ingest_report.json", report)
        write_csv_sample(w.path / "rejects_sample.csv", rejects_sample(rejects))
        return w.write_manifest(rows=rows, extra=extra)
