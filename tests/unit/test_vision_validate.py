"""Image validate: pixel count and range, labels, blank images, duplicates, conflicts, leakage, balance, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tasks.core.config import ValidateConfig
from tasks.core.store import ArtifactStore, DataError, StageRef
from tasks.registry import recipe_from_dict
from tasks.vision import images, validate

LABELS = [str(d) for d in range(10)]


def make(n: int, seed: int = 0, prefix: str = "train") -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 16), dtype=np.uint8), [str(i % 10) for i in range(n)]


def table(pixels: np.ndarray, labels: list[str], prefix: str = "train") -> pa.Table:
    return images.table([f"{prefix}:#{i}" for i in range(len(labels))], pixels, labels)


def checks(result) -> dict[tuple[str, str | None], str]:
    return {(c.name, c.split): c.status for c in result.checks}


def test_clean_data_passes() -> None:
    train, test = table(*make(100)), table(*make(40, 1), prefix="test")
    result = validate.validate_tables(train, test, ValidateConfig(), LABELS, (4, 4))
    assert not result.failed and result.rejects.num_rows == 0
    assert result.train.num_rows == 100 and result.test.num_rows == 40
    report = result.report
    assert report["splits"]["train"]["labels"]["counts"]["0"] == 10
    assert report["splits"]["train"]["pixels"]["max"] <= 255 and report["leakage"]["test_rows_leaked"] == 0


def test_pixel_count_range_and_labels_are_rejected() -> None:
    pixels, labels = make(50)
    rows = [list(map(int, p)) for p in pixels]
    rows[0] = rows[0][:15]  # too few
    rows[1] = rows[1] + [0]  # too many
    rows[2][3] = 300  # out of range
    rows[3][0] = -1
    labels[4] = "11"  # unknown
    labels[5] = " "  # missing
    train = pa.table({"id": [f"r{i}" for i in range(50)], "pixels": pa.array(rows, pa.list_(pa.int64())),
                      "label": labels})
    cfg = ValidateConfig(max_reject_fraction=0.5)
    result = validate.validate_tables(train, None, cfg, LABELS, (4, 4))
    reasons = dict(zip(result.rejects.column("id").to_pylist(), result.rejects.column("reason").to_pylist()))
    assert sorted(reasons) == ["r0", "r1", "r2", "r3", "r4", "r5"]
    assert reasons["r0"] == "has 15 pixels, expected 16 (4x4)"
    assert reasons["r1"] == "has 17 pixels, expected 16 (4x4)"
    assert reasons["r2"] == f"pixel values outside 0-255 (min {min(rows[2])}, max 300)"
    assert reasons["r3"] == f"pixel values outside 0-255 (min -1, max {max(rows[3])})"
    assert reasons["r4"] == "unknown label '11' (allowed: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9)"
    assert reasons["r5"] == "missing label"
    assert result.train.num_rows + result.rejects.num_rows == 50
    assert result.train.schema == images.schema(16)  # converted to canonical uint8
    assert checks(result)[("pixels", None)] == "warn" and checks(result)[("labels", None)] == "warn"
    # too many rejects fails
    with_default = validate.validate_tables(train, None, ValidateConfig(), LABELS, (4, 4))
    assert [c.name for c in with_default.failed] == ["reject_fraction"]


def test_blank_duplicates_conflicts_and_leakage_are_found() -> None:
    pixels, labels = make(100)
    pixels[1] = pixels[0]  # duplicate, same label below
    labels[1] = labels[0]
    pixels[2] = pixels[0]  # same image, other label: conflict (rows 0, 1, 2)
    labels[2] = "9"
    pixels[3] = 0  # blank
    test_pixels, test_labels = make(20, 5)
    test_pixels[0] = pixels[10]  # leaks
    result = validate.validate_tables(table(pixels, labels), table(test_pixels, test_labels, "test"),
                                      ValidateConfig(max_conflict_fraction=0.5, max_leakage_fraction=0.5), LABELS, (4, 4))
    train = result.report["splits"]["train"]
    assert train["blank"]["rows"] == 1 and train["blank"]["examples"] == ["train:#3"]
    assert train["duplicates"]["exact_rows"] == 1
    assert train["conflicts"]["rows"] == 3 and train["conflicts"]["images"] == 1
    assert result.report["leakage"]["test_rows_leaked"] == 1
    assert result.report["leakage"]["examples"] == [{"test": "test:#0", "train": "train:#10"}]
    status = checks(result)
    assert status[("empty_fraction", "train")] == "warn" and status[("duplicates", "train")] == "warn"
    assert status[("leakage_fraction", "test")] == "warn"
    strict = validate.validate_tables(table(pixels, labels), table(test_pixels, test_labels, "test"),
                                      ValidateConfig(max_conflict_fraction=0.01, max_empty_fraction=0.0,
                                                                     max_leakage_fraction=0.01), LABELS, (4, 4))
    assert {c.label for c in strict.failed} == {"conflict_fraction[train]", "empty_fraction[train]",
                                               "leakage_fraction[test]"}


def test_label_balance_and_shape_checks() -> None:
    pixels, _ = make(100)
    labels = ["0"] * 99 + ["1"]
    result = validate.validate_tables(table(pixels, labels), None, ValidateConfig(min_class_fraction=0.05), ["0", "1"], (4, 4))
    assert [c.name for c in result.failed] == ["min_class_fraction"]
    assert result.report["splits"]["train"]["labels"]["imbalance_ratio"] == 99
    one = validate.validate_tables(table(pixels, ["3"] * 100), None, ValidateConfig(), None, (4, 4))
    assert [c.name for c in one.failed] == ["num_labels"]
    odd = validate.validate_tables(table(pixels, labels), table(*make(5, 3), "test"), ValidateConfig(), None, (4, 4),
                                   test_shape=(2, 8))
    assert "image_shape" in [c.name for c in odd.failed]


def test_run_fails_with_report(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    pixels, labels = make(40)
    pixels[:] = 7  # every image blank
    folder = tmp_path / "ingest"
    folder.mkdir()
    pq.write_table(table(pixels, labels), folder / "train.parquet")
    ingested = StageRef(stage="ingest", fingerprint="f" * 64, path=str(folder), rows={"input": 40, "rejected": 0},
                        extra={"image_shape": [4, 4]})
    recipe = recipe_from_dict({"name": "d", "task": "image-classification", "data": {"train_path": "x"}})
    with pytest.raises(DataError, match=r"validate failed: empty_fraction\[train\] 1 > 0.05; .*\(report: .*failed-"):
        validate.run(recipe, ingested, store)
    assert list((store.root / "validate").glob("failed-*/validation_report.md"))
