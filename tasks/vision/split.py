"""Split stage for image recipes: seeded, stratified, leakage-free train / validation (/ test) split.

Input: the clean output (``train.parquet``, optional ``test.parquet``). The validation split is a
``split.validation_fraction`` slice of train; without a test file a ``split.test_fraction`` slice
becomes the test split too. The official test file, when there is one, is kept whole.

Identical images form one group that is never divided between splits (they only exist when
``clean.dedupe`` is off), and a train image identical to a test image is rejected (``"leaks into
test: same image as <test id>"``). Groups are numbered in the byte order of their pixels and drawn
per label with :func:`tasks.core.grouping.assign_groups` (a seeded :class:`numpy.random.Generator`), so the
split depends on the set of images and the seed, not on the input order.

Output: ``train.parquet``, ``validation.parquet``, ``test.parquet``, ``rejects.parquet``, ``split_stats.json``.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from tasks.core import grouping
from tasks.core.config import SplitConfig
from tasks.core.grouping import TEST, TRAIN, VALIDATION, SplitResult, assign_groups
from tasks.core.rejects import rejects_schema
from tasks.core.store import ArtifactStore, DataError, StageRef, read_splits, stage_key
from tasks.vision import images
from tasks.vision.config import ImageRecipe

STAGE = "split"
SPLITS = ("train", "validation", "test")
REJECTS_SCHEMA = rejects_schema(("label", pa.string()))


def group_labels(keys: np.ndarray, label_codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Label code of each group: its most frequent label (ties: the smallest code)."""
    counts = np.zeros((n_groups, int(label_codes.max()) + 1), dtype=np.int64)
    np.add.at(counts, (keys, label_codes), 1)
    return counts.argmax(axis=1)


def split_tables(train: pa.Table, test: pa.Table | None, cfg: SplitConfig) -> SplitResult:
    """Split ``train`` (rejecting its images that also occur in ``test``) as the module docstring says."""
    train = train.select(["id", "pixels", "label"]).combine_chunks()
    rejects = pa.Table.from_batches([], schema=REJECTS_SCHEMA)
    if test is not None:
        test = test.select(["id", "pixels", "label"]).combine_chunks()
        leaked, match = images.shared_images(images.to_numpy(train.column("pixels")),
                                             images.to_numpy(test.column("pixels")))
        if leaked.any():
            test_ids = test.column("id").to_pylist()
            bad = train.filter(pa.array(leaked))
            rejects = pa.table({
                "id": bad.column("id"),
                "split": pa.array(["train"] * bad.num_rows, pa.string()),
                "reason": pa.array([f"leaks into test: same image as {test_ids[j]}" for j in match[leaked]], pa.string()),
                "label": bad.column("label"),
            }, schema=REJECTS_SCHEMA)
            train = train.filter(pa.array(~leaked))
        fractions: tuple[float, ...] = (cfg.validation_fraction,)
    else:
        fractions = (cfg.validation_fraction, cfg.test_fraction)
    if train.num_rows == 0:
        raise DataError(f"{STAGE}: train.parquet: no rows left to split")

    keys, _ = images.image_keys(images.to_numpy(train.column("pixels")))
    names, label_codes = np.unique(np.asarray(train.column("label").to_pylist(), dtype=str), return_inverse=True)
    label_names = [str(name) for name in names]
    label_codes = label_codes.reshape(-1).astype(np.int64)
    n_groups = int(keys.max()) + 1
    group_size = np.bincount(keys, minlength=n_groups)
    group_split, warnings = assign_groups(group_labels(keys, label_codes, n_groups), group_size, fractions, cfg.seed,
                                          label_names)
    row_split = group_split[keys]
    if test is not None:
        unseen = sorted(set(test.column("label").to_pylist()) - set(label_names))
        if unseen:
            warnings.append(f"test labels never seen in train: {unseen}")
    parts = {code: train.filter(pa.array(row_split == code)) for code in (TRAIN, VALIDATION, TEST)}
    return SplitResult(train=parts[TRAIN], validation=parts[VALIDATION],
                       test=test if test is not None else parts[TEST], rejects=rejects, warnings=warnings,
                       groups=n_groups)


def run(recipe: ImageRecipe, cleaned: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Split the cleaned images into train / validation / test (cached by fingerprint)."""
    config = recipe.split.model_dump(mode="json")
    key = stage_key(STAGE, config, [cleaned.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit

    splits = read_splits(cleaned)
    train_in, test_in = splits["train"], splits.get("test")
    result = split_tables(train_in, test_in, recipe.split)
    return grouping.store_result(result, train_in, test_in, key, store,
                                   extra={"image_shape": cleaned.extra["image_shape"]})
