"""The release lock: one process at a time moves the aliases of one registered model.

An advisory ``fcntl.flock`` on ``$NIGHTSHIFT_HOME/locks/<model>.lock``. The kernel drops a flock when
the process holding it dies, however it dies (SIGKILL included), so a stale lock needs no expiry
time: the next run takes it at once. The holder writes who it is (pid, host, user, command, run) into
the file, and a run that gives up waiting names that holder.

Scope: one host, or hosts sharing ``$NIGHTSHIFT_HOME`` on a file system whose flock is reliable
across machines (local disks, not most NFS setups). Runs on several hosts against one registry are
serialised by the Prefect deployment's concurrency limit (one run per recipe, ENQUEUE) instead;
this lock then only guards runs started by hand beside it on the same host.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class LockTimeout(RuntimeError):
    """Another process held the release lock for longer than the caller would wait."""


def lock_path(root: Path, name: str) -> Path:
    """The lock file of model ``name`` under ``root`` (``$NIGHTSHIFT_HOME/locks``)."""
    return Path(root) / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', name)}.lock"


def holder_of(path: Path) -> str:
    """Who holds (or last held) the lock, as one line."""
    try:
        info = json.loads(Path(path).read_text() or "{}")
    except (OSError, ValueError):
        return "an unknown process"
    if not info:
        return "an unknown process"
    return (f"pid {info.get('pid')} on {info.get('host')} (user {info.get('user')}, since {info.get('since')}, "
            f"{info.get('command', '')})").strip()


@contextlib.contextmanager
def release_lock(root: Path, name: str, timeout_s: float, holder: dict[str, Any], poll_s: float = 0.2) -> Iterator[Path]:
    """Hold model ``name``'s release lock for the body; wait at most ``timeout_s`` (0: refuse at once).

    ``holder`` (pid, host, user, command, run ids) is written into the lock file for whoever waits.
    Raises :class:`LockTimeout` naming the holder when the wait runs out.
    """
    path = lock_path(root, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockTimeout(f"release lock of model {name!r} ({path}) is held by {holder_of(path)}; "
                                      f"gave up after {timeout_s:g}s (deploy.lock_timeout_s)") from None
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({**holder, "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                 default=str).encode(), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
