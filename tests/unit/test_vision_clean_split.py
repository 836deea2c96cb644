"""Image clean and split: rejects with reasons, rows accounted for, seeded stratified leakage-free split."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from tasks.core.config import SplitConfig
from tasks.core.store import ArtifactStore, StageRef
from tasks.registry import recipe_from_dict
from tasks.vision import clean, images, split
from tasks.vision.config import ImageCleanConfig as CleanConfig


def table(pixels: np.ndarray, labels: list[str], prefix: str = "train"):
    return images.table([f"{prefix}:#{i}" for i in range(len(labels))], pixels, labels)


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 16), dtype=np.uint8), [str(i % 4) for i in range(n)]


def test_clean_drops_blank_conflicts_and_duplicates_with_reasons() -> None:
    pixels, labels = digits(12)
    pixels[3] = pixels[1]  # duplicate of #1 (same label: 1 vs 3 -> set below)
    labels[3] = labels[1]
    pixels[5] = pixels[1]  # a third copy of #1's image, other label: conflict for #1, #3, #5
    labels[5] = "2"
    pixels[7] = pixels[6]  # plain duplicate of #6
    labels[7] = labels[6]
    pixels[9] = 0  # blank
    result = clean.clean_table(table(pixels, labels), CleanConfig())
    reasons = dict(zip(result.rejects.column("id").to_pylist(), result.rejects.column("reason").to_pylist()))
    assert reasons == {
        "train:#1": "conflicting labels: same image as train:#1 labelled 1, 2",
        "train:#3": "conflicting labels: same image as train:#1 labelled 1, 2",
        "train:#5": "conflicting labels: same image as train:#1 labelled 1, 2",
        "train:#7": "duplicate of train:#6",
        "train:#9": "blank image (every pixel is 0)",
    }
    assert result.table.num_rows + result.rejects.num_rows == 12
    assert result.table.column("id").to_pylist() == [f"train:#{i}" for i in (0, 2, 4, 6, 8, 10, 11)]
    assert np.array_equal(images.to_numpy(result.rejects.column("pixels"))[-1], np.zeros(16, np.uint8))
    assert result.stats["rejected.conflicting_labels"] == 3 and result.stats["rejected.duplicate"] == 1


def test_clean_switches() -> None:
    pixels, labels = digits(6)
    pixels[1], labels[1] = pixels[0], labels[0]
    pixels[2], labels[2] = pixels[0], "3"
    kept = clean.clean_table(table(pixels, labels), CleanConfig(dedupe=False, drop_conflicts=False))
    assert kept.table.num_rows == 6
    only_dedupe = clean.clean_table(table(pixels, labels), CleanConfig(drop_conflicts=False))
    assert only_dedupe.rejects.column("reason").to_pylist() == ["duplicate of train:#0"]


def test_clean_run_accounts_for_every_row(tmp_path: Path) -> None:
    folder = tmp_path / "validate"
    folder.mkdir()
    pixels, labels = digits(20)
    pixels[4] = 255
    pq.write_table(table(pixels, labels), folder / "train.parquet")
    pq.write_table(table(*digits(8, 1), "test"), folder / "test.parquet")
    validated = StageRef(stage="validate", fingerprint="a" * 64, path=str(folder), extra={"image_shape": [4, 4]})
    recipe = recipe_from_dict({"name": "d", "task": "image-classification", "data": {"train_path": "x"}})
    ref = clean.run(recipe, validated, ArtifactStore(tmp_path / "artifacts"))
    assert ref.rows == {"input": 28, "train": 19, "test": 8, "rejected": 1}
    assert ref.extra["rejects_by_reason"] == {"blank image": 1}
    assert ref.file("rejects_sample.png").exists() and ref.file("rejects_sample.csv").exists()


def test_split_is_stratified_seeded_and_order_free() -> None:
    pixels, labels = digits(400)
    result = split.split_tables(table(pixels, labels), None, SplitConfig(validation_fraction=0.1, test_fraction=0.2))
    assert (result.train.num_rows, result.validation.num_rows, result.test.num_rows) == (280, 40, 80)
    assert Counter(result.validation.column("label").to_pylist()) == {str(d): 10 for d in range(4)}
    assert Counter(result.test.column("label").to_pylist()) == {str(d): 20 for d in range(4)}
    again = split.split_tables(table(pixels, labels).take(np.arange(399, -1, -1)), None,
                               SplitConfig(validation_fraction=0.1, test_fraction=0.2))
    assert sorted(again.validation.column("id").to_pylist()) == sorted(result.validation.column("id").to_pylist())
    other = split.split_tables(table(pixels, labels), None,
                               SplitConfig(validation_fraction=0.1, test_fraction=0.2, seed=99))
    assert sorted(other.validation.column("id").to_pylist()) != sorted(result.validation.column("id").to_pylist())


def test_split_keeps_test_file_and_rejects_leaks() -> None:
    pixels, labels = digits(100)
    test_pixels, test_labels = digits(10, 7)
    test_pixels[3] = pixels[42]
    pixels[43] = pixels[44]  # identical images stay together (dedupe off upstream)
    labels[43] = labels[44]
    result = split.split_tables(table(pixels, labels), table(test_pixels, test_labels, "test"), SplitConfig())
    assert result.test.num_rows == 10
    assert result.rejects.to_pylist() == [{"id": "train:#42", "split": "train", "reason": "leaks into test: same image as test:#3",
                                           "label": labels[42]}]
    assert result.train.num_rows + result.validation.num_rows == 99
    in_validation = set(result.validation.column("id").to_pylist())
    assert ("train:#43" in in_validation) == ("train:#44" in in_validation)
