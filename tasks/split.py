"""Split stage: seeded, stratified, leakage-free train / validation (/ test) split.

Input: a stage directory with ``train.parquet`` and, when the recipe names a test file,
``test.parquet`` (canonical ``id, text, label`` rows, already cleaned). Output: ``train.parquet``,
``validation.parquet``, ``test.parquet`` and ``rejects.parquet``.

Leakage is judged after normalisation (:func:`tasks.textnorm.match_key`):

* rows of train whose normalised text also occurs in a given test file are rejected;
* rows sharing a normalised text form one *group*, and a group is never divided between splits,
  so the same sentence (up to case, punctuation and spacing) cannot sit in train and validation.

Stratification works on groups: each group carries its majority label, groups of one label are
shuffled with a seeded :class:`numpy.random.Generator` and taken in that order until the held-out
split reaches its share of that label's rows. Groups are ordered by their key before shuffling, so
the split depends on the set of rows and the seed, not on the input order or the platform.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from prefect import task
from prefect.cache_policies import NONE

from tasks import textnorm
from tasks.artifacts import ArtifactStore, DataError, StageRef, fingerprint, read_splits, rejects_table, source_hash
from tasks.config import Recipe, SplitConfig
from tasks.lineage import tracked

STAGE = "split"
SPLITS = ("train", "validation", "test")
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())])
REJECTS_SCHEMA = pa.schema(
    [("id", pa.string()), ("reason", pa.string()), ("text", pa.string()), ("label", pa.string())]
)
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


def _majority_label(gid: np.ndarray, lab: np.ndarray, n_groups: int, n_labels: int) -> np.ndarray:
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


def _codes(values: pa.Array) -> tuple[np.ndarray, list[str]]:
    """Dense codes of ``values`` in sorted order of the distinct values, and those values."""
    uniq = pc.unique(values)
    uniq = uniq.take(pc.array_sort_indices(uniq))
    codes = pc.index_in(values, value_set=uniq).to_numpy(zero_copy_only=False)
    return codes.astype(np.int64), uniq.to_pylist()


def _canonical(table: pa.Table, name: str) -> pa.Table:
    missing = [c for c in SCHEMA.names if c not in table.column_names]
    if missing:
        raise DataError(f"{name}: missing column(s) {missing}; expected id, text, label")
    table = table.select(SCHEMA.names).cast(SCHEMA).combine_chunks()
    for column in SCHEMA.names:
        if table.column(column).null_count:
            raise DataError(f"{name}: column {column!r} has {table.column(column).null_count} null value(s)")
    return table


def split_tables(train: pa.Table, test: pa.Table | None, cfg: SplitConfig) -> SplitResult:
    """Split ``train`` (and reject its rows that leak into ``test``) as the module docstring says."""
    train = _canonical(train, "train.parquet")
    rejects = pa.Table.from_batches([], schema=REJECTS_SCHEMA)
    keys = textnorm.match_key(train.column("text"))

    if test is not None:
        test = _canonical(test, "test.parquet")
        test_keys = textnorm.match_key(test.column("text"))
        # first test id per key
        uniq_test_keys, first_pos = np.unique(test_keys.to_numpy(zero_copy_only=False), return_index=True)
        test_ids = test.column("id").to_numpy(zero_copy_only=False)
        found = pc.index_in(keys, value_set=pa.array(uniq_test_keys, pa.string()))
        leaked = found.is_valid().to_numpy(zero_copy_only=False)
        pos = pc.fill_null(found, -1).to_numpy(zero_copy_only=False).astype(np.int64)
        if leaked.any():
            leak_idx = np.flatnonzero(leaked)
            matched = test_ids[first_pos[pos[leak_idx]]]
            leaked_rows = train.take(pa.array(leak_idx))
            reasons = [f"leaks into test: same normalised text as {tid}" for tid in matched]
            rejects = rejects_table(
                leaked_rows.column("id").to_pylist(),
                reasons,
                {"text": leaked_rows.column("text").to_pylist(), "label": leaked_rows.column("label").to_pylist()},
            ).cast(REJECTS_SCHEMA)
            keep = pa.array(np.flatnonzero(~leaked))
            train = train.take(keep)
            keys = keys.take(keep)
        fractions: tuple[float, ...] = (cfg.validation_fraction,)
    else:
        fractions = (cfg.validation_fraction, cfg.test_fraction)

    if train.num_rows == 0:
        raise DataError("train.parquet: no rows left to split")
    gid, _ = _codes(keys)
    lab, label_names = _codes(train.column("label"))
    n_groups = int(gid.max()) + 1
    group_size = np.bincount(gid, minlength=n_groups)
    group_label = _majority_label(gid, lab, n_groups, len(label_names))
    group_split, warnings = assign_groups(group_label, group_size, fractions, cfg.seed, label_names)
    row_split = group_split[gid]

    if test is not None:
        unseen = sorted(set(pc.unique(test.column("label")).to_pylist()) - set(label_names))
        if unseen:
            warnings.append(f"test labels never seen in train: {unseen}")
    parts = {code: train.take(pa.array(np.flatnonzero(row_split == code))) for code in (TRAIN, VALIDATION, TEST)}
    return SplitResult(
        train=parts[TRAIN],
        validation=parts[VALIDATION],
        test=test if test is not None else parts[TEST],
        rejects=rejects,
        warnings=warnings,
        groups=n_groups,
    )


def label_counts(table: pa.Table) -> dict[str, int]:
    """Rows per label, sorted by label."""
    counts = pc.value_counts(table.column("label")).to_pylist() if table.num_rows else []
    return {c["values"]: int(c["counts"]) for c in sorted(counts, key=lambda c: c["values"])}


def store_result(
    result: SplitResult, train_in: pa.Table, test_in: pa.Table | None, cleaned: StageRef, store: ArtifactStore,
    *, fp: str, config: dict, code: str, extra: dict | None = None,
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
    with store.writer(STAGE, fp) as w:
        w.write_table("train.parquet", result.train)
        w.write_table("validation.parquet", result.validation)
        w.write_table("test.parquet", result.test)
        w.write_table("rejects.parquet", result.rejects)
        w.write_json("split_stats.json", stats)
        ref = w.write_manifest(config=config, inputs=[cleaned.fingerprint], code=code, rows=rows, extra=extra)
    return ref


def run(recipe: Recipe, cleaned: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Split the cleaned data into train / validation / test (cached by fingerprint)."""
    config = recipe.split.model_dump(mode="json")
    code = source_hash(textnorm, sys.modules[__name__])
    fp = fingerprint(STAGE, config, [cleaned.fingerprint], code)
    if not force and (hit := store.lookup(STAGE, fp)) is not None:
        return hit

    splits = read_splits(cleaned)
    train_in, test_in = splits["train"], splits.get("test")
    result = split_tables(train_in, test_in, recipe.split)

    return store_result(result, train_in, test_in, cleaned, store, fp=fp, config=config, code=code)


@task(name="split", cache_policy=NONE)
def split_task(recipe: Recipe, cleaned: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Seeded, stratified, leakage-free train / validation / test split."""
    if recipe.task == "image-classification":
        from tasks.vision import split as vision_split

        return tracked(run_id, STAGE, lambda store: vision_split.run(recipe, cleaned, store, force))
    return tracked(run_id, STAGE, lambda store: run(recipe, cleaned, store, force))
