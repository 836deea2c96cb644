"""Fingerprinted artifact store: ``$NIGHTSHIFT_HOME/artifacts/<stage>/<fingerprint>/``.

Each stage output lives in a directory named by its fingerprint: sha256 of the stage name, the
canonical JSON of the stage's config, the fingerprints of its inputs and the hash of the stage's
own source. An existing directory is a cache hit. Directories are written to a temporary sibling
and renamed into place, so a failed stage leaves nothing half-written behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.config import canonical_json

MANIFEST = "manifest.json"
REJECTS = "rejects.parquet"


class StageRef(BaseModel):
    """Small frozen reference one stage hands the next: where its output is and what it holds."""

    model_config = ConfigDict(frozen=True)

    stage: str = Field(description="Stage name.")
    fingerprint: str = Field(description="Content fingerprint of the output.")
    path: str = Field(description="Directory holding the output.")
    rows: dict[str, int] = Field(default_factory=dict, description="Row counts by file or split.")
    cache_hit: bool = Field(default=False, description="True when the output was found in the store.")
    extra: dict[str, Any] = Field(default_factory=dict, description="Small stage-specific facts (labels, vocab size ...).")

    def file(self, name: str) -> Path:
        return Path(self.path) / name


def read_splits(ref: StageRef) -> dict[str, pa.Table]:
    """``train`` and, when the stage wrote one, ``test`` of a stage's output."""
    splits = {"train": pq.read_table(ref.file("train.parquet"))}
    if ref.file("test.parquet").exists():
        splits["test"] = pq.read_table(ref.file("test.parquet"))
    return splits


class StageError(RuntimeError):
    """A stage failed; the message starts with the stage name."""

    def __init__(self, stage: str, message: str):
        super().__init__(f"{stage}: {message}")
        self.stage = stage


def source_hash(*modules: ModuleType) -> str:
    """sha256 of the source code of the given modules (the stage's own code version)."""
    digest = hashlib.sha256()
    for module in modules:
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()


def file_fingerprint(paths: list[Path]) -> str:
    """sha256 over the names, sizes and bytes of input files (content, not mtime)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.name.encode())
        digest.update(str(path.stat().st_size).encode())
        with path.open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def fingerprint(stage: str, config: Any, inputs: list[str], code: str) -> str:
    """Fingerprint of a stage output: sha256(stage, canonical config JSON, input fingerprints, code hash)."""
    payload = canonical_json({"stage": stage, "config": config, "inputs": list(inputs), "code": code})
    return hashlib.sha256(payload.encode()).hexdigest()


class ArtifactStore:
    """The on-disk store of stage outputs, one directory per (stage, fingerprint)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def path(self, stage: str, fp: str) -> Path:
        return self.root / stage / fp

    def lookup(self, stage: str, fp: str) -> StageRef | None:
        """The stored reference for (stage, fingerprint), or None when absent."""
        manifest = self.path(stage, fp) / MANIFEST
        if not manifest.exists():
            return None
        data = json.loads(manifest.read_text())
        return StageRef(
            stage=stage, fingerprint=fp, path=str(manifest.parent), rows=data.get("rows", {}),
            cache_hit=True, extra=data.get("extra", {}),
        )

    @contextlib.contextmanager
    def writer(self, stage: str, fp: str) -> Iterator[StageWriter]:
        """Write a stage output atomically: files go to a temp dir renamed into place on success.

        An existing output of the same fingerprint (a ``--force`` rerun, or a concurrent run that
        finished first) is replaced only once the new one is complete: until then readers keep it.
        """
        final = self.path(stage, fp)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{fp[:12]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        writer = StageWriter(stage, fp, tmp)
        try:
            yield writer
            if not (tmp / MANIFEST).exists():
                raise StageError(stage, "internal error: stage wrote no manifest")
            if final.exists():
                old = final.parent / f".old-{fp[:12]}-{uuid.uuid4().hex[:8]}"
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        writer.path = final


class StageWriter:
    """Handle to a stage's temporary output directory."""

    def __init__(self, stage: str, fp: str, path: Path):
        self.stage, self.fingerprint, self.path = stage, fp, path

    def write_table(self, name: str, table: pa.Table) -> None:
        pq.write_table(table, self.path / name, compression="zstd")

    def write_json(self, name: str, value: Any) -> None:
        (self.path / name).write_text(json.dumps(value, indent=2, sort_keys=True, default=str))

    def write_manifest(
        self, *, config: Any, inputs: list[str], code: str, rows: dict[str, int], extra: dict[str, Any] | None = None
    ) -> StageRef:
        """Write manifest.json and return the reference the final directory will have."""
        self.write_json(
            MANIFEST,
            {
                "stage": self.stage, "fingerprint": self.fingerprint, "inputs": inputs, "config": config,
                "code_version": code, "rows": rows, "extra": extra or {},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        final = self.path.parent / self.fingerprint
        return StageRef(stage=self.stage, fingerprint=self.fingerprint, path=str(final), rows=rows, extra=extra or {})


def rejects_table(ids: list[str], reasons: list[str], payload: dict[str, list[Any]] | None = None) -> pa.Table:
    """A rejects table: the row id, the reason it was rejected, and whatever row data there is."""
    columns: dict[str, Any] = {"id": pa.array(ids, pa.string()), "reason": pa.array(reasons, pa.string())}
    for key, values in (payload or {}).items():
        columns[key] = pa.array(values)
    return pa.table(columns)


def read_table(ref: StageRef, name: str) -> pa.Table:
    return pq.read_table(ref.file(name))


class DataError(ValueError):
    """Bad input a user can fix: the message names the file (and row or key) and the problem."""
