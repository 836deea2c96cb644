"""Normalisation: mean/std measured on train, exact round trip, label ids, stored with the splits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.core.store import ArtifactStore, DataError, StageRef
from tasks.registry import recipe_from_dict
from tasks.vision import encode as normalize
from tasks.vision import images


def test_statistics_match_numpy() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(50, 784), dtype=np.uint8)
    stats = normalize.fit_normalization(pixels)
    assert stats["mean"] == pytest.approx((pixels / 255).mean(), abs=1e-12)
    assert stats["std"] == pytest.approx((pixels / 255).std(), abs=1e-12)
    x = normalize.normalize(pixels, stats["mean"], stats["std"])
    assert x.dtype == np.float32 and abs(float(x.mean())) < 1e-5 and float(x.std()) == pytest.approx(1, abs=1e-4)


def test_round_trip_is_exact() -> None:
    pixels = np.arange(256, dtype=np.uint8).repeat(4).reshape(-1, 16)
    for mean, std in ((0.1307, 0.3081), (0.5, 0.01), (0.0, 1.0)):
        back = normalize.denormalize(normalize.normalize(pixels, mean, std), mean, std)
        assert np.array_equal(back, pixels)


def test_constant_train_is_refused() -> None:
    with pytest.raises(DataError, match="std is 0"):
        normalize.fit_normalization(np.full((3, 4), 9, np.uint8))


def test_run_stores_normalization_and_label_ids(tmp_path: Path) -> None:
    folder = tmp_path / "split"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for name, n in (("train", 30), ("validation", 6), ("test", 8)):
        labels = [str(i % 3) for i in range(n)]
        if name == "test":
            labels[0] = "7"  # not in the label map
        pq.write_table(images.table([f"{name}:#{i}" for i in range(n)], rng.integers(0, 256, (n, 4), np.uint8), labels),
                       folder / f"{name}.parquet")
    split_ref = StageRef(stage="split", fingerprint="b" * 64, path=str(folder), extra={"image_shape": [2, 2]})
    recipe = recipe_from_dict({"name": "d", "task": "image-classification", "data": {"train_path": "x"}})
    ref = normalize.run(recipe, split_ref, ArtifactStore(tmp_path / "artifacts"))
    assert ref.rows == {"input": 44, "train": 30, "validation": 6, "test": 7, "rejected": 1}
    train = pq.read_table(folder / "train.parquet")
    expected = normalize.fit_normalization(images.to_numpy(train.column("pixels")))
    stored = normalize.load_normalization(ref)
    assert stored["mean"] == ref.extra["mean"] == expected["mean"] and stored["image_shape"] == [2, 2]
    out = pq.read_table(ref.file("train.parquet"))
    assert out.column("label_id").to_pylist() == [i % 3 for i in range(30)]
    assert ref.extra["labels"] == ["0", "1", "2"]
    assert "not in the label map" in pq.read_table(ref.file("rejects.parquet")).column("reason")[0].as_py()
