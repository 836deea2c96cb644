"""Validate stage: check the ingested rows, report on them, reject the unusable ones.

Input: the ingest output (``train.parquet``, optional ``test.parquet``, canonical ``id, text,
label``). Rows with an empty or whitespace-only text, a missing label or an unknown label are
rejected (``rejects.parquet``, reasons ``"empty text"``, ``"missing label"``, ``"unknown label 'x'
(allowed: ...)"``). A label is unknown when ``data.labels`` is set and does not hold it; when
``data.labels`` is null every train label is allowed and a test label never seen in train is
unknown. Numeric-looking ``data.labels`` are compared in canonical form (``"1.0"`` is ``"1"``), as
ingest writes numeric labels; the rows ingest rewrote so are a warning (``labels_canonicalised``).
Every other row passes to ``train.parquet`` / ``test.parquet`` unchanged: duplicates and conflicts
are only reported here (clean drops them).

Statistics (on the rows that pass, per split):

* duplicates: *exact* = an earlier row with the same text and label; *normalised* = an earlier row
  with the same :func:`tasks.text.textnorm.match_key` key and label;
* conflicts: rows whose key appears with more than one label in the split;
* leakage: test rows whose key also occurs in train (fraction of test rows);
* label balance: counts, fractions, imbalance ratio (largest / smallest class), rarest class;
* length in tokens: a cheap word / punctuation split (``[\\pL\\pN\\pM_]+`` or one other
  non-space character). WordPiece splits a word into one or more pieces, so this is a **lower
  bound** of the tokenizer's length; ``[CLS]`` and ``[SEP]`` are added before comparing with
  ``tokenizer.max_length`` (truncation rate), percentiles p50 / p90 / p99 / max.

Checks against :class:`~tasks.core.config.ValidateConfig`: reject fraction (ingest + validate rejects
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

import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.core.checks import (
    OK,
    WARN,
    Check,
    ValidationResult,
    balance_checks,
    checks_markdown,
    codes,
    conflict_mask,
    duplicate_mask,
    fmt,
    label_balance,
    max_check,
    md_escape,
    overall_status,
    report_metrics,
    store_result,
)
from tasks.core.config import ValidateConfig
from tasks.core.rejects import reason_kind
from tasks.core.store import (
    ArtifactStore,
    DataError,
    StageRef,
    bounded,
    read_splits,
    stage_key,
)
from tasks.text import textnorm
from tasks.text.config import TextRecipe
from tasks.text.ingest import REJECTS_SCHEMA, SCHEMA, canonical_label_list

STAGE = "validate"
TOKEN_PATTERN = r"[\pL\pN\pM_]+|[^\pL\pN\pM_\s\pZ]"
SPECIAL_TOKENS = 2  # [CLS] and [SEP] count towards tokenizer.max_length
LENGTH_NOTE = (
    "Lengths are counted with a cheap word/punctuation split ([\\pL\\pN\\pM_]+ | one other non-space "
    "character) plus 2 special tokens: a lower bound of the WordPiece length, so the real "
    "truncation rate can only be higher."
)
EXAMPLES = 10


# --------------------------------------------------------------------------------------------
# vectorised building blocks


def token_counts(texts: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Words and punctuation marks per text (see :data:`LENGTH_NOTE`), as int64."""
    counts = pc.count_substring_regex(pc.fill_null(texts, ""), pattern=TOKEN_PATTERN)
    return np.asarray(counts.to_numpy(zero_copy_only=False), dtype=np.int64)


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
                        f"(columns: {bounded(', '.join(table.column_names))})")
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


