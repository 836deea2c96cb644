"""Augment stage for image recipes: seeded random shifts and small rotations of the train images.

Each train image gets ``augment.copies`` copies; each copy is rotated by an angle drawn uniformly
from ``[-augment.rotate_deg, +augment.rotate_deg]`` about the image centre and shifted by whole
pixels drawn uniformly from ``[-augment.shift_px, +augment.shift_px]`` along each axis; pixels are
resampled bilinearly, what moves in from outside the frame is black (0), and values are rounded back
to uint8. Every draw comes from one :class:`numpy.random.Generator` seeded with ``augment.seed``,
so the output is a function of the input rows and the config. Validation and test are never
augmented: later stages read them from the normalize directory (``extra["source_path"]``).

Off by default (``augment.enabled``: the seed-faithful run has no augmentation); then train passes
through with ``augmented=False``. Output: ``train.parquet`` (normalize's columns plus
``augmented: bool``; originals first, then the copies with ids ``<orig id>#aug<k>``),
``augmentation_samples.png`` and an empty ``rejects.parquet``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tasks.core.rejects import rejects_schema
from tasks.core.store import ArtifactStore, StageRef, stage_key
from tasks.vision import encode as normalize
from tasks.vision import images
from tasks.vision.config import ImageAugmentConfig as AugmentConfig
from tasks.vision.config import ImageRecipe

STAGE = "augment"
SAMPLES_PNG = "augmentation_samples.png"
N_SAMPLES = 12
CHUNK = 4096
REJECTS_SCHEMA = rejects_schema(("label", pa.string()))
# facts of the normalize stage that train and evaluate need, passed through so train can read one ref
_PASSED_THROUGH = ("task", "labels", "num_labels", "mean", "std", "scale", "image_shape", "labels_file",
                   "normalization_file")


def transform(pixels: np.ndarray, angles_deg: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Rotate each (H, W) uint8 image about its centre, then shift it by whole pixels; bilinear, black outside.

    ``pixels``: (n, H, W); ``angles_deg``: (n,); ``shifts``: (n, 2) as (down, right) pixels.
    A zero angle with integer shifts moves pixels exactly, without blurring.
    """
    n, height, width = pixels.shape
    if n == 0:
        return pixels.copy()
    cy, cx = (height - 1) / 2, (width - 1) / 2
    ys, xs = np.meshgrid(np.arange(height, dtype=np.float64), np.arange(width, dtype=np.float64), indexing="ij")
    theta = np.deg2rad(angles_deg)[:, None, None]
    cos, sin = np.cos(theta), np.sin(theta)
    dy = ys[None] - cy - shifts[:, 0, None, None]  # (n, H, W): output position relative to the moved centre
    dx = xs[None] - cx - shifts[:, 1, None, None]
    src_x = cos * dx + sin * dy + cx  # inverse rotation: where each output pixel comes from
    src_y = -sin * dx + cos * dy + cy
    x0, y0 = np.floor(src_x), np.floor(src_y)
    wx, wy = src_x - x0, src_y - y0
    flat = pixels.reshape(n, -1).astype(np.float64)
    out = np.zeros((n, height, width), dtype=np.float64)
    for oy, ox, weight in ((0, 0, (1 - wy) * (1 - wx)), (0, 1, (1 - wy) * wx), (1, 0, wy * (1 - wx)), (1, 1, wy * wx)):
        yy, xx = (y0 + oy).astype(np.int64), (x0 + ox).astype(np.int64)
        inside = (yy >= 0) & (yy < height) & (xx >= 0) & (xx < width)
        index = np.where(inside, yy * width + xx, 0).reshape(n, -1)
        values = np.take_along_axis(flat, index, axis=1).reshape(n, height, width)
        out += np.where(inside, weight * values, 0.0)
    return np.clip(np.rint(out), 0, images.PIXEL_MAX).astype(np.uint8)


