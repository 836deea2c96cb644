"""Image augmentation: exact integer shifts, rotations, seeded determinism, train only, off by default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.store import ArtifactStore, StageRef
from tasks.registry import recipe_from_dict
from tasks.vision import augment, images
from tasks.vision import encode as normalize
from tasks.vision.config import ImageAugmentConfig as AugmentConfig


def test_integer_shift_is_exact_and_fills_black() -> None:
    image = np.zeros((1, 6, 6), np.uint8)
    image[0, 2, 3] = 200
    moved = augment.transform(image, np.array([0.0]), np.array([[1.0, -2.0]]))
    expected = np.zeros((6, 6), np.uint8)
    expected[3, 1] = 200
    assert np.array_equal(moved[0], expected)
    gone = augment.transform(image, np.array([0.0]), np.array([[0.0, 5.0]]))
    assert gone.sum() == 0


def test_rotation_keeps_the_centre_and_turns_a_bar() -> None:
    image = np.zeros((1, 9, 9), np.uint8)
    image[0, 4, :] = 255  # horizontal bar through the centre
    turned = augment.transform(image, np.array([90.0]), np.zeros((1, 2)))[0]
    assert turned[4, 4] == 255
    assert turned[:, 4].min() > 200 and turned[4, 0] == 0  # now vertical
    assert np.array_equal(augment.transform(image, np.array([0.0]), np.zeros((1, 2))), image)


def test_seeded_and_bounded() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (20, 784), np.uint8)
    cfg = AugmentConfig(enabled=True, copies=2, shift_px=2, rotate_deg=10, seed=5)
    a, draws = augment.augment_images(pixels, (28, 28), cfg)
    b, _ = augment.augment_images(pixels, (28, 28), cfg)
    c, _ = augment.augment_images(pixels, (28, 28), cfg.model_copy(update={"seed": 6}))
    assert a.shape == (40, 784) and np.array_equal(a, b) and not np.array_equal(a, c)
    assert draws["source"].tolist() == np.repeat(np.arange(20), 2).tolist()
    assert np.abs(draws["angle"]).max() <= 10 and set(np.unique(draws["shift"])) <= {-2, -1, 0, 1, 2}


def _normalized(tmp_path: Path) -> StageRef:
    folder = tmp_path / "normalize"
    folder.mkdir()
    rng = np.random.default_rng(2)
    t = images.table([f"train:#{i}" for i in range(10)], rng.integers(0, 256, (10, 784), np.uint8),
                     [str(i % 2) for i in range(10)])
    t = t.append_column("label_id", pa.array([i % 2 for i in range(10)], pa.int32()))
    pq.write_table(t, folder / "train.parquet")
    return StageRef(stage="normalize", fingerprint="c" * 64, path=str(folder),
                    extra={"image_shape": [28, 28], "labels": ["0", "1"], "mean": 0.5, "std": 0.3, "task": "image-classification"})


def test_run_off_by_default_and_on(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    base = {"name": "d", "task": "image-classification", "data": {"train_path": "x"}}
    normalized = _normalized(tmp_path)
    off = augment.run(recipe_from_dict(base), normalized, store)
    assert off.rows["train"] == 10 and off.rows["augmented"] == 0 and off.extra["mean"] == 0.5
    assert pq.read_table(off.file("train.parquet")).column("augmented").to_pylist() == [False] * 10
    on = augment.run(recipe_from_dict({**base, "augment": {"enabled": True, "copies": 2}}), normalized, store)
    table = pq.read_table(on.file("train.parquet"))
    assert table.num_rows == 30 and table.column("id")[10].as_py() == "train:#0#aug1"
    assert table.column("label_id").to_pylist()[10:12] == [0, 0]
    assert table.schema.names == [*normalize.schema(784).names, "augmented"]
    assert on.file("augmentation_samples.png").exists() and on.extra["source_path"] == normalized.path
    again = augment.run(recipe_from_dict({**base, "augment": {"enabled": True, "copies": 2}}), normalized, store)
    assert again.cache_hit and again.fingerprint == on.fingerprint
