"""Validate stage: check the ingested rows, report on them, reject the unusable ones.

Input: the ingest output (``train.parquet``, optional ``test.parquet``, canonical ``id, text,
label``). Rows with an empty or whitespace-only text, a missing label or an unknown label are
rejected (``rejects.parquet``, reasons ``"empty text"``, ``"missing label"``, ``"unknown label 'x'
(allowed: ...)"``). A label is unknown when ``data.labels`` is set and does not hold it; when
``data.labels`` is null every train label is allowed and a test label never seen in train is
unknown. Every other row passes to ``train.parquet`` / ``test.parquet`` unchanged: duplicates and
conflicts are only reported here (clean drops them).

Statistics (on the rows that pass, per split):

* duplicates: *exact* = an earlier row with the same text and label; *normalised* = an earlier row
  with the same :func:`tasks.textnorm.match_key` key and label;
* conflicts: rows whose key appears with more than one label in the split;
* leakage: test rows whose key also occurs in train (fraction of test rows);
* label balance: counts, fractions, imbalance ratio (largest / smallest class), rarest class;
* length in tokens: a cheap word / punctuation split (``[\\pL\\pN\\pM_]+`` or one other
  non-space character). WordPiece splits a word into one or more pieces, so this is a **lower
  bound** of the tokenizer's length; ``[CLS]`` and ``[SEP]`` are added before comparing with
  ``tokenizer.max_length`` (truncation rate), percentiles p50 / p90 / p99 / max.

Checks against :class:`~tasks.config.ValidateConfig`: reject fraction (ingest + validate rejects
over ingest input), empty-text fraction, conflict fraction (per split), leakage fraction,
truncation rate (per split), rarest-class fraction. A value above its threshold fails, a nonzero
value at or below it warns (``extra["warnings"]``); the rarest-class check fails below its
threshold. A train split without rows or with a single label fails too.

On failure the report (``validation_report.json`` / ``.md``, ``rejects.parquet``) is written to
``<store root>/validate/failed-<fingerprint>/`` (never a cache hit) and :class:`DataError` is
raised with one line naming each failing check, its observed value and threshold, and the path of
that report.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NONE

from tasks import ingest, textnorm
from tasks.artifacts import ArtifactStore, DataError, StageRef, fingerprint, read_splits, source_hash
from tasks.config import Recipe, ValidateConfig
from tasks.ingest import REJECTS_SCHEMA, SCHEMA, reason_kind, rejects_sample, write_csv_sample
from tasks.lineage import tracked

STAGE = "validate"
REPORT_JSON = "validation_report.json"
REPORT_MD = "validation_report.md"
TOKEN_PATTERN = r"[\pL\pN\pM_]+|[^\pL\pN\pM_\s\pZ]"
SPECIAL_TOKENS = 2  # [CLS] and [SEP] count towards tokenizer.max_length
LENGTH_NOTE = (
    "Lengths are counted with a cheap word/punctuation split ([\\pL\\pN\\pM_]+ | one other non-space "
    "character) plus 2 special tokens: a lower bound of the WordPiece length, so the real "
    "truncation rate can only be higher."
)
EXAMPLES = 10
OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass
class Check:
    """One validation check: what was measured, against which threshold, and the verdict."""

    name: str
    status: str
    observed: float | None = None
    threshold: float | None = None
    limit: str | None = None  # "max" (observed must be <= threshold) or "min"
    split: str | None = None
    message: str = ""  # one line: split, check, observed value, threshold and what it measures
    detail: str = ""  # what the check measures (the report table's last column)

    @property
    def label(self) -> str:
        return f"{self.name}[{self.split}]" if self.split else self.name


@dataclass
class ValidationResult:
    """Outcome of :func:`validate_tables`."""

    train: pa.Table
    test: pa.Table | None
    rejects: pa.Table
    report: dict[str, Any]
    checks: list[Check] = field(default_factory=list)

    @property
    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def warnings(self) -> list[str]:
        return [c.message for c in self.checks if c.status == WARN]


# --------------------------------------------------------------------------------------------
# vectorised building blocks


def token_counts(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Words and punctuation marks per text (see :data:`LENGTH_NOTE`), as int64."""
    counts = pc.count_substring_regex(pc.fill_null(texts, ""), pattern=TOKEN_PATTERN)
    return np.asarray(counts.to_numpy(zero_copy_only=False), dtype=np.int64)


