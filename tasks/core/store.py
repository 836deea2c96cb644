"""Fingerprinted artifact store: ``$NIGHTSHIFT_HOME/artifacts/<stage>/<fingerprint>/``.

Each stage output lives in a directory named by its fingerprint: sha256 of the stage name, the
canonical JSON of the stage's config, the fingerprints of its inputs and the hash of the stage's
code (its module and every project module it imports, transitively). An existing directory is a
cache hit. Directories are written to a temporary sibling and renamed into place, so a failed stage
leaves nothing half-written behind.

Every stage opens with the same two lines::

    key = stage_key(STAGE, config, [upstream.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
"""

from __future__ import annotations

import ast
import contextlib
import functools
import hashlib
import json
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from tasks.core.config import canonical_json

MANIFEST = "manifest.json"


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


PROJECT_PACKAGES = ("tasks", "models")


def _imported_modules(name: str, source: str) -> set[str]:
    """Project modules named by the ``import`` statements of one module's source (any depth in the file)."""
    found: set[str] = set()
    package = name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return {m for m in found if m.split(".")[0] in PROJECT_PACKAGES}


PROJECT_ROOT = Path(__file__).resolve().parents[2]


def _module_source(name: str) -> str | None:
    """Source of project module ``name`` (found by path, without importing it); None for a non-module name."""
    base = PROJECT_ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path.read_text(encoding="utf-8")
    return None


@functools.lru_cache(maxsize=None)
def code_fingerprint(module: str) -> str:
    """sha256 over the source of ``module`` and of every project module it imports, transitively.

    Editing a shared helper therefore invalidates every cached stage that (indirectly) uses it.
    Only ``tasks.*`` and ``models.*`` count: library versions that matter are added by the stage.
    """
    seen: dict[str, str] = {}
    todo = [module]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        source = _module_source(name)
        if source is None:  # `from module import function` names no module
            continue
        seen[name] = source
        todo.extend(_imported_modules(name, source) - seen.keys())
    digest = hashlib.sha256()
    for name in sorted(seen):
        digest.update(name.encode())
        digest.update(seen[name].encode())
    return digest.hexdigest()


class StageKey(NamedTuple):
    """What a stage output is keyed by; ``fingerprint`` is derived from the other four."""

    stage: str
    fingerprint: str
    config: Any
    inputs: list[str]
    code: str


def stage_key(stage: str, config: Any, inputs: list[str], module: str, extra_code: str = "") -> StageKey:
    """The key of a stage output: its config, input fingerprints and code (``module``'s import closure).

    ``extra_code`` adds what else decides the output besides our source (a library version, say).
    """
    code = code_fingerprint(module) + (f"+{extra_code}" if extra_code else "")
    return StageKey(stage, fingerprint(stage, config, inputs, code), config, list(inputs), code)


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

    def cached(self, key: StageKey, force: bool = False) -> StageRef | None:
        """The stored output for ``key`` (a cache hit), or None when absent or ``force`` is set."""
        return None if force else self.lookup(key.stage, key.fingerprint)

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
    def writer(self, key: StageKey) -> Iterator[StageWriter]:
        """Write a stage output atomically: files go to a temp dir renamed into place on success.

        An existing output of the same fingerprint (a ``--force`` rerun, or a concurrent run that
        finished first) is replaced only once the new one is complete: until then readers keep it.
        """
        stage, fp = key.stage, key.fingerprint
        final = self.path(stage, fp)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".tmp-{fp[:12]}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        writer = StageWriter(key, tmp)
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

    def __init__(self, key: StageKey, path: Path):
        self.key, self.stage, self.fingerprint, self.path = key, key.stage, key.fingerprint, path

    def write_table(self, name: str, table: pa.Table) -> None:
        pq.write_table(table, self.path / name, compression="zstd")

    def write_json(self, name: str, value: Any) -> None:
        (self.path / name).write_text(json.dumps(value, indent=2, sort_keys=True, default=str))

    def write_manifest(self, *, rows: dict[str, int], extra: dict[str, Any] | None = None) -> StageRef:
        """Write manifest.json (with the key's config, inputs and code) and return the final directory's reference."""
        key = self.key
        self.write_json(
            MANIFEST,
            {
                "stage": self.stage, "fingerprint": self.fingerprint, "inputs": key.inputs, "config": key.config,
                "code_version": key.code, "rows": rows, "extra": extra or {},
                "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            },
        )
        final = self.path.parent / self.fingerprint
        return StageRef(stage=self.stage, fingerprint=self.fingerprint, path=str(final), rows=rows, extra=extra or {})


def read_table(ref: StageRef, name: str) -> pa.Table:
    return pq.read_table(ref.file(name))


ECHO_LIMIT = 300  # characters of file content (a header, a line, a list of columns) quoted in an error
MESSAGE_LIMIT = 2000  # characters of a whole DataError message


# control characters as escapes: C0, DEL and C1 (U+0085 is a line break to some terminals)
_CONTROL_ESCAPES = {c: f"\\x{c:02x}" for c in (*range(0x20), *range(0x7F, 0xA0))} | {
    ord("\r"): "\\r", ord("\n"): "\\n", ord("\t"): "\\t"}


def bounded(text: str, limit: int = ECHO_LIMIT) -> str:
    """``text`` in at most ``limit`` characters: cut, and the cut said as ``"… (N more characters)"``.

    Control characters are shown as escapes (``\\r``, ``\\n``, ``\\x00`` ...) so that the result
    stays one readable line: a file with CR-only line endings would otherwise print as one line
    that rewinds over itself, a UTF-16 file as text with invisible NULs. Bounding a bounded text
    changes nothing (an exception may be re-raised or unpickled).
    """
    text = text.translate(_CONTROL_ESCAPES)
    if len(text) <= limit:
        return text
    # the suffix counts towards the limit, so that the result never exceeds it
    keep = max(0, limit - len(f"… ({len(text)} more characters)"))
    return f"{text[:keep]}… ({len(text) - keep} more characters)"


def one_line(exc: BaseException, limit: int = ECHO_LIMIT) -> str:
    """An exception's message as one line of at most ``limit`` characters (see :func:`bounded`): runs of
    whitespace, line breaks included, become one space; a message-less exception reads as its type name."""
    return bounded(" ".join(str(exc).split()) or type(exc).__name__, limit)


class DataError(ValueError):
    """Bad input a user can fix: the message names the file (and row or key) and the problem.

    The message is one line of at most :data:`MESSAGE_LIMIT` characters (see :func:`bounded`),
    whatever the file held: parts quoted from the file are bounded where they are quoted, this is
    the backstop.
    """

    def __init__(self, message: str):
        super().__init__(bounded(str(message), MESSAGE_LIMIT))
