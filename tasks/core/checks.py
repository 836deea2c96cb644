"""Validation checks shared by every kind: the check record, thresholds, label balance, duplicate and
conflict masks, the report's markdown pieces and metrics, and the validate stage's stored tail.

A check fails above its threshold and warns on any nonzero value at or below it; a kind's validate
stage builds its own report and calls :func:`store_result`, which fails the run with one line naming
every failed check and leaves the report in ``<store>/validate/failed-<fingerprint>/``.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.config import ValidateConfig
from tasks.core.rejects import metric_name, rejects_sample, write_csv_sample
from tasks.core.store import ArtifactStore, DataError, StageKey, StageRef

STAGE = "validate"
REPORT_JSON = "validation_report.json"
REPORT_MD = "validation_report.md"
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
        metrics[f"rejected.{metric_name(kind)}"] = count
    for split, s in report["splits"].items():
        metrics[f"{split}.num_labels"] = s["labels"]["num_labels"]
        ratio = s["labels"]["imbalance_ratio"]
        if ratio is not None and ratio != float("inf"):
            metrics[f"{split}.imbalance_ratio"] = ratio
        metrics[f"{split}.min_class_fraction"] = s["labels"]["rarest_fraction"]
        for label, frac in s["labels"]["fractions"].items():
            metrics[f"{split}.label_fraction.{metric_name(str(label))}"] = frac
    if report["leakage"] is not None:
        metrics["leakage_fraction"] = report["leakage"]["fraction"]
        metrics["leaked_test_rows"] = report["leakage"]["test_rows_leaked"]
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
    result: ValidationResult, key: StageKey, store: ArtifactStore, *, allowed_labels: list[str] | None,
    metrics: dict[str, float], started: float, render: Callable[[dict[str, Any]], str],
    extra: dict[str, Any] | None = None,
) -> StageRef:
    """The tail shared by the text and image validate stages.

    Checks the row accounting; on a failed check writes the report to ``failed-<fp>/`` and raises a
    one-line DataError; otherwise stores the passing rows, rejects and report as the stage output.
    """
    rows = {k: int(result.report["rows"][k]) for k in ("input", "train", "test", "rejected")}
    if rows["train"] + rows["test"] + rows["rejected"] != rows["input"]:  # pragma: no cover - invariant
        raise RuntimeError(f"{STAGE}: row accounting broken: {rows}")

    if result.failed:
        failed_dir = store.root / STAGE / f"failed-{key.fingerprint}"
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
        "labels": list(allowed_labels) if allowed_labels is not None else sorted(train_counts),
        "label_counts": {split: s["labels"]["counts"] for split, s in result.report["splits"].items()},
        "rejects_by_reason": result.report["rejects_by_reason"],
        "has_test": result.test is not None,
        **(extra or {}),
    }
    with store.writer(key) as w:
        w.write_table("train.parquet", result.train)
        if result.test is not None:
            w.write_table("test.parquet", result.test)
        w.write_table("rejects.parquet", result.rejects)
        _write_report(w.path, result, render)
        write_csv_sample(w.path / "rejects_sample.csv", rejects_sample(result.rejects))
        return w.write_manifest(rows=rows, extra=extra)