def validate_tables(
    train: pa.Table,
    test: pa.Table | None,
    cfg: ValidateConfig,
    labels: list[str] | None,
    max_length: int,
    ingest_rows: dict[str, int] | None = None,
    labels_canonicalised: dict[str, Any] | None = None,
) -> ValidationResult:
    """Validate canonical train (and test) tables: rejects, statistics, checks (see module doc).

    ``labels`` is the allowed label set (``data.labels``) or None; numeric-looking ones are compared
    in canonical form, as ingest writes the data's labels (:func:`tasks.text.ingest.canonical_label_list`).
    ``max_length`` is the tokenizer's ``max_length``; ``ingest_rows`` the ingest stage's ``input`` /
    ``rejected`` counts (for the reject fraction; defaults to the rows given here with no ingest
    rejects); ``labels_canonicalised`` ingest's ``rows`` / ``rewrites`` of numeric labels (a warning
    when any row was rewritten).
    """
    labels = canonical_label_list(labels)
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
    # typed: an empty table's column may have no chunks, and an untyped chunked array of none is null
    all_ids = pa.chunked_array([train.column("id")] + ([test.column("id")] if test is not None else []), pa.string())
    repeated_ids = n_in - pc.count_distinct(all_ids).as_py()
    if repeated_ids:
        checks.append(Check("unique_ids", WARN, float(repeated_ids), None, None, None,
                            f"{repeated_ids} row id(s) repeated across train/test (same file read twice?)"))
    reject_fraction = (ingest_rejected + rejects.num_rows) / ingest_input if ingest_input else 0.0
    checks.append(max_check("reject_fraction", reject_fraction, cfg.max_reject_fraction, None,
                             "rejected rows (ingest + validate) / input"))
    checks.append(max_check("empty_fraction", empty_rows / n_in if n_in else 0.0, cfg.max_empty_fraction, None,
                             "empty or whitespace-only texts / rows"))
    rewritten = int((labels_canonicalised or {}).get("rows", 0))
    if rewritten:
        rewrites = (labels_canonicalised or {}).get("rewrites", {})
        shown = ", ".join(f"{a!r} -> {b!r}" for a, b in list(rewrites.items())[:5])
        more = f" and {len(rewrites) - 5} more" if len(rewrites) > 5 else ""
        checks.append(Check("labels_canonicalised", WARN, float(rewritten), None, None, None,
                            f"{rewritten} row label(s) rewritten by ingest as integers ({shown}{more}): every "
                            "label is a number, so equal numbers are one class"))
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
        "labels_canonicalised": {"rows": rewritten, "rewrites": (labels_canonicalised or {}).get("rewrites", {})},
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


def validate_config(recipe: TextRecipe) -> dict[str, Any]:
    """What validate depends on: its thresholds, the allowed labels and the tokenizer's max_length."""
    return {
        "validate": recipe.validate_.model_dump(mode="json"),
        "labels": recipe.data.labels,
        "max_length": recipe.tokenizer.max_length,
    }


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


def run(recipe: TextRecipe, ingested: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Validate the ingested rows (cached by fingerprint); DataError when a threshold fails.

    Returns a ref whose ``rows`` are ``input, train, test, rejected`` and whose ``extra`` holds
    ``metrics``, ``log_files``, ``status``, ``warnings``, ``checks``, ``labels`` (allowed labels, or
    the train labels when ``data.labels`` is null), ``label_counts``, ``rejects_by_reason`` and
    ``has_test``. A failing report is left in ``<store root>/validate/failed-<fingerprint>/``.
    """
    start = time.perf_counter()
    config = validate_config(recipe)
    key = stage_key(STAGE, config, [ingested.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit

    splits = read_splits(ingested)
    train, test = splits["train"], splits.get("test")
    result = validate_tables(
        train, test, recipe.validate_, recipe.data.labels, recipe.tokenizer.max_length, ingested.rows,
        ingested.extra.get("labels_canonicalised"),
    )
    # the allowed labels as validate compared them (canonical numbers), not as the recipe spells them
    return store_result(result, key, store, allowed_labels=result.report.get("allowed_labels"), metrics=_metrics(result),
                        started=start, render=render_markdown)
