"""Clean stage for image recipes: drop blank, conflicting and duplicate images into rejects with reasons.

Input: the validate output (``train.parquet``, optional ``test.parquet``). Per split, in this order:

* blank: an image with a single grey level holds no digit (an empty or corrupt scan):
  ``"blank image (every pixel is 0)"``; always dropped;
* conflicts (``clean.drop_conflicts``): every row whose identical image appears with more than one
  label: ``"conflicting labels: same image as <first id> labelled 3, 5"``;
* duplicates (``clean.dedupe``): a row with the same pixels and label as an earlier row, keeping
  the first: ``"duplicate of <first id>"``.

Output: ``train.parquet`` / ``test.parquet`` (the kept rows, order kept), ``rejects.parquet``
(``id, split, reason, label, pixels``, so a rejected image can be looked at), ``clean_report.json``,
``rejects_sample.csv`` and ``rejects_sample.png``. Rows in = rows out + rows rejected, per split.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa

from tasks.core.checks import codes, conflict_mask, duplicate_mask
from tasks.core.cleaning import CleanResult, store_result
from tasks.core.rejects import metric_name, reason_kind
from tasks.core.rejects import rejects_schema as core_rejects_schema
from tasks.core.store import ArtifactStore, StageRef, read_splits, stage_key
from tasks.vision import images
from tasks.vision.config import ImageCleanConfig as CleanConfig
from tasks.vision.config import ImageRecipe
from tasks.vision.validate import blank_mask

STAGE = "clean"
SAMPLE_PNG = "rejects_sample.png"


def rejects_schema(n_pixels: int) -> pa.Schema:
    return core_rejects_schema(("label", pa.string()), ("pixels", images.pixels_type(n_pixels)))


def image_reasons(pixels: np.ndarray, ids: list[str], labels: list[str], cfg: CleanConfig) -> list[str | None]:
    """Why each row is dropped (None: kept), by the rules of the module docstring."""
    n = len(pixels)
    reasons: list[str | None] = [None] * n
    if n == 0:
        return reasons
    blank = blank_mask(pixels)
    keys, first_of_key = images.image_keys(pixels)
    label_codes, _ = codes(pa.array(labels, pa.string()))
    conflict = conflict_mask(keys, label_codes) if cfg.drop_conflicts else np.zeros(n, dtype=bool)
    duplicate, first_of_row = duplicate_mask(keys, label_codes) if cfg.dedupe else (np.zeros(n, bool), None)
    conflict_labels: dict[int, str] = {}
    for i in np.flatnonzero(conflict):
        if int(keys[i]) not in conflict_labels:
            same = np.flatnonzero(keys == keys[i])
            conflict_labels[int(keys[i])] = ", ".join(sorted({labels[j] for j in same}))
    for i in range(n):
        if blank[i]:
            reasons[i] = f"blank image (every pixel is {int(pixels[i, 0])})"
        elif conflict[i]:
            reasons[i] = (f"conflicting labels: same image as {ids[first_of_key[keys[i]]]} "
                          f"labelled {conflict_labels[int(keys[i])]}")
        elif duplicate[i]:
            reasons[i] = f"duplicate of {ids[first_of_row[i]]}"
    return reasons


def clean_table(table: pa.Table, cfg: CleanConfig, split: str = "train") -> CleanResult:
    """Drop blank, conflicting and duplicate images of one canonical split (see module docstring)."""
    table = table.select(["id", "pixels", "label"]).combine_chunks()
    n_pixels = table.schema.field("pixels").type.list_size
    pixels = images.to_numpy(table.column("pixels"))
    ids, labels = table.column("id").to_pylist(), table.column("label").to_pylist()
    reasons = image_reasons(pixels, ids, labels, cfg)
    dropped = np.array([r is not None for r in reasons], dtype=bool)
    rejected = table.filter(pa.array(dropped))
    rejects = pa.Table.from_arrays(
        [rejected.column("id"), pa.array([split] * rejected.num_rows, pa.string()),
         pa.array([r for r in reasons if r is not None], pa.string()), rejected.column("label"),
         rejected.column("pixels")],
        schema=rejects_schema(n_pixels),
    )
    stats = {"rows_input": table.num_rows, "rows_kept": int((~dropped).sum()), "rows_rejected": int(dropped.sum())}
    for kind, count in Counter(reason_kind(r) for r in reasons if r is not None).items():
        stats[f"rejected.{metric_name(kind)}"] = count
    return CleanResult(table.filter(pa.array(~dropped)), rejects, stats)


def _rejected_images_png(directory: Path, sample: pa.Table, image_shape: list[int]) -> list[str]:
    """A grid of the first rejected images (id, reason) beside the CSV sample; returns its file name."""
    shown = sample.slice(0, 36)
    labels = [f"{images.short_id(i)}\n{reason_kind(r)}"
              for i, r in zip(shown.column("id").to_pylist(), shown.column("reason").to_pylist())]
    images.grid_png(images.to_numpy(shown.column("pixels")), image_shape, labels, directory / SAMPLE_PNG,
                    "rejected images (id, reason)")
    return [SAMPLE_PNG]


def run(recipe: ImageRecipe, validated: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Clean the validated images (cached by fingerprint); rows in = rows out + rejected."""
    start = time.perf_counter()
    config = {"dedupe": recipe.clean.dedupe, "drop_conflicts": recipe.clean.drop_conflicts}
    key = stage_key(STAGE, config, [validated.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit

    splits = read_splits(validated)
    results = {split: clean_table(table, recipe.clean, split) for split, table in splits.items()}
    image_shape = validated.extra["image_shape"]
    return store_result(
        results, splits, validated, key, store, started=start,
        extra={"image_shape": image_shape},
        write_more=lambda directory, sample: _rejected_images_png(directory, sample, image_shape),
    )
