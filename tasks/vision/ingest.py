"""Ingest stage for image recipes: IDX files (MNIST) -> canonical ``id, pixels, label`` rows.

``data.train_path`` (and optional ``data.test_path``) name one IDX images file each; the labels
file is ``data.train_labels_path`` / ``data.test_labels_path``, or, when those are null, the images
file's name with ``images-idx3`` replaced by ``labels-idx1`` in the same folder (the MNIST naming).
Files may be gzipped or not: gzip is recognised by its magic bytes, not by the name.

IDX layout: two zero bytes, a type byte (0x08 unsigned byte ... 0x0e double), the number of
dimensions, one big-endian 4-byte size per dimension, then the data. Images must be magic 2051
(0x00000803: unsigned bytes, 3 dimensions: count, rows, columns), labels magic 2049 (0x00000801:
unsigned bytes, 1 dimension). Anything else -- a wrong magic number, a header cut short, fewer data
bytes than the header promises (a truncated file), bytes after the data, a corrupt gzip stream,
images and labels files of different lengths -- raises :class:`DataError` naming the file and what
is wrong. IDX has no row-level structure to be malformed, so ingest rejects no rows (an empty
``rejects.parquet`` keeps the contract); validate and clean judge the images.

Row ids are ``"<images file name>:#<index>"`` with the 0-based item index of the IDX file
(``train-images-idx3-ubyte.gz:#12``). Labels become strings (``7`` -> ``"7"``). ``data.max_rows``
keeps the first rows of each file.
"""

from __future__ import annotations

import gzip
import math
import time
import zlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.core.rejects import rejects_schema
from tasks.core.sources import file_fingerprint, ingest_config, resolve_paths
from tasks.core.store import ArtifactStore, DataError, StageRef, stage_key
from tasks.vision import images
from tasks.vision.config import ImageRecipe

STAGE = "ingest"
IMAGES_MAGIC = 2051  # 0x00000803
LABELS_MAGIC = 2049  # 0x00000801
GZIP_MAGIC = b"\x1f\x8b"
IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
REJECTS_SCHEMA = rejects_schema()
SAMPLES_PNG = "ingest_samples.png"
REPORT = "ingest_report.json"


# --------------------------------------------------------------------------------------------
# IDX parsing


