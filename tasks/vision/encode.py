"""Encode stage for image recipes: label map and pixel normalisation (mean/std).

What the tokenizer is to text, normalisation is to pixels: fitted on the train split only and
shipped inside the model bundle, so training, evaluation and serving transform pixels identically::

    x = (pixels / 255 - mean) / std        # normalize();  denormalize() inverts it

``mean`` and ``std`` are one value each over every pixel of the train split (the usual MNIST
``Normalize((0.1307,), (0.3081,))``, here measured rather than typed in). The stored splits keep
the raw uint8 pixels (a quarter of the size of floats); consumers apply :func:`normalize`.

Output: ``labels.json`` (index -> label), ``normalization.json`` (``mean``, ``std``, ``scale``,
``image_shape``), ``train/validation/test.parquet`` with ``id, pixels, label, label_id``,
``pixel_stats.json`` and ``rejects.parquet`` (rows whose label is not in the label map).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.labels import label_ids, label_map
from tasks.core.rejects import rejects_schema, rejects_table
from tasks.core.store import ArtifactStore, DataError, StageRef, stage_key
from tasks.vision import images
from tasks.vision.config import ImageRecipe

STAGE = "encode"
SPLITS = ("train", "validation", "test")
LABELS_FILE = "labels.json"
NORMALIZATION_FILE = "normalization.json"
REJECTS_SCHEMA = rejects_schema(("label", pa.string()))
METHOD = "one mean and std of pixels/255 over every train pixel"


def schema(n_pixels: int) -> pa.Schema:
    """Columns of the normalised splits: the canonical ones plus the label's index."""
    return images.schema(n_pixels).append(pa.field("label_id", pa.int32()))


def fit_normalization(pixels: np.ndarray) -> dict[str, float]:
    """Mean and (population) std of ``pixels / 255``, exact, from the 256-bin histogram."""
    if pixels.size == 0:
        raise DataError(f"{STAGE}: the train split is empty: nothing to measure mean and std on")
    counts = np.bincount(np.asarray(pixels, dtype=np.uint8).reshape(-1), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / images.PIXEL_MAX
    total = counts.sum()
    mean = float((counts * values).sum() / total)
    std = float(np.sqrt((counts * (values - mean) ** 2).sum() / total))
    if std == 0.0:
        raise DataError(f"{STAGE}: every train pixel has the same value: std is 0, nothing to learn from")
    return {"mean": mean, "std": std, "scale": float(images.PIXEL_MAX)}


def normalize(pixels: np.ndarray, mean: float, std: float) -> np.ndarray:
    """uint8 pixels (any shape) -> float32 ``(pixels / 255 - mean) / std``."""
    x = np.asarray(pixels, dtype=np.float32) / np.float32(images.PIXEL_MAX)
    return (x - np.float32(mean)) / np.float32(std)


def denormalize(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    """Inverse of :func:`normalize`, rounded back to uint8 pixels."""
    pixels = (np.asarray(x, dtype=np.float64) * std + mean) * images.PIXEL_MAX
    return np.clip(np.rint(pixels), 0, images.PIXEL_MAX).astype(np.uint8)


def with_label_ids(table: pa.Table, mapping: list[str], split: str = "train") -> tuple[pa.Table, pa.Table]:
    """(rows with their ``label_id``, rejected rows whose label is not in ``mapping``)."""
    table = table.select(["id", "pixels", "label"]).combine_chunks()
    ids = label_ids(table.column("label"), mapping)
    known = ids.is_valid()
    bad = table.filter(pc.invert(known))
    rejects = rejects_table(
        bad.column("id").to_pylist(),
        [f"label {label!r} is not in the label map {mapping}" for label in bad.column("label").to_pylist()],
        {"label": bad.column("label").to_pylist()}, split,
    ).cast(REJECTS_SCHEMA)
    kept = table.filter(known)
    n_pixels = table.schema.field("pixels").type.list_size
    out = pa.Table.from_arrays([kept.column("id"), kept.column("pixels"), kept.column("label"), ids.filter(known)],
                               schema=schema(n_pixels))
    return out, rejects


def load_normalization(ref: StageRef) -> dict[str, Any]:
    """``normalization.json`` of a normalize (or train) stage directory."""
    return json.loads(ref.file(NORMALIZATION_FILE).read_text())


def run(recipe: ImageRecipe, split_ref: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Fit the label map and mean/std on the train split; add ``label_id`` to every split (cached)."""
    config = {"labels": recipe.data.labels, "method": METHOD}
    key = stage_key(STAGE, config, [split_ref.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit

    tables = {name: pq.read_table(split_ref.file(f"{name}.parquet")) for name in SPLITS}
    train_pixels = images.to_numpy(tables["train"].column("pixels"))
    stats = fit_normalization(train_pixels)
    image_shape = list(split_ref.extra["image_shape"])
    normalization = {**stats, "image_shape": image_shape, "method": METHOD}
    mapping = label_map(tables["train"].column("label").to_pylist(), recipe.data.labels)
    encoded, rejected = {}, []
    for name in SPLITS:
        encoded[name], rej = with_label_ids(tables[name], mapping, name)
        rejected.append(rej)
    rejects = pa.concat_tables(rejected)
    n_input = sum(t.num_rows for t in tables.values())
    rows = {"input": n_input, **{name: encoded[name].num_rows for name in SPLITS}, "rejected": rejects.num_rows}
    if sum(rows[name] for name in SPLITS) + rows["rejected"] != n_input:  # pragma: no cover
        raise RuntimeError(f"{STAGE}: row accounting broken: {rows}")

    pixel_stats = {}
    for name in SPLITS:
        pixels = images.to_numpy(encoded[name].column("pixels"))
        x = normalize(pixels, stats["mean"], stats["std"]) if len(pixels) else np.zeros(1, np.float32)
        pixel_stats[name] = {"normalized_mean": float(x.mean()), "normalized_std": float(x.std())}
    metrics = {"mean": stats["mean"], "std": stats["std"], "num_labels": float(len(mapping)),
               "rows_rejected": float(rows["rejected"]),
               **{f"{name}_normalized_mean": s["normalized_mean"] for name, s in pixel_stats.items()},
               **{f"{name}_normalized_std": s["normalized_std"] for name, s in pixel_stats.items()}}
    extra = {
        "labels": mapping,
        "num_labels": len(mapping),
        "mean": stats["mean"],
        "std": stats["std"],
        "scale": stats["scale"],
        "image_shape": image_shape,
        "labels_file": LABELS_FILE,
        "normalization_file": NORMALIZATION_FILE,
        "metrics": metrics,
        "log_files": [LABELS_FILE, NORMALIZATION_FILE, "pixel_stats.json"],
    }
    with store.writer(key) as w:
        w.write_json(LABELS_FILE, mapping)
        w.write_json(NORMALIZATION_FILE, normalization)
        for name in SPLITS:
            w.write_table(f"{name}.parquet", encoded[name])
        w.write_table("rejects.parquet", rejects)
        w.write_json("pixel_stats.json", {"rows": rows, "normalization": normalization, "splits": pixel_stats})
        ref = w.write_manifest(rows=rows, extra=extra)
    return ref
