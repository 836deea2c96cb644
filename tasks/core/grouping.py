"""Split grouping shared by every kind: rows that must stay together form a group, groups are
assigned to train / validation / test by a seeded, stratified draw, and the split stage's stored tail.

A kind decides what a group is (text: the same normalised sentence; images: identical pixels) and
hands :func:`assign_groups` one group id and label code per row.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.core.store import ArtifactStore, StageKey, StageRef

STAGE = "split"
SPLITS = ("train", "validation", "test")
# split codes in the assignment array
TRAIN, VALIDATION, TEST = 0, 1, 2


@dataclass
class SplitResult:
    """Outcome of :func:`split_tables`: the three splits, the rejected rows and what happened."""

    train: pa.Table
    validation: pa.Table
    test: pa.Table
    rejects: pa.Table
    warnings: list[str] = field(default_factory=list)
    groups: int = 0


def _round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))


def assign_groups(
    group_label: np.ndarray,
    group_size: np.ndarray,
    fractions: tuple[float, ...],
    seed: int,
    label_names: list[str] | None = None,
) -> tuple[np.ndarray, list[str]]:
    """Assign groups to splits, stratified by label.

    ``group_label[g]`` is the label code of group ``g`` (groups in a canonical order),
    ``group_size[g]`` its row count, ``fractions`` the held-out fractions in split-code order
    (validation, then test when there is one). Returns the split code of every group
    (0 train, 1 validation, 2 test) and warnings for labels too small to stratify (those stay in
    train). Each held-out split gets at least one group of every label that can be stratified, and
    train always keeps at least one.
    """
    rng = np.random.default_rng(seed)
    assignment = np.full(len(group_label), TRAIN, dtype=np.int8)
    warnings: list[str] = []
    n_splits = 1 + len(fractions)
    for code in np.unique(group_label):
        members = np.flatnonzero(group_label == code)
        name = label_names[code] if label_names is not None else str(code)
        if len(members) < n_splits:
            warnings.append(
                f"label {name!r} has only {len(members)} distinct text(s): kept in train, not stratified"
            )
            continue
        order = members[rng.permutation(len(members))]
        sizes = group_size[order]
        total = int(sizes.sum())
        start = 0
        for split_code, frac in enumerate(fractions, start=1):
            target = max(1, _round_half_up(frac * total))
            taken_before = np.cumsum(sizes[start:]) - sizes[start:]
            take = int(np.count_nonzero(taken_before < target))
            # leave at least one group for every later split and for train
            remaining_splits = n_splits - split_code
            take = max(1, min(take, len(order) - start - remaining_splits))
            assignment[order[start : start + take]] = split_code
            start += take
    return assignment, warnings


def majority_label(gid: np.ndarray, lab: np.ndarray, n_groups: int, n_labels: int) -> np.ndarray:
    """Most frequent label code per group (ties: the smallest code)."""
    pair = gid.astype(np.int64) * n_labels + lab
    uniq, counts = np.unique(pair, return_counts=True)
    g, l = uniq // n_labels, uniq % n_labels
    # sort by group, then count descending, then label ascending: first row per group wins
    order = np.lexsort((l, -counts, g))
    g, l = g[order], l[order]
    first = np.ones(len(g), dtype=bool)
    first[1:] = g[1:] != g[:-1]
    out = np.empty(n_groups, dtype=np.int64)
    out[g[first]] = l[first]
    return out


def label_counts(table: pa.Table) -> dict[str, int]:
    """Rows per label, sorted by label."""
    counts = pc.value_counts(table.column("label")).to_pylist() if table.num_rows else []
    return {c["values"]: int(c["counts"]) for c in sorted(counts, key=lambda c: c["values"])}


def store_result(
    result: SplitResult, train_in: pa.Table, test_in: pa.Table | None, key: StageKey, store: ArtifactStore,
    extra: dict | None = None,
) -> StageRef:
    """The tail shared by the text and image split stages: row accounting, statistics, stored output."""
    n_input = train_in.num_rows + (test_in.num_rows if test_in is not None else 0)
    rows = {
        "input": n_input,
        "train": result.train.num_rows,
        "validation": result.validation.num_rows,
        "test": result.test.num_rows,
        "rejected": result.rejects.num_rows,
    }
    if rows["train"] + rows["validation"] + rows["test"] + rows["rejected"] != n_input:  # pragma: no cover
        raise RuntimeError(f"{STAGE}: row accounting broken: {rows}")
    counts = {name: label_counts(getattr(result, name)) for name in SPLITS}
    train_labels = sorted(counts["train"])
    metrics: dict[str, float] = {f"rows_{k}": float(v) for k, v in rows.items()}
    metrics["leaked_rows"] = float(result.rejects.num_rows)
    metrics["groups"] = float(result.groups)
    metrics["num_labels"] = float(len(train_labels))
    n_pool = rows["train"] + rows["validation"] + (rows["test"] if test_in is None else 0)
    metrics["validation_fraction"] = rows["validation"] / n_pool if n_pool else 0.0
    if test_in is None:
        metrics["test_fraction"] = rows["test"] / n_pool if n_pool else 0.0
    stats = {"rows": rows, "label_counts": counts, "warnings": result.warnings, "groups": result.groups}
    extra = {
        "labels": train_labels,
        "label_counts": counts,
        "test_source": "file" if test_in is not None else "split",
        "warnings": result.warnings,
        "metrics": metrics,
        "log_files": ["split_stats.json", "rejects.parquet"],
        **(extra or {}),
    }
    with store.writer(key) as w:
        w.write_table("train.parquet", result.train)
        w.write_table("validation.parquet", result.validation)
        w.write_table("test.parquet", result.test)
        w.write_table("rejects.parquet", result.rejects)
        w.write_json("split_stats.json", stats)
        return w.write_manifest(rows=rows, extra=extra)
