"""The clean stage's stored tail, shared by every kind: row accounting, lost-label warnings,
metrics, ``clean_report.json``, the rejects and their sample, and the stored output."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tasks.core.rejects import (
    metric_name,
    reason_kind,
    rejects_sample,
    write_csv_sample,
)
from tasks.core.store import ArtifactStore, StageKey, StageRef

STAGE = "clean"
REPORT = "clean_report.json"


@dataclass
class CleanResult:
    """One split after cleaning: kept rows, rejected rows and counts."""

    table: pa.Table
    rejects: pa.Table
    stats: dict[str, Any] = field(default_factory=dict)


def _label_counts(table: pa.Table) -> dict[str, int]:
    if table.num_rows == 0:
        return {}
    return dict(sorted((c["values"], int(c["counts"])) for c in pc.value_counts(table.column("label")).to_pylist()))


def store_result(
    results: dict[str, CleanResult],
    splits: dict[str, pa.Table],
    validated: StageRef,
    key: StageKey,
    store: ArtifactStore,
    *,
    started: float,
    extra: dict[str, Any] | None = None,
    write_more: Callable[[Path, pa.Table], list[str]] | None = None,
    count_labels: Callable[[pa.Table], dict[str, int]] | None = None,
    lost_warning: str = "train: label {!r} has no rows left after cleaning",
    counts_name: str = "label_counts",
) -> StageRef:
    """The end of the clean stage, for every kind: row accounting, lost-label warnings, metrics,
    ``clean_report.json``, the rejects and their sample, and the stored output.

    ``results`` are the cleaned ``splits``; ``write_more(directory, rejects_sample)`` writes a
    modality's own files (the image stage's picture of rejected images) and returns their names;
    ``count_labels(table)`` counts a split's labels (default: its ``label`` column; tokens: entity
    types), ``lost_warning`` words the warning for a label train no longer has, and ``counts_name``
    names those counts in ``clean_report.json``.
    """
    count_labels = count_labels or _label_counts
    rejects = pa.concat_tables([r.rejects for r in results.values()]).combine_chunks()
    rows = {
        "input": sum(t.num_rows for t in splits.values()),
        "train": results["train"].table.num_rows,
        "test": results["test"].table.num_rows if "test" in results else 0,
        "rejected": rejects.num_rows,
    }
    if rows["train"] + rows["test"] + rows["rejected"] != rows["input"]:  # pragma: no cover - invariant
        raise RuntimeError(f"{STAGE}: row accounting broken: {rows}")

    by_reason = dict(Counter(reason_kind(r) for r in rejects.column("reason").to_pylist()))
    label_counts = {split: count_labels(r.table) for split, r in results.items()}
    before = validated.extra.get("labels") or sorted(count_labels(splits["train"]))
    lost = [label for label in before if not label_counts["train"].get(label)]
    warnings = [lost_warning.format(label) for label in lost]
    metrics: dict[str, float] = {
        "rows_input": rows["input"], "rows_train": rows["train"], "rows_test": rows["test"],
        "rows_rejected": rows["rejected"],
    }
    for split, r in results.items():
        for name, value in r.stats.items():
            metrics[f"{split}.{name}"] = value
    for kind, count in by_reason.items():
        metrics[f"rejected.{metric_name(kind)}"] = count
    metrics["duration_s"] = round(time.perf_counter() - started, 4)
    report = {
        "rows": rows,
        "splits": {split: r.stats for split, r in results.items()},
        "rejects_by_reason": by_reason,
        counts_name: label_counts,
        "config": key.config,
        "warnings": warnings,
    }
    with store.writer(key) as w:
        for split, r in results.items():
            w.write_table(f"{split}.parquet", r.table)
        w.write_table("rejects.parquet", rejects)
        w.write_json(REPORT, report)
        sample = rejects_sample(rejects)
        write_csv_sample(w.path / "rejects_sample.csv", sample)
        more = write_more(w.path, sample) if write_more is not None else []
        extra = {
            "metrics": {k: float(v) for k, v in metrics.items()},
            "log_files": [REPORT, "rejects_sample.csv", *more],
            "labels": sorted(label_counts["train"]),
            "label_counts": label_counts,
            "rejects_by_reason": by_reason,
            "warnings": warnings,
            "has_test": "test" in results,
            **(extra or {}),
        }
        return w.write_manifest(rows=rows, extra=extra)
