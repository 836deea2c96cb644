"""The fingerprinted store: atomic writes, replacement on a forced rerun, nothing half-written."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.store import ArtifactStore, StageKey, fingerprint


def write(store: ArtifactStore, fp: str, payload: str) -> None:
    with store.writer(StageKey("stage", fp, {}, [], 'test')) as w:
        (w.path / "data.txt").write_text(payload)
        w.write_manifest(rows={"n": len(payload)})


def test_existing_output_is_replaced_whole(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    fp = fingerprint("stage", {"a": 1}, [], "c")
    write(store, fp, "old")
    write(store, fp, "newer")
    assert (store.path("stage", fp) / "data.txt").read_text() == "newer"
    assert store.lookup("stage", fp).rows == {"n": 5}
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == [fp]  # no temp or old dirs left


def test_failed_write_leaves_previous_output_and_no_temp(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    fp = fingerprint("stage", {}, [], "c")
    write(store, fp, "kept")
    with pytest.raises(RuntimeError):
        with store.writer(StageKey("stage", fp, {}, [], 'test')) as w:
            (w.path / "data.txt").write_text("half")
            raise RuntimeError("stage crashed")
    assert (store.path("stage", fp) / "data.txt").read_text() == "kept"
    assert sorted(p.name for p in (tmp_path / "stage").iterdir()) == [fp]


def test_fingerprint_depends_on_every_part() -> None:
    base = fingerprint("s", {"a": 1}, ["x"], "code")
    assert base == fingerprint("s", {"a": 1}, ["x"], "code")
    assert len({base, fingerprint("t", {"a": 1}, ["x"], "code"), fingerprint("s", {"a": 2}, ["x"], "code"),
                fingerprint("s", {"a": 1}, ["y"], "code"), fingerprint("s", {"a": 1}, ["x"], "code2")}) == 5