def read_file_bytes(path: Path) -> bytes:
    """The bytes of ``path``, gunzipped when they start with the gzip magic; DataError when unreadable."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise DataError(f"{path}: unreadable: {exc.strerror or exc}") from None
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data: {exc}") from None
    return data


def parse_idx(data: bytes, source: str) -> tuple[int, np.ndarray]:
    """Parse IDX bytes into (magic number, array of the header's shape); ``source`` names the file in errors."""
    if len(data) < 4:
        raise DataError(f"{source}: truncated IDX header: {len(data)} byte(s), an IDX file starts with 4 magic bytes")
    magic = int.from_bytes(data[:4], "big")
    type_code, ndim = data[2], data[3]
    if data[:2] != b"\0\0" or type_code not in IDX_TYPES or ndim == 0:
        raise DataError(
            f"{source}: not an IDX file: magic number {magic} (0x{magic:08x}); IDX starts with two zero bytes, "
            "a type byte 0x08-0x0e and the number of dimensions"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{source}: truncated IDX header: {ndim} dimension(s) need {header} header bytes, "
                        f"the file holds {len(data)}")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(IDX_TYPES[type_code])
    count = math.prod(dims)
    expected = count * dtype.itemsize
    held = len(data) - header
    if held < expected:
        raise DataError(f"{source}: truncated: the header promises shape {dims} ({expected} data bytes), "
                        f"the file holds {held}")
    if held > expected:
        raise DataError(f"{source}: {held - expected} byte(s) after the {expected} data bytes the header "
                        f"promises for shape {dims}: corrupt header or not an IDX file")
    return magic, np.frombuffer(data, dtype=dtype, count=count, offset=header).reshape(dims)


def encode_idx(array: np.ndarray) -> bytes:
    """IDX bytes of ``array`` (unsigned bytes): the inverse of :func:`parse_idx`, for fixtures and exports."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.tobytes()


def _expect_magic(path: Path, magic: int, wanted: int, what: str) -> None:
    if magic == wanted:
        return
    other = {IMAGES_MAGIC: "an IDX images file", LABELS_MAGIC: "an IDX labels file"}.get(magic)
    hint = f": it is {other}" if other else ""
    raise DataError(f"{path}: magic number {magic} (0x{magic:08x}) where {what} need {wanted} "
                    f"(0x{wanted:08x}){hint}")


def read_idx_images(path: Path) -> np.ndarray:
    """(n, rows, cols) uint8 images of an IDX images file (magic 2051)."""
    magic, array = parse_idx(read_file_bytes(path), str(path))
    _expect_magic(path, magic, IMAGES_MAGIC, "images (unsigned bytes, 3 dimensions)")
    return array


def read_idx_labels(path: Path) -> np.ndarray:
    """(n,) uint8 labels of an IDX labels file (magic 2049)."""
    magic, array = parse_idx(read_file_bytes(path), str(path))
    _expect_magic(path, magic, LABELS_MAGIC, "labels (unsigned bytes, 1 dimension)")
    return array


def labels_path_for(images_path: Path, configured: str | None, key: str, base_dir: Path | None = None) -> Path:
    """The labels file of ``images_path``: ``configured`` when set, else derived from the MNIST naming."""
    if configured:
        return _one_file(configured, key, base_dir)
    name = images_path.name
    if "images-idx3" not in name:
        raise DataError(f"{images_path}: cannot derive the labels file from this name (no 'images-idx3' in it): "
                        f"set data.{key}")
    path = images_path.with_name(name.replace("images-idx3", "labels-idx1"))
    if not path.is_file():
        raise DataError(f"{path}: labels file not found (derived from {name}; set data.{key} to name it)")
    return path


def _one_file(spec: str, key: str, base_dir: Path | None) -> Path:
    paths = resolve_paths(spec, base_dir)
    if len(paths) != 1:
        raise DataError(f"data.{key} {spec!r}: matches {len(paths)} files, an image recipe needs exactly one")
    return paths[0]


# --------------------------------------------------------------------------------------------
# splits


@dataclass
class IdxSplit:
    """One split read from an images file and its labels file."""

    split: str
    images_path: Path
    labels_path: Path
    table: pa.Table
    image_shape: tuple[int, int]
    rows_in_file: int
    stopped_at_max_rows: bool

    def summary(self) -> dict[str, Any]:
        return {"images": str(self.images_path), "labels": str(self.labels_path), "rows_in_file": self.rows_in_file,
                "rows": self.table.num_rows, "image_shape": list(self.image_shape),
                "stopped_at_max_rows": self.stopped_at_max_rows}


def read_split(split: str, images_path: Path, labels_path: Path, max_rows: int | None = None) -> IdxSplit:
    """Read one images file and its labels into a canonical table (first ``max_rows`` rows)."""
    pictures = read_idx_images(images_path)
    labels = read_idx_labels(labels_path)
    if len(pictures) != len(labels):
        raise DataError(f"{images_path}: holds {len(pictures)} images but {labels_path} holds {len(labels)} labels")
    n_file = len(pictures)
    n = n_file if max_rows is None else min(n_file, max_rows)
    flat = pictures[:n].reshape(n, -1)
    ids = [f"{images_path.name}:#{i}" for i in range(n)]
    table = images.table(ids, flat, [str(int(v)) for v in labels[:n]])
    return IdxSplit(split, images_path, labels_path, table, (int(pictures.shape[1]), int(pictures.shape[2])),
                    n_file, n < n_file)


def run(recipe: ImageRecipe, store: ArtifactStore, force: bool = False, base_dir: Path | None = None) -> StageRef:
    """Ingest the recipe's IDX files into the store (cached by fingerprint).

    ``rows``: ``input, accepted, rejected, train, test``; ``extra``: ``metrics``, ``log_files``,
    ``files``, ``image_shape`` (train's) and ``image_shapes`` (per split), ``has_test``, ``labels_seen``.
    """
    start = time.perf_counter()
    cfg = recipe.data
    if cfg.format not in (None, "idx"):
        raise DataError(f"{STAGE}: data.format {cfg.format!r}: image recipes read IDX files (idx)")
    sources: dict[str, tuple[Path, Path]] = {}
    for split, spec, labels_key, labels_spec in (
        ("train", cfg.train_path, "train_labels_path", cfg.train_labels_path),
        ("test", cfg.test_path, "test_labels_path", cfg.test_labels_path),
    ):
        if spec is None:
            continue
        key = "train_path" if split == "train" else "test_path"
        images_path = _one_file(spec, key, base_dir)
        sources[split] = (images_path, labels_path_for(images_path, labels_spec, labels_key, base_dir))
    inputs = [file_fingerprint(list(paths)) for paths in sources.values()]
    key = stage_key(STAGE, ingest_config(cfg), inputs, __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit

    results = {split: read_split(split, *paths, max_rows=cfg.max_rows) for split, paths in sources.items()}
    train, test = results["train"], results.get("test")
    rejects = pa.Table.from_batches([], schema=REJECTS_SCHEMA)
    rows = {
        "input": sum(r.table.num_rows for r in results.values()),
        "accepted": sum(r.table.num_rows for r in results.values()),
        "rejected": 0,
        "train": train.table.num_rows,
        "test": test.table.num_rows if test else 0,
    }
    labels_seen = sorted(set(train.table.column("label").to_pylist()), key=lambda v: (len(v), v))
    files = {split: r.summary() for split, r in results.items()}
    metrics: dict[str, float] = {"rows_input": rows["input"], "rows_accepted": rows["accepted"], "rows_rejected": 0,
                                 "files": 2 * len(results)}
    for split, r in results.items():
        metrics[f"{split}.rows_input"] = r.table.num_rows
        metrics[f"{split}.rows_in_file"] = r.rows_in_file
    metrics["duration_s"] = round(time.perf_counter() - start, 4)
    extra = {
        "metrics": {k: float(v) for k, v in metrics.items()},
        "log_files": [REPORT, SAMPLES_PNG],
        "files": files,
        "image_shape": list(train.image_shape),
        "image_shapes": {split: list(r.image_shape) for split, r in results.items()},
        "has_test": test is not None,
        "rejects_by_reason": {},
        "labels_seen": labels_seen,
    }
    report = {"rows": rows, "files": files, "labels_seen": labels_seen,
              "label_counts": {split: dict(sorted(Counter(r.table.column("label").to_pylist()).items()))
                               for split, r in results.items()}}
    with store.writer(key) as w:
        w.write_table("train.parquet", train.table)
        if test is not None:
            w.write_table("test.parquet", test.table)
        w.write_table("rejects.parquet", rejects)
        w.write_json(REPORT, report)
        sample = train.table.slice(0, 36)
        images.grid_png(images.to_numpy(sample.column("pixels")), train.image_shape,
                        [f"{images.short_id(i)}: {lab}" for i, lab in zip(sample.column("id").to_pylist(),
                                                                       sample.column("label").to_pylist())],
                        w.path / SAMPLES_PNG, "first train images (id: label)")
        ref = w.write_manifest(rows=rows, extra=extra)
    return ref