def augment_images(
    pixels: np.ndarray, image_shape: list[int] | tuple[int, int], cfg: AugmentConfig
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """``cfg.copies`` augmented copies of every (flat) image, copies of one source row together.

    Returns the (n * copies, H*W) uint8 copies and the draws (``source``, ``copy``, ``angle``, ``shift``).
    """
    n = len(pixels)
    rng = np.random.default_rng(cfg.seed)
    total = n * cfg.copies
    angles = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg, size=total) if cfg.rotate_deg else np.zeros(total)
    shifts = rng.integers(-cfg.shift_px, cfg.shift_px + 1, size=(total, 2)).astype(np.float64)
    source = np.repeat(np.arange(n), cfg.copies)
    height, width = (int(v) for v in image_shape)
    out = np.empty((total, height * width), dtype=np.uint8)
    for start in range(0, total, CHUNK):
        part = slice(start, start + CHUNK)
        batch = pixels[source[part]].reshape(-1, height, width)
        out[part] = transform(batch, angles[part], shifts[part]).reshape(-1, height * width)
    draws = {"source": source, "copy": np.tile(np.arange(1, cfg.copies + 1), n), "angle": angles, "shift": shifts}
    return out, draws


def _config(cfg: AugmentConfig) -> dict[str, Any]:
    # text-only knobs (p, operations) and, when disabled, every knob leave the output unchanged
    if not cfg.enabled:
        return {"enabled": False}
    return {"enabled": True, "copies": cfg.copies, "shift_px": cfg.shift_px, "rotate_deg": cfg.rotate_deg,
            "seed": cfg.seed}


def run(recipe: ImageRecipe, normalized: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Write the (augmented) train split next to the normalize output (cached by fingerprint)."""
    cfg = recipe.augment
    config = _config(cfg)
    key = stage_key(STAGE, config, [normalized.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit

    n_pixels = int(np.prod(normalized.extra["image_shape"]))
    train = pq.read_table(normalized.file("train.parquet")).select(normalize.schema(n_pixels).names).combine_chunks()
    n = train.num_rows
    originals = train.append_column("augmented", pa.array(np.zeros(n, dtype=bool)))
    image_shape = normalized.extra["image_shape"]
    metrics: dict[str, float] = {}
    samples: tuple[np.ndarray, list[str]] | None = None
    if cfg.enabled and n:
        pixels = images.to_numpy(train.column("pixels"))
        made, draws = augment_images(pixels, image_shape, cfg)
        base = train.take(pa.array(draws["source"]))
        ids = pc.binary_join_element_wise(base.column("id"), pa.array([f"#aug{k}" for k in draws["copy"]]), "")
        copies = pa.Table.from_arrays(
            [ids, images.pixels_array(made), base.column("label"), base.column("label_id"),
             pa.array(np.ones(len(made), dtype=bool))],
            schema=originals.schema,
        )
        table = pa.concat_tables([originals, copies])
        unchanged = np.all(made == pixels[draws["source"]], axis=1)
        metrics = {"unchanged_copies": float(unchanged.sum()), "mean_abs_angle": float(np.abs(draws["angle"]).mean()),
                   "mean_abs_shift": float(np.abs(draws["shift"]).mean())}
        shown = np.arange(min(N_SAMPLES, n))
        first_copy = shown * cfg.copies
        pairs = np.empty((2 * len(shown), pixels.shape[1]), dtype=np.uint8)
        pairs[0::2], pairs[1::2] = pixels[shown], made[first_copy]
        captions = []
        for i, c in zip(shown, first_copy):
            captions += [f"{images.short_id(train.column('id')[int(i)].as_py())}",
                         f"{draws['angle'][c]:+.0f}°, ({draws['shift'][c][0]:+.0f}, {draws['shift'][c][1]:+.0f})"]
        samples = (pairs, captions)
    else:
        table = originals

    n_aug = table.num_rows - n
    rows = {"input": n, "original": n, "augmented": n_aug, "train": table.num_rows, "rejected": 0}
    metrics.update({"rows_input": float(n), "rows_augmented": float(n_aug), "rows_train": float(table.num_rows)})
    extra = {
        "enabled": cfg.enabled,
        "source_path": normalized.path,
        "source_fingerprint": normalized.fingerprint,
        **{key: normalized.extra[key] for key in _PASSED_THROUGH if key in normalized.extra},
        "metrics": metrics,
        "log_files": [SAMPLES_PNG] if samples is not None else [],
    }
    with store.writer(key) as w:
        w.write_table("train.parquet", table)
        w.write_table("rejects.parquet", pa.Table.from_batches([], schema=REJECTS_SCHEMA))
        if samples is not None:
            images.grid_png(samples[0], image_shape, samples[1], w.path / SAMPLES_PNG,
                            "original | augmented (angle, (down, right) shift)", cols=6)
        ref = w.write_manifest(rows=rows, extra=extra)
    return ref
