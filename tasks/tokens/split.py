"""Split stage (tokens): seeded, stratified, leakage-free train / validation (/ test) split.

Sentences with the same normalised tokens (:func:`tasks.tokens.validate.normalised_key`) form one
group and never straddle two splits; train sentences that also occur in a given test file are
rejected (``"leaks into test: same normalised tokens as <id>"``). Groups are stratified by the entity
types they hold: each sentence's stratum is its rarest type (by train count), or ``O`` when it has
no entity, so every type reaches validation (and test) in proportion. The draw is
:func:`tasks.core.grouping.assign_groups`, seeded by ``split.seed``, on groups in key order.

Run alone: part of ``python -m flows.prepare_data --config configs/wnut17.yaml``.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa

from tasks.core.grouping import SPLITS, TEST, TRAIN, VALIDATION, assign_groups
from tasks.core.store import ArtifactStore, DataError, StageRef, read_splits, stage_key
from tasks.tokens.config import TokenRecipe
from tasks.tokens.ingest import REJECTS_SCHEMA
from tasks.tokens.tags import entity_spans, entity_types
from tasks.tokens.validate import normalised_key

STAGE = "split"


def strata(tags: list[list[str]]) -> list[str]:
    """Each sentence's stratum: its rarest entity type by count over ``tags``, else ``O``."""
    counts = Counter(t for s in tags for t in entity_types(s))
    return [min(entity_types(s), key=lambda t: (counts[t], t)) if entity_types(s) else "O" for s in tags]


def split_tables(train: pa.Table, test: pa.Table | None, validation_fraction: float, test_fraction: float,
                 seed: int) -> tuple[dict[str, pa.Table], pa.Table, list[str], int]:
    """(splits, rejects, warnings, groups) as the module docstring says."""
    keys = [normalised_key(t) for t in train.column("tokens").to_pylist()]
    rejects = pa.Table.from_batches([], schema=REJECTS_SCHEMA)
    if test is not None:
        test_ids = test.column("id").to_pylist()
        first_test: dict[str, str] = {}
        for key, tid in zip((normalised_key(t) for t in test.column("tokens").to_pylist()), test_ids):
            first_test.setdefault(key, tid)
        leaked = [i for i, k in enumerate(keys) if k in first_test]
        if leaked:
            bad = train.take(pa.array(leaked, pa.int64()))
            rejects = pa.table({"id": bad.column("id"), "split": pa.array(["train"] * len(leaked), pa.string()),
                                "reason": pa.array([f"leaks into test: same normalised tokens as {first_test[keys[i]]}" for i in leaked], pa.string()),
                                "tokens": bad.column("tokens"), "tags": bad.column("tags"),
                                "raw": pa.nulls(len(leaked), pa.string())}, schema=REJECTS_SCHEMA)
            keep = sorted(set(range(len(keys))) - set(leaked))
            train = train.take(pa.array(keep, pa.int64()))
            keys = [keys[i] for i in keep]
        fractions: tuple[float, ...] = (validation_fraction,)
    else:
        fractions = (validation_fraction, test_fraction)
    if train.num_rows == 0:
        raise DataError("train.parquet: no sentences left to split")
    distinct = sorted(set(keys))
    group_of = {k: g for g, k in enumerate(distinct)}
    gid = np.asarray([group_of[k] for k in keys], np.int64)
    row_stratum = strata(train.column("tags").to_pylist())
    names = sorted(set(row_stratum))
    group_label = np.zeros(len(distinct), np.int64)
    for g, s in zip(gid, row_stratum):  # a group's stratum: that of its first sentence (members share tokens)
        group_label[g] = names.index(s)
    group_size = np.bincount(gid, minlength=len(distinct))
    assignment, warnings = assign_groups(group_label, group_size, fractions, seed, names)
    row_split = assignment[gid]
    parts = {name: train.take(pa.array(np.flatnonzero(row_split == code), pa.int64()))
             for name, code in (("train", TRAIN), ("validation", VALIDATION), ("test", TEST))}
    if test is not None:
        parts["test"] = test
    return parts, rejects, warnings, len(distinct)


def run(recipe: TokenRecipe, cleaned: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Split the cleaned sentences (cached by fingerprint)."""
    cfg = recipe.split
    key = stage_key(STAGE, cfg.model_dump(mode="json"), [cleaned.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    splits = read_splits(cleaned)
    train_in, test_in = splits["train"], splits.get("test")
    parts, rejects, warnings, groups = split_tables(train_in, test_in, cfg.validation_fraction, cfg.test_fraction, cfg.seed)
    n_input = train_in.num_rows + (test_in.num_rows if test_in is not None else 0)
    rows = {"input": n_input, **{s: parts[s].num_rows for s in SPLITS}, "rejected": rejects.num_rows}
    if sum(rows[s] for s in SPLITS) + rows["rejected"] != n_input:  # pragma: no cover - invariant
        raise RuntimeError(f"{STAGE}: row accounting broken: {rows}")
    counts = {s: dict(sorted(Counter(k for t in parts[s].column("tags").to_pylist() for k, _, _ in entity_spans(t)).items()))
              for s in SPLITS}
    metrics = {f"rows_{k}": float(v) for k, v in rows.items()}
    metrics.update({"leaked_rows": float(rejects.num_rows), "groups": float(groups)})
    metrics.update({f"{s}.entities": float(sum(c.values())) for s, c in counts.items()})
    with store.writer(key) as w:
        for s in SPLITS:
            w.write_table(f"{s}.parquet", parts[s])
        w.write_table("rejects.parquet", rejects)
        w.write_json("split_stats.json", {"rows": rows, "entity_counts": counts, "warnings": warnings, "groups": groups})
        return w.write_manifest(rows=rows, extra={
            "labels": sorted(counts["train"]), "label_counts": counts, "warnings": warnings, "metrics": metrics,
            "test_source": "file" if test_in is not None else "split", "log_files": ["split_stats.json", "rejects.parquet"]})