def codes(values: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, list[Any]]:
    """Dense integer codes of ``values`` (first-appearance order) and the distinct values."""
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    encoded = pc.dictionary_encode(values)
    return (
        np.asarray(encoded.indices.to_numpy(zero_copy_only=False), dtype=np.int64),
        encoded.dictionary.to_pylist(),
    )


def duplicate_mask(key_codes: np.ndarray, label_codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Rows that repeat an earlier (key, label) pair, and the index of that first row for each row."""
    n = len(key_codes)
    if n == 0:
        return np.zeros(0, dtype=bool), np.zeros(0, dtype=np.int64)
    n_labels = int(label_codes.max()) + 1
    pair = key_codes * n_labels + label_codes
    _, first, inverse = np.unique(pair, return_index=True, return_inverse=True)
    first_of_row = first[inverse.reshape(-1)]
    return first_of_row != np.arange(n), first_of_row


def conflict_mask(key_codes: np.ndarray, label_codes: np.ndarray) -> np.ndarray:
    """Rows whose key appears with more than one distinct label."""
    n = len(key_codes)
    if n == 0:
        return np.zeros(0, dtype=bool)
    n_labels = int(label_codes.max()) + 1
    pairs = np.unique(key_codes * n_labels + label_codes)
    labels_per_key = np.bincount(pairs // n_labels, minlength=int(key_codes.max()) + 1)
    return labels_per_key[key_codes] > 1


def label_balance(labels: pa.Array | pa.ChunkedArray, expected: list[str] | None = None) -> dict[str, Any]:
    """Counts and fractions per label (``expected`` labels with no rows count 0), imbalance ratio, rarest class."""
    counts: dict[str, int] = {label: 0 for label in (expected or [])}
    if len(labels):
        for item in pc.value_counts(labels).to_pylist():
            counts[item["values"]] = int(item["counts"])
    counts = dict(sorted(counts.items()))
    total = sum(counts.values())
    fractions = {k: (v / total if total else 0.0) for k, v in counts.items()}
    if counts:
        rarest = min(counts, key=lambda k: (counts[k], k))
        largest = max(counts.values())
        smallest = counts[rarest]
        ratio = float(largest / smallest) if smallest else float("inf")
    else:
        rarest, ratio = None, None
    return {
        "counts": counts,
        "fractions": fractions,
        "num_labels": sum(1 for v in counts.values() if v),
        "imbalance_ratio": ratio,
        "rarest_label": rarest,
        "rarest_fraction": fractions[rarest] if rarest is not None else 0.0,
    }


def length_stats(texts: pa.Array | pa.ChunkedArray, max_length: int) -> dict[str, Any]:
    """Token-length distribution (lower bound, see :data:`LENGTH_NOTE`) and truncation rate."""
    counts = token_counts(texts)
    if len(counts) == 0:
        return {"p50": 0, "p90": 0, "p99": 0, "max": 0, "mean": 0.0, "truncated_rows": 0, "truncation_rate": 0.0,
                "max_length": max_length}
    with_special = counts + SPECIAL_TOKENS
    truncated = int(np.count_nonzero(with_special > max_length))
    p50, p90, p99 = (float(x) for x in np.percentile(counts, [50, 90, 99]))
    return {
        "p50": p50, "p90": p90, "p99": p99, "max": int(counts.max()), "mean": float(counts.mean()),
        "truncated_rows": truncated, "truncation_rate": truncated / len(counts), "max_length": max_length,
    }


# --------------------------------------------------------------------------------------------
# the checks


def canonical(table: pa.Table, name: str) -> pa.Table:
    """``table`` as canonical ``id, text, label`` strings; DataError naming the problem otherwise."""
    missing = [c for c in SCHEMA.names if c not in table.column_names]
    if missing:
        raise DataError(f"validate: {name}: schema check failed: missing column(s) {missing} "
                        f"(columns: {', '.join(table.column_names)})")
    table = table.select(SCHEMA.names)
    for column in SCHEMA.names:
        typ = table.schema.field(column).type
        if not (pa.types.is_string(typ) or pa.types.is_large_string(typ) or pa.types.is_string_view(typ)):
            raise DataError(f"validate: {name}: schema check failed: column {column!r} is {typ}, expected string")
    table = table.cast(SCHEMA).combine_chunks()
    nulls = table.column("id").null_count
    if nulls:
        raise DataError(f"validate: {name}: schema check failed: {nulls} null id(s)")
    return table


def row_reasons(table: pa.Table, allowed: list[str] | None, allowed_note: str) -> pa.Array:
    """Rejection reason per row (null when the row passes): empty text, missing or unknown label."""
    text, label = table.column("text"), table.column("label")
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(text, "")), ""), True)
    missing = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(label, "")), ""), True)
    reasons = pa.nulls(table.num_rows, pa.string())
    if allowed is not None and table.num_rows:
        unknown = pc.invert(pc.fill_null(pc.is_in(label, value_set=pa.array(allowed, pa.string())), False))
        unknown = pc.and_(unknown, pc.invert(missing))
        if pc.any(unknown).as_py():
            shown = ", ".join(allowed[:20]) + (", ..." if len(allowed) > 20 else "")
            msg = pc.binary_join_element_wise(
                "unknown label '", pc.fill_null(label, ""), f"' ({allowed_note}: {shown})", ""
            )
            reasons = pc.if_else(unknown, msg, reasons)
    reasons = pc.if_else(missing, pa.scalar("missing label"), reasons)
    reasons = pc.if_else(empty, pa.scalar("empty text"), reasons)
    return reasons


def _split_rejects(table: pa.Table, reasons: pa.Array, split: str) -> pa.Table:
    bad = pc.is_valid(reasons)
    rows = table.filter(bad)
    n = rows.num_rows
    return pa.table(
        {
            "id": rows.column("id"),
            "split": pa.array([split] * n, pa.string()),
            "reason": reasons.filter(bad),
            "text": rows.column("text"),
            "label": rows.column("label"),
            "raw": pa.nulls(n, pa.string()),
        },
        schema=REJECTS_SCHEMA,
    )


def split_stats(table: pa.Table, keys: pa.Array, max_length: int, expected: list[str] | None) -> dict[str, Any]:
    """Duplicates, conflicts, label balance and lengths of one split's passing rows."""
    n = table.num_rows
    text_codes, _ = codes(table.column("text"))
    key_codes, key_values = codes(keys)
    label_codes, _ = codes(table.column("label"))
    exact_dup, _ = duplicate_mask(text_codes, label_codes)
    norm_dup, _ = duplicate_mask(key_codes, label_codes)
    conflict = conflict_mask(key_codes, label_codes)
    conflict_keys = np.unique(key_codes[conflict])
    examples = []
    if len(conflict_keys):
        texts = table.column("text").to_numpy(zero_copy_only=False)
        labels = table.column("label").to_numpy(zero_copy_only=False)
        for k in conflict_keys[:EXAMPLES]:
            rows = np.flatnonzero(key_codes == k)
            examples.append({"text": str(texts[rows[0]]), "labels": dict(Counter(str(x) for x in labels[rows]))})
    return {
        "rows": n,
        "labels": label_balance(table.column("label"), expected),
        "duplicates": {
            "exact_rows": int(exact_dup.sum()),
            "normalised_rows": int(norm_dup.sum()),
            "distinct_texts": int(text_codes.max() + 1) if n else 0,
            "distinct_keys": len(key_values),
        },
        "conflicts": {
            "rows": int(conflict.sum()),
            "keys": len(conflict_keys),
            "fraction": float(conflict.sum() / n) if n else 0.0,
            "examples": examples,
        },
        "length": length_stats(table.column("text"), max_length),
    }


def leakage_stats(train_keys: pa.Array, test: pa.Table, test_keys: pa.Array) -> dict[str, Any]:
    """Test rows whose key also occurs in train, and the train rows they match."""
    in_train = pc.fill_null(pc.is_in(test_keys, value_set=train_keys), False)
    in_test = pc.fill_null(pc.is_in(train_keys, value_set=test_keys), False)
    leaked = int(pc.sum(in_train).as_py() or 0)
    examples = []
    if leaked:
        rows = test.filter(in_train).slice(0, EXAMPLES)
        examples = [{"id": r["id"], "text": r["text"], "label": r["label"]} for r in rows.to_pylist()]
    n = test.num_rows
    return {
        "test_rows_leaked": leaked,
        "fraction": leaked / n if n else 0.0,
        "train_rows_matching": int(pc.sum(in_test).as_py() or 0),
        "examples": examples,
    }


def max_check(name: str, observed: float, threshold: float, split: str | None, what: str) -> Check:
    """A check that fails above ``threshold`` and warns above 0."""
    if observed > threshold:
        status = FAIL
    elif observed > 0:
        status = WARN
    else:
        status = OK
    where = f"{split}: " if split else ""
    message = f"{where}{name} {observed:.4g} (threshold {threshold:g}): {what}"
    return Check(name, status, float(observed), float(threshold), "max", split, message, what)


def balance_checks(train_rows: int, balance: dict[str, Any], cfg: ValidateConfig) -> list[Check]:
    """Train must keep rows and at least two labels; its rarest class must reach ``min_class_fraction``
    (an allowed label without any train row warns). ``balance`` is :func:`label_balance` of train."""
    checks = []
    if train_rows == 0:
        checks.append(Check("train_rows", FAIL, 0.0, 1.0, "min", "train", "train: no rows left after validation"))
    elif balance["num_labels"] < 2:
        checks.append(Check("num_labels", FAIL, float(balance["num_labels"]), 2.0, "min", "train",
                            f"train: only {balance['num_labels']} label(s): {list(balance['counts'])}"))
    rarest = balance["rarest_fraction"]
    if rarest < cfg.min_class_fraction:
        status = FAIL
    elif balance["counts"] and min(balance["counts"].values()) == 0:
        status = WARN
    else:
        status = OK
    checks.append(Check("min_class_fraction", status, float(rarest), float(cfg.min_class_fraction), "min", "train",
                        f"train: rarest class {balance['rarest_label']!r} fraction {rarest:.4f} "
                        f"(threshold {cfg.min_class_fraction:g}; imbalance ratio {fmt(balance['imbalance_ratio'])})"))
    return checks


def overall_status(checks: list[Check]) -> str:
    """FAIL if any check failed, else WARN if any warned, else OK."""
    return FAIL if any(c.status == FAIL for c in checks) else WARN if any(c.status == WARN for c in checks) else OK


def validate_tables(
    train: pa.Table,
    test: pa.Table | None,
    cfg: ValidateConfig,
    labels: list[str] | None,
    max_length: int,
    ingest_rows: dict[str, int] | None = None,
) -> ValidationResult:
    """Validate canonical train (and test) tables: rejects, statistics, checks (see module doc).

    ``labels`` is the allowed label set (``data.labels``) or None; ``max_length`` the tokenizer's
    ``max_length``; ``ingest_rows`` the ingest stage's ``input`` / ``rejected`` counts (for the
    reject fraction; defaults to the rows given here with no ingest rejects).
    """
    train = canonical(train, "train.parquet")
    test = canonical(test, "test.parquet") if test is not None else None

    train_reasons = row_reasons(train, labels, "allowed")
    train_ok = train.filter(pc.is_null(train_reasons))
    if labels is not None:
        allowed, note = list(labels), "allowed"
    else:
        allowed, note = sorted(pc.unique(train_ok.column("label")).to_pylist()), "not seen in train; train labels"
    parts = [_split_rejects(train, train_reasons, "train")]
    test_ok = None
    if test is not None:
        test_reasons = row_reasons(test, allowed, note)
        test_ok = test.filter(pc.is_null(test_reasons))
        parts.append(_split_rejects(test, test_reasons, "test"))
    rejects = pa.concat_tables(parts).combine_chunks()

    n_in = train.num_rows + (test.num_rows if test is not None else 0)
    reasons = rejects.column("reason").to_pylist()
    by_reason = dict(Counter(reason_kind(r) for r in reasons))
    empty_rows = by_reason.get("empty text", 0)
    ingest_rows = ingest_rows or {}
    ingest_input = int(ingest_rows.get("input", n_in))
    ingest_rejected = int(ingest_rows.get("rejected", 0))

    keys = {"train": textnorm.match_key(train_ok.column("text"))}
    tables = {"train": train_ok}
    if test_ok is not None:
        keys["test"] = textnorm.match_key(test_ok.column("text"))
        tables["test"] = test_ok
    stats = {
        split: split_stats(tables[split], keys[split], max_length, labels if split == "train" else None)
        for split in tables
    }

    checks: list[Check] = [Check("schema", OK, message="id, text, label: string columns, no null ids")]
    all_ids = pa.chunked_array([train.column("id")] + ([test.column("id")] if test is not None else []))
    repeated_ids = n_in - pc.count_distinct(all_ids).as_py()
    if repeated_ids:
        checks.append(Check("unique_ids", WARN, float(repeated_ids), None, None, None,
                            f"{repeated_ids} row id(s) repeated across train/test (same file read twice?)"))
    reject_fraction = (ingest_rejected + rejects.num_rows) / ingest_input if ingest_input else 0.0
    checks.append(max_check("reject_fraction", reject_fraction, cfg.max_reject_fraction, None,
                             "rejected rows (ingest + validate) / input"))
    checks.append(max_check("empty_fraction", empty_rows / n_in if n_in else 0.0, cfg.max_empty_fraction, None,
                             "empty or whitespace-only texts / rows"))
    unknown = sum(v for k, v in by_reason.items() if k in ("unknown label", "missing label"))
    label_msg = f"{unknown} row(s) with a missing or unknown label rejected" if unknown else "all labels known"
    checks.append(Check("labels", WARN if unknown else OK, float(unknown), None, None, None, label_msg))
    for split, s in stats.items():
        checks.append(max_check("conflict_fraction", s["conflicts"]["fraction"], cfg.max_conflict_fraction, split,
                                 "rows sharing a normalised text with a different label / rows"))
    if test_ok is not None:
        leak = leakage_stats(keys["train"], test_ok, keys["test"])
        checks.append(max_check("leakage_fraction", leak["fraction"], cfg.max_leakage_fraction, "test",
                                 "test rows whose normalised text is also in train / test rows"))
    else:
        leak = None
    for split, s in stats.items():
        checks.append(max_check("truncation_rate", s["length"]["truncation_rate"], cfg.max_truncation_rate, split,
                                 f"texts over tokenizer.max_length={max_length} tokens (lower bound) / rows"))
    for split, s in stats.items():
        dup = s["duplicates"]
        if dup["exact_rows"] or dup["normalised_rows"]:
            checks.append(Check("duplicates", WARN, float(dup["normalised_rows"]), None, None, split,
                                f"{split}: {dup['exact_rows']} exact and {dup['normalised_rows']} normalised duplicate "
                                "rows (same text and label as an earlier row; clean drops them when clean.dedupe)"))
        else:
            checks.append(Check("duplicates", OK, 0.0, None, None, split, f"{split}: no duplicates"))

    checks += balance_checks(train_ok.num_rows, stats["train"]["labels"], cfg)

    rows = {"input": n_in, "train": train_ok.num_rows, "test": test_ok.num_rows if test_ok is not None else 0,
            "rejected": rejects.num_rows}
    status = overall_status(checks)
    report = {
        "stage": STAGE,
        "status": status,
        "thresholds": {**cfg.model_dump(mode="json"), "max_length": max_length},
        "allowed_labels": labels,
        "rows": {**rows, "ingest_input": ingest_input, "ingest_rejected": ingest_rejected,
                 "empty_text": empty_rows, "reject_fraction": reject_fraction},
        "rejects_by_reason": by_reason,
        "splits": stats,
        "leakage": leak,
        "checks": [asdict(c) for c in checks],
        "warnings": [c.message for c in checks if c.status == WARN],
        "notes": [LENGTH_NOTE,
                  "Statistics are over the rows that pass validation; duplicates and conflicts are "
                  "reported here and dropped by clean."],
    }
    return ValidationResult(train_ok, test_ok, rejects, report, checks)


# --------------------------------------------------------------------------------------------
# report rendering


def fmt(value: Any) -> str:
    """A number for a report: floats to 4 significant decimals, whole floats as integers, None as -."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            return str(value)
        return f"{value:.4f}".rstrip("0").rstrip(".") if value != int(value) else f"{int(value)}"
    return str(value)


def md_escape(text: str) -> str:
    """Text safe inside a markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("\n", " ")


def checks_markdown(report: dict[str, Any]) -> list[str]:
    """The report's "Checks" table and, when rows were rejected, its "Rejected rows" table (markdown lines)."""
    out = ["## Checks", "", "| check | split | status | observed | threshold | detail |", "|---|---|---|---|---|---|"]
    for c in report["checks"]:
        sign = "≤" if c["limit"] == "max" else "≥"
        threshold = "-" if c["threshold"] is None else f"{sign} {fmt(c['threshold'])}"
        out.append(f"| {c['name']} | {c['split'] or '-'} | {c['status']} | {fmt(c['observed'])} | {threshold} | "
                   f"{md_escape(c['detail'] or c['message'])} |")
    if report["rejects_by_reason"]:
        out += ["", "## Rejected rows", "", "| reason | rows |", "|---|---|"]
        out += [f"| {md_escape(k)} | {v} |" for k, v in sorted(report["rejects_by_reason"].items())]
    return out


def render_markdown(report: dict[str, Any]) -> str:
    """The report as readable markdown tables."""
    out = [f"# Validation report: {report['status'].upper()}", ""]
    rows = report["rows"]
    out += [f"Rows: ingest input {rows['ingest_input']}, ingest rejected {rows['ingest_rejected']}, "
            f"validate input {rows['input']}, passed train {rows['train']} / test {rows['test']}, "
            f"rejected {rows['rejected']}.", ""]
    out += checks_markdown(report)
    for split, s in report["splits"].items():
        out += ["", f"## {split} ({s['rows']} rows)", "", "| label | rows | fraction |", "|---|---|---|"]
        for label, count in s["labels"]["counts"].items():
            out.append(f"| {md_escape(str(label))} | {count} | {fmt(s['labels']['fractions'][label])} |")
        out.append(f"\nImbalance ratio {fmt(s['labels']['imbalance_ratio'])}; rarest "
                   f"{s['labels']['rarest_label']!r} ({fmt(s['labels']['rarest_fraction'])}).")
        d, c, ln = s["duplicates"], s["conflicts"], s["length"]
        out += ["", "| statistic | value |", "|---|---|",
                f"| exact duplicate rows | {d['exact_rows']} |",
                f"| normalised duplicate rows | {d['normalised_rows']} |",
                f"| distinct texts / keys | {d['distinct_texts']} / {d['distinct_keys']} |",
                f"| conflicting rows / texts | {c['rows']} / {c['keys']} ({fmt(c['fraction'])}) |",
                "| tokens p50 / p90 / p99 / max (lower bound) | "
                f"{fmt(ln['p50'])} / {fmt(ln['p90'])} / {fmt(ln['p99'])} / {ln['max']} |",
                f"| truncated at max_length {ln['max_length']} | "
                f"{ln['truncated_rows']} ({fmt(ln['truncation_rate'])}) |"]
        if c["examples"]:
            out += ["", "Conflict examples:", ""]
            out += [f"- \"{md_escape(e['text'][:120])}\": {md_escape(str(e['labels']))}" for e in c["examples"]]
    leak = report.get("leakage")
    if leak:
        out += ["", "## Leakage", "",
                f"{leak['test_rows_leaked']} test rows ({fmt(leak['fraction'])}) share a normalised text with "
                f"{leak['train_rows_matching']} train rows."]
        out += [f"- {e['id']}: \"{md_escape(e['text'][:120])}\"" for e in leak["examples"]]
    out += ["", "## Notes", ""] + [f"- {n}" for n in report["notes"]]
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------
# stage entry point


def validate_config(recipe: Recipe) -> dict[str, Any]:
    """What validate depends on: its thresholds, the allowed labels and the tokenizer's max_length."""
    return {
        "validate": recipe.validate_.model_dump(mode="json"),
        "labels": recipe.data.labels,
        "max_length": recipe.tokenizer.max_length,
    }


def report_metrics(report: dict[str, Any]) -> dict[str, float]:
    """The metrics every validation report has, text or images: row counts, warnings, rejects by
    reason, per-split label balance and leakage."""
    rows = report["rows"]
    metrics: dict[str, float] = {
        "rows_input": rows["input"], "rows_train": rows["train"], "rows_test": rows["test"],
        "rows_rejected": rows["rejected"], "reject_fraction": rows["reject_fraction"],
        "warnings": len(report["warnings"]),
    }
    for kind, count in report["rejects_by_reason"].items():
        metrics[f"rejected.{ingest.metric_name(kind)}"] = count
    for split, s in report["splits"].items():
        metrics[f"{split}.num_labels"] = s["labels"]["num_labels"]
        ratio = s["labels"]["imbalance_ratio"]
        if ratio is not None and ratio != float("inf"):
            metrics[f"{split}.imbalance_ratio"] = ratio
        metrics[f"{split}.min_class_fraction"] = s["labels"]["rarest_fraction"]
        for label, frac in s["labels"]["fractions"].items():
            metrics[f"{split}.label_fraction.{ingest.metric_name(str(label))}"] = frac
    if report["leakage"] is not None:
        metrics["leakage_fraction"] = report["leakage"]["fraction"]
        metrics["leaked_test_rows"] = report["leakage"]["test_rows_leaked"]
    return {k: float(v) for k, v in metrics.items()}


def _metrics(result: ValidationResult) -> dict[str, float]:
    report = result.report
    metrics = {**report_metrics(report), "empty_rows": report["rows"]["empty_text"]}
    for split, s in report["splits"].items():
        metrics[f"{split}.exact_duplicate_rows"] = s["duplicates"]["exact_rows"]
        metrics[f"{split}.normalised_duplicate_rows"] = s["duplicates"]["normalised_rows"]
        metrics[f"{split}.conflict_rows"] = s["conflicts"]["rows"]
        metrics[f"{split}.conflict_fraction"] = s["conflicts"]["fraction"]
        metrics[f"{split}.truncation_rate"] = s["length"]["truncation_rate"]
        for p in ("p50", "p90", "p99", "max"):
            metrics[f"{split}.tokens_{p}"] = s["length"][p]
    return {k: float(v) for k, v in metrics.items()}


def describe_failure(check: Check) -> str:
    """One failed check as it reads in the error: observed value against its threshold."""
    if check.observed is None or check.threshold is None:
        return f"{check.label} ({check.message})"
    text = f"{check.label} {check.observed:.4g} {'>' if check.limit == 'max' else '<'} {check.threshold:g}"
    return text + (f" ({check.message})" if check.name in ("train_rows", "num_labels") else "")


def _write_report(directory: Path, result: ValidationResult, render: Callable[[dict[str, Any]], str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / REPORT_JSON).write_text(json.dumps(result.report, indent=2, sort_keys=True, default=str))
    (directory / REPORT_MD).write_text(render(result.report))


def store_result(
    result: ValidationResult, recipe: Recipe, ingested: StageRef, store: ArtifactStore, *, fp: str,
    config: dict[str, Any], code: str, metrics: dict[str, float], started: float,
    render: Callable[[dict[str, Any]], str], extra: dict[str, Any] | None = None,
) -> StageRef:
    """The tail shared by the text and image validate stages.

    Checks the row accounting; on a failed check writes the report to ``failed-<fp>/`` and raises a
    one-line DataError; otherwise stores the passing rows, rejects and report as the stage output.
    """
    rows = {k: int(result.report["rows"][k]) for k in ("input", "train", "test", "rejected")}
    if rows["train"] + rows["test"] + rows["rejected"] != rows["input"]:  # pragma: no cover - invariant
        raise RuntimeError(f"{STAGE}: row accounting broken: {rows}")

    if result.failed:
        failed_dir = store.root / STAGE / f"failed-{fp}"
        shutil.rmtree(failed_dir, ignore_errors=True)
        _write_report(failed_dir, result, render)
        pq.write_table(result.rejects, failed_dir / "rejects.parquet", compression="zstd")
        problems = "; ".join(describe_failure(c) for c in result.failed)
        raise DataError(f"{STAGE} failed: {problems} (report: {failed_dir / REPORT_MD})")

    metrics["duration_s"] = round(time.perf_counter() - started, 4)
    train_counts = result.report["splits"]["train"]["labels"]["counts"]
    extra = {
        "metrics": metrics,
        "log_files": [REPORT_JSON, REPORT_MD, "rejects_sample.csv"],
        "status": result.report["status"],
        "warnings": result.warnings,
        "checks": [{"name": c.name, "split": c.split, "status": c.status, "observed": c.observed,
                    "threshold": c.threshold} for c in result.checks],
        "labels": list(recipe.data.labels) if recipe.data.labels is not None else sorted(train_counts),
        "label_counts": {split: s["labels"]["counts"] for split, s in result.report["splits"].items()},
        "rejects_by_reason": result.report["rejects_by_reason"],
        "has_test": result.test is not None,
        **(extra or {}),
    }
    with store.writer(STAGE, fp) as w:
        w.write_table("train.parquet", result.train)
        if result.test is not None:
            w.write_table("test.parquet", result.test)
        w.write_table("rejects.parquet", result.rejects)
        _write_report(w.path, result, render)
        write_csv_sample(w.path / "rejects_sample.csv", rejects_sample(result.rejects))
        return w.write_manifest(config=config, inputs=[ingested.fingerprint], code=code, rows=rows, extra=extra)


def run(recipe: Recipe, ingested: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Validate the ingested rows (cached by fingerprint); DataError when a threshold fails.

    Returns a ref whose ``rows`` are ``input, train, test, rejected`` and whose ``extra`` holds
    ``metrics``, ``log_files``, ``status``, ``warnings``, ``checks``, ``labels`` (allowed labels, or
    the train labels when ``data.labels`` is null), ``label_counts``, ``rejects_by_reason`` and
    ``has_test``. A failing report is left in ``<store root>/validate/failed-<fingerprint>/``.
    """
    start = time.perf_counter()
    config = validate_config(recipe)
    code = source_hash(sys.modules[__name__], textnorm, ingest)
    fp = fingerprint(STAGE, config, [ingested.fingerprint], code)
    if not force and (hit := store.lookup(STAGE, fp)) is not None:
        return hit

    splits = read_splits(ingested)
    train, test = splits["train"], splits.get("test")
    result = validate_tables(
        train, test, recipe.validate_, recipe.data.labels, recipe.tokenizer.max_length, ingested.rows
    )
    return store_result(result, recipe, ingested, store, fp=fp, config=config, code=code,
                        metrics=_metrics(result), started=start, render=render_markdown)


@task(name="validate", cache_policy=NONE)
def validate_task(recipe: Recipe, ingested: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Check the ingested data; write the validation report; fail above the recipe's thresholds."""
    if recipe.task == "image-classification":
        from tasks.vision import validate as vision_validate

        return tracked(run_id, STAGE, lambda store: vision_validate.run(recipe, ingested, store, force))
    return tracked(run_id, STAGE, lambda store: run(recipe, ingested, store, force))
