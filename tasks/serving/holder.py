"""The served model and how it changes: resolve the alias, download, load, warm, swap.

A :class:`ModelHolder` keeps one :class:`LoadedModel` (name, version, alias, predictor) behind a single
attribute. A new version is downloaded into a private temporary folder and renamed into the cache
only when complete, so a process killed mid-download leaves no half-written version behind. It is
then loaded and warmed (its input example predicted) beside the old one while the old one keeps
serving; only then is the attribute replaced: one reference assignment, atomic in Python, so a
request sees either the old model or the new one, whole. A version that fails to download, load or
warm is not swapped in: the old one keeps serving and the failure is kept for ``/ready`` and
``/metrics``.

Requests read :attr:`ModelHolder.current` once and use that object to the end, so the version they
report is the version that answered them.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks.core import packaging, tracking
from tasks.core.jsonable import plain

log = logging.getLogger("nightshift.serve")
PARTIAL_PREFIX = ".partial-"


@dataclass(frozen=True)
class LoadedModel:
    """One loaded, warmed model version: what a request runs against."""

    name: str
    version: str
    alias: str | None
    predictor: Any
    input_column: str
    input_columns: tuple[str, ...]
    loaded_at: float
    load_seconds: float


@dataclass
class ReloadOutcome:
    """What one reload attempt did."""

    version: str | None                  # the version served after the attempt
    changed: bool
    error: str | None = None


def predict_records(predictor: Any, column: str, inputs: list[Any]) -> list[dict[str, Any]]:
    """The predictor's output frame for ``inputs`` as one JSON-ready dict per input (numpy made plain).

    A predictor with ``records(inputs)`` (plain dicts, no pandas) answers through it: on one sentence the
    two DataFrames cost about as much as the model itself."""
    records = getattr(predictor, "records", None)
    if records is not None and column == getattr(predictor, "input_column", None):
        rows = records(inputs)
    else:
        rows = frame_records(predictor.predict(pd.DataFrame({column: inputs})))
    if len(rows) != len(inputs):
        raise RuntimeError(f"predictor answered {len(rows)} rows for {len(inputs)} inputs")
    return rows


def frame_records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """One JSON-ready dict per row; column lists zipped into rows take a third of the time of
    ``frame.to_dict("records")`` on one-row frames."""
    keys = [str(key) for key in frame.columns]
    columns = [[v if isinstance(v, SIMPLE) else plain(v) for v in frame[key].tolist()] for key in frame.columns]
    return [dict(zip(keys, row)) for row in zip(*columns)]


# values JSON takes as they are; a float NaN among them is made null when the answer is written
SIMPLE = (str, int, float, bool, type(None))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ModelCache:
    """Downloaded registered versions under ``root/<name>/<version>/``, each complete or absent."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, name: str, version: str) -> Path:
        return self.root / name / version

    def fetch(self, name: str, version: str) -> Path:
        """The version's local folder, downloaded first when it is not cached yet."""
        final = self.path(name, version)
        if (final / "MLmodel").exists():
            return final
        final.parent.mkdir(parents=True, exist_ok=True)
        self._sweep(final.parent)
        # the pid in the name lets a later sweep tell a dead process's leftovers from a live download
        partial = Path(tempfile.mkdtemp(prefix=f"{PARTIAL_PREFIX}{version}-{os.getpid()}-", dir=final.parent))
        try:
            local = tracking.download_model_version(name, version, partial / "model")
            if not (local / "MLmodel").exists():
                raise RuntimeError(f"models:/{name}/{version} has no MLmodel file: not a logged model")
            try:
                os.rename(local, final)  # atomic: the version appears complete or not at all
            except OSError:
                if not (final / "MLmodel").exists():  # not a concurrent server that finished first
                    raise
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        return final

    @staticmethod
    def _sweep(folder: Path) -> None:
        """Remove partial downloads left by processes that no longer run."""
        for entry in folder.glob(f"{PARTIAL_PREFIX}*"):
            try:
                pid = int(entry.name[len(PARTIAL_PREFIX):].split("-")[1])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                shutil.rmtree(entry, ignore_errors=True)


