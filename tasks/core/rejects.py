"""Rejected rows: one schema for every kind, a per-reason sample for MLflow, reason kinds for metrics.

A rejects table always starts with ``id, split, reason``; a kind appends the columns that show the
row as it was read (text: ``text, label, raw``; images: ``label, pixels``).
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv

REJECTS_SAMPLE_PER_REASON = 20
BASE_FIELDS = [("id", pa.string()), ("split", pa.string()), ("reason", pa.string())]


def rejects_schema(*payload: tuple[str, pa.DataType]) -> pa.Schema:
    """The rejects schema of a kind: ``id, split, reason`` and then the kind's own columns."""
    return pa.schema([*BASE_FIELDS, *payload])


REJECTS_SAMPLE_PER_REASON = 20


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


def rejects_table(ids: list[str], reasons: list[str], payload: dict[str, Any] | None = None,
                  split: str | list[str] | None = None) -> pa.Table:
    """A rejects table: the row id, its split, the reason it was rejected, and whatever row data there is.

    ``split`` is one split name for every row, or one per row.
    """
    splits = [split] * len(ids) if split is None or isinstance(split, str) else list(split)
    columns: dict[str, Any] = {"id": pa.array(ids, pa.string()), "split": pa.array(splits, pa.string()),
                               "reason": pa.array(reasons, pa.string())}
    for key, values in (payload or {}).items():
        columns[key] = pa.array(values)
    return pa.table(columns)
