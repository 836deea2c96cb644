"""Where a recipe's data files are: paths, globs and folders resolved to files, and their names in row ids."""

from __future__ import annotations

import glob
import hashlib
import os
from pathlib import Path
from typing import Any

from tasks.core.config import DataSource
from tasks.core.store import DataError


def resolve_paths(spec: str, base_dir: Path | None = None) -> list[Path]:
    """The files named by ``spec``: a file, a directory's non-hidden files (sorted), or a glob.

    Relative specs are taken from ``base_dir`` (default: the working directory). Raises
    :class:`DataError` when nothing matches.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    path = Path(spec).expanduser()
    if not path.is_absolute():
        path = base / path
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{spec}: directory contains no files")
        return files
    if glob.has_magic(str(spec)):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{spec}: glob matches no files")
        return files
    raise DataError(f"{spec}: file not found")


def display_names(paths: list[Path]) -> list[str]:
    """Names used in row ids: the file name, or the path below the common folder when names clash."""
    names = [p.name for p in paths]
    if len(set(names)) == len(names):
        return names
    common = Path(os.path.commonpath([str(p.parent) for p in paths]))
    return [p.relative_to(common).as_posix() for p in paths]


def ingest_config(cfg: DataSource) -> dict[str, Any]:
    """The part of the data config that ingest depends on (``data.labels`` is validate's)."""
    config = cfg.model_dump(mode="json")
    config.pop("labels", None)
    return config


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
