"""The release lock with real processes: the second waits or is refused naming the holder; SIGKILL frees it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tasks.core.lock import LockTimeout, lock_path, release_lock

ROOT = Path(__file__).resolve().parents[2]
HOLD = """
import sys, time
from pathlib import Path
from tasks.core.lock import release_lock
root, name, seconds, marker = Path(sys.argv[1]), sys.argv[2], float(sys.argv[3]), Path(sys.argv[4])
with release_lock(root, name, 0, {"pid": __import__("os").getpid(), "host": "h", "user": "u", "command": "holder-cmd"}):
    marker.write_text("held")
    time.sleep(seconds)
    marker.write_text("done")  # still inside the lock
"""


def _holder(tmp_path: Path, seconds: float) -> tuple[subprocess.Popen[bytes], Path]:
    marker = tmp_path / f"held-{time.monotonic_ns()}"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path / "locks"), "clf", str(seconds), str(marker)],
                            cwd=ROOT)
    deadline = time.monotonic() + 60
    while not marker.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "the holder process did not take the lock"
        time.sleep(0.05)
    return proc, marker


def test_second_process_is_refused_naming_the_holder(tmp_path: Path) -> None:
    proc, _ = _holder(tmp_path, 60)
    try:
        with pytest.raises(LockTimeout) as err:
            with release_lock(tmp_path / "locks", "clf", 0.5, {"pid": os.getpid()}):
                pytest.fail("took a lock another process holds")
        assert f"pid {proc.pid}" in str(err.value) and "holder-cmd" in str(err.value)
        assert "deploy.lock_timeout_s" in str(err.value)
    finally:
        proc.kill()
        proc.wait()


def test_second_process_waits_until_the_holder_is_done(tmp_path: Path) -> None:
    proc, marker = _holder(tmp_path, 1.5)
    try:
        with release_lock(tmp_path / "locks", "clf", 120, {"pid": os.getpid()}):
            assert marker.read_text() == "done"  # we got it only after the holder had finished its body
    finally:
        proc.kill()
        proc.wait()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path: Path) -> None:
    proc, _ = _holder(tmp_path, 600)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert lock_path(tmp_path / "locks", "clf").read_text()  # its holder note is still in the file...
    with release_lock(tmp_path / "locks", "clf", 0, {"pid": os.getpid()}):  # ...but the kernel dropped the lock
        pass


def test_locks_are_per_model(tmp_path: Path) -> None:
    with release_lock(tmp_path, "a", 0, {}), release_lock(tmp_path, "b", 0, {}):
        with pytest.raises(LockTimeout):
            with release_lock(tmp_path, "a", 0, {}):  # a second descriptor in the same process conflicts too
                pass
