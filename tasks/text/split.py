"""Split stage: seeded, stratified, leakage-free train / validation (/ test) split.

Input: a stage directory with ``train.parquet`` and, when the recipe names a test file,
``test.parquet`` (canonical ``id, text, label`` rows, already cleaned). Output: ``train.parquet``,
``validation.parquet``, ``test.parquet`` and ``rejects.parquet``.

Leakage is judged after normalisation (:func:`tasks.text.textnorm.match_key`):

* rows of train whose normalised text also occurs in a given test file are rejected;
* rows sharing a normalised text form one *group*, and a group is never divided between splits,
  so the same sentence (up to case, punctuation and spacing) cannot sit in train and validation.

Stratification works on groups: each group carries its majority label, groups of one label are
shuffled with a seeded :class:`numpy.random.Generator` and taken in that order until the held-out
split reaches its share of that label's rows. Groups are ordered by their key before shuffling, so
the split depends on the set of rows and the seed, not on the input order or the platform.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from tasks.core.config import SplitConfig
from tasks.core.grouping import (
    TEST,
    TRAIN,
    VALIDATION,
    SplitResult,
    assign_groups,
    majority_label,
    store_result,
)
from tasks.core.rejects import rejects_schema, rejects_table
from tasks.core.store import ArtifactStore, DataError, StageRef, read_splits, stage_key
from tasks.text import textnorm
from tasks.text.config import TextRecipe

STAGE = "split"
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())])
REJECTS_SCHEMA = rejects_schema(("text", pa.string()), ("label", pa.string()))


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
                "train",
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
    group_label = majority_label(gid, lab, n_groups, len(label_names))
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


def run(recipe: TextRecipe, cleaned: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Split the cleaned data into train / validation / test (cached by fingerprint)."""
    config = recipe.split.model_dump(mode="json")
    key = stage_key(STAGE, config, [cleaned.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit

    splits = read_splits(cleaned)
    train_in, test_in = splits["train"], splits.get("test")
    result = split_tables(train_in, test_in, recipe.split)

    return store_result(result, train_in, test_in, key, store)
