"""Image ingest: IDX parsing (gzipped or raw), every file error named, ids, labels, caching, the real MNIST."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest

from tasks.core.store import ArtifactStore, DataError
from tasks.registry import Recipe, load_recipe, recipe_from_dict
from tasks.vision import images, ingest

ROOT = Path(__file__).resolve().parents[2]
MNIST = ROOT / "data" / "mnist"


def write_pair(folder: Path, prefix: str, pictures: np.ndarray, labels: np.ndarray, gz: bool = True) -> Path:
    """Write ``<prefix>-images-idx3-ubyte[.gz]`` and its labels file; return the images path."""
    suffix = ".gz" if gz else ""
    opener = gzip.compress if gz else (lambda b: b)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{prefix}-labels-idx1-ubyte{suffix}").write_bytes(opener(ingest.encode_idx(labels)))
    path = folder / f"{prefix}-images-idx3-ubyte{suffix}"
    path.write_bytes(opener(ingest.encode_idx(pictures)))
    return path


def digits(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8), rng.integers(0, 10, size=n).astype(np.uint8)


def recipe(**data: Any) -> Recipe:
    return recipe_from_dict({"name": "digits", "task": "image-classification", "data": data})


def test_parse_round_trip_gz_and_raw(tmp_path: Path) -> None:
    pictures, labels = digits(5)
    for gz in (True, False):
        path = write_pair(tmp_path / str(gz), "train", pictures, labels, gz=gz)
        assert np.array_equal(ingest.read_idx_images(path), pictures)
        labels_path = ingest.labels_path_for(path, None, "train_labels_path")
        assert np.array_equal(ingest.read_idx_labels(labels_path), labels)
    # gzip is recognised by its bytes, not the name
    plain = tmp_path / "renamed.idx"
    plain.write_bytes(gzip.compress(ingest.encode_idx(pictures)))
    assert np.array_equal(ingest.read_idx_images(plain), pictures)


def test_magic_numbers_of_the_real_files() -> None:
    magic, array = ingest.parse_idx(gzip.decompress((MNIST / "t10k-images-idx3-ubyte.gz").read_bytes()), "t10k")
    assert magic == ingest.IMAGES_MAGIC == 2051 and array.shape == (10000, 28, 28)
    magic, array = ingest.parse_idx(gzip.decompress((MNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()), "t10k")
    assert magic == ingest.LABELS_MAGIC == 2049 and array.shape == (10000,)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x00\x00", r"truncated IDX header: 2 byte"),
        (b"\x12\x34\x08\x03" + bytes(12), r"not an IDX file: magic number 305399811 \(0x12340803\)"),
        (b"\x00\x00\x07\x03" + bytes(12), r"not an IDX file: magic number 1795"),
        (b"\x00\x00\x08\x03\x00\x00\x00\x02", r"truncated IDX header: 3 dimension\(s\) need 16 header bytes"),
        (ingest.encode_idx(np.zeros((3, 2, 2), np.uint8))[:-5],
         r"truncated: the header promises shape \(3, 2, 2\) \(12 data bytes\), the file holds 7"),
        (ingest.encode_idx(np.zeros((3, 2, 2), np.uint8)) + b"xx", r"2 byte\(s\) after the 12 data bytes"),
    ],
    ids=["short", "bad-magic", "bad-type", "short-dims", "truncated", "trailing"],
)
def test_corrupt_files_raise_data_error_naming_the_file(tmp_path: Path, data: bytes, message: str) -> None:
    path = tmp_path / "broken-images-idx3-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match=rf"^{path}: {message}"):
        ingest.read_idx_images(path)


def test_truncated_gzip_real_file(tmp_path: Path) -> None:
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes((MNIST / "t10k-images-idx3-ubyte.gz").read_bytes()[:50_000])
    with pytest.raises(DataError, match=rf"^{path}: corrupt or truncated gzip data"):
        ingest.read_idx_images(path)
    raw = tmp_path / "t10k-images-idx3-ubyte"
    raw.write_bytes(gzip.decompress((MNIST / "t10k-images-idx3-ubyte.gz").read_bytes())[:100_016])
    with pytest.raises(DataError, match=rf"^{raw}: truncated: the header promises shape \(10000, 28, 28\)"):
        ingest.read_idx_images(raw)


def test_images_and_labels_swapped_is_named(tmp_path: Path) -> None:
    path = write_pair(tmp_path, "train", *digits(3))
    labels = tmp_path / "train-labels-idx1-ubyte.gz"
    with pytest.raises(DataError, match=rf"^{labels}: magic number 2049 .* need 2051 .*it is an IDX labels file"):
        ingest.read_idx_images(labels)
    with pytest.raises(DataError, match=rf"^{path}: magic number 2051 .* need 2049"):
        ingest.read_idx_labels(path)


def test_count_mismatch_and_missing_labels_file(tmp_path: Path) -> None:
    pictures, labels = digits(4)
    path = write_pair(tmp_path, "train", pictures, labels[:3])
    with pytest.raises(DataError, match=r"holds 4 images but .*train-labels-idx1-ubyte.gz holds 3 labels"):
        ingest.read_split("train", path, ingest.labels_path_for(path, None, "train_labels_path"))
    lonely = tmp_path / "other" / "x-images-idx3-ubyte"
    lonely.parent.mkdir()
    lonely.write_bytes(ingest.encode_idx(pictures))
    with pytest.raises(DataError, match=r"x-labels-idx1-ubyte: labels file not found .*set data.train_labels_path"):
        ingest.labels_path_for(lonely, None, "train_labels_path")
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"")
    with pytest.raises(DataError, match=r"cannot derive the labels file .*set data.test_labels_path"):
        ingest.labels_path_for(odd, None, "test_labels_path")


def test_run_writes_canonical_rows(tmp_path: Path) -> None:
    train_path = write_pair(tmp_path / "data", "train", *digits(30, 1))
    test_pictures, test_labels = digits(10, 2)
    test_path = write_pair(tmp_path / "data", "t10k", test_pictures, test_labels, gz=False)
    store = ArtifactStore(tmp_path / "artifacts")
    r = recipe(train_path=str(train_path), test_path=str(test_path), max_rows=20)
    ref = ingest.run(r, store)
    assert ref.rows == {"input": 30, "accepted": 30, "rejected": 0, "train": 20, "test": 10}
    train = pq.read_table(ref.file("train.parquet"))
    assert train.schema == images.schema(784)
    assert train.column("id")[12].as_py() == "train-images-idx3-ubyte.gz:#12"
    test = pq.read_table(ref.file("test.parquet"))
    assert np.array_equal(images.to_numpy(test.column("pixels")), test_pictures.reshape(10, -1))
    assert test.column("label").to_pylist() == [str(v) for v in test_labels]
    assert pq.read_table(ref.file("rejects.parquet")).num_rows == 0
    assert ref.extra["image_shape"] == [28, 28] and ref.file("ingest_samples.png").stat().st_size > 0
    assert ingest.run(r, store).cache_hit


def test_explicit_labels_paths(tmp_path: Path) -> None:
    pictures, labels = digits(6)
    images_path = tmp_path / "pics.idx"
    images_path.write_bytes(ingest.encode_idx(pictures))
    labels_path = tmp_path / "answers.idx"
    labels_path.write_bytes(ingest.encode_idx(labels))
    ref = ingest.run(recipe(train_path=str(images_path), train_labels_path=str(labels_path)),
                     ArtifactStore(tmp_path / "artifacts"))
    assert ref.rows["train"] == 6 and not ref.extra["has_test"]


def test_bundled_mnist_matches_the_manifest_and_loads() -> None:
    spec = importlib.util.spec_from_file_location("bundle", ROOT / "data" / "bundle.py")
    bundle = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bundle)
    for name, digest in bundle.SHA256.items():
        if name.startswith("mnist/"):
            assert hashlib.sha256((ROOT / "data" / name).read_bytes()).hexdigest() == digest, name
    r = load_recipe(ROOT / "configs" / "mnist.yaml")
    split = ingest.read_split("train", ROOT / r.data.train_path,
                              ingest.labels_path_for(ROOT / r.data.train_path, None, "train_labels_path"))
    counts = np.bincount(np.array(split.table.column("label").to_pylist(), dtype=int))
    assert counts.tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # MANIFEST.md