# tasks whose predictor also reads a column besides its input_column (a tagger takes pre-split words)
EXTRA_INPUTS = {"token-classification": ("tokens",)}


def input_columns(predictor: Any, task: str | None) -> tuple[str, ...]:
    """The frame columns a predictor accepts: its ``input_columns`` when it says, else its ``input_column``
    plus what its task's predictors also read (``EXTRA_INPUTS``)."""
    declared = getattr(predictor, "input_columns", None)
    if declared:
        return tuple(declared)
    return (predictor.input_column, *EXTRA_INPUTS.get(task or "", ()))


def load_version(cache: ModelCache, name: str, version: str, alias: str | None) -> LoadedModel:
    """Download (or reuse), load and warm one version; raise on any failure, touching nothing served."""
    started = time.perf_counter()
    model_dir = cache.fetch(name, version)
    bundle = packaging.bundle_dir(model_dir)
    predictor = packaging.load_predictor(bundle)
    column = predictor.input_column
    columns = input_columns(predictor, json.loads((bundle / "bundle.json").read_text()).get("task"))
    example = packaging.input_example(model_dir, column)
    if example:
        # warming runs the first real forward (allocator, kernels, tokenizer caches) off the request path, and
        # proves the version answers at all before it is swapped in
        predict_records(predictor, column, example)
    return LoadedModel(name=name, version=version, alias=alias, predictor=predictor, input_column=column,
                       input_columns=columns, loaded_at=time.time(), load_seconds=time.perf_counter() - started)


@dataclass
class ModelHolder:
    """The served model of ``name``: pinned to ``version``, or following ``alias`` in the registry."""

    name: str
    alias: str | None
    version: str | None
    cache: ModelCache
    poll_seconds: float
    on_change: Callable[[LoadedModel | None, LoadedModel], None] | None = None
    on_failure: Callable[[str], None] | None = None
    current: LoadedModel | None = None
    last_error: str | None = None
    last_checked: float | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def wanted(self) -> str | None:
        """The version to serve now: the pinned one, or the alias's in the registry (None when unset)."""
        if self.version is not None:
            return self.version
        return tracking.alias_version(self.name, self.alias or "champion")

    def reload(self) -> ReloadOutcome:
        """Resolve the version now; load, warm and swap it in when it differs from the served one."""
        with self._lock:  # the poller and POST /reload never load the same version twice at once
            served = self.current.version if self.current else None
            try:
                target = self.wanted()
                self.last_checked = time.time()
                if target is None:
                    raise LookupError(f"registered model {self.name!r} has no alias {self.alias!r}")
                if target == served:
                    self.last_error = None
                    return ReloadOutcome(version=served, changed=False)
                loaded = load_version(self.cache, self.name, target, None if self.version else self.alias)
            except Exception as exc:  # noqa: BLE001  (any failure keeps the old version serving)
                self.last_error = f"{type(exc).__name__}: {exc}".splitlines()[0][:500]
                log.error("nightshift serve: could not load %s (%s); still serving version %s",
                          self.name, self.last_error, served)
                if self.on_failure:
                    self.on_failure(self.last_error)
                return ReloadOutcome(version=served, changed=False, error=self.last_error)
            before, self.current = self.current, loaded  # the swap: one reference assignment
            self.last_error = None
            log.info("nightshift serve: %s version %s -> %s (loaded and warmed in %.2fs)",
                     self.name, served, loaded.version, loaded.load_seconds)
            if self.on_change:
                self.on_change(before, loaded)
            return ReloadOutcome(version=loaded.version, changed=True)

    def start(self) -> None:
        """Load now and keep following the alias in a daemon thread (a pinned version is loaded once)."""
        self._thread = threading.Thread(target=self._follow, name="nightshift-serve-poll", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _follow(self) -> None:
        while not self._stop.is_set():
            self.reload()
            if self.version is not None and self.current is not None:
                return  # pinned and loaded: nothing will change
            self._stop.wait(self.poll_seconds)
