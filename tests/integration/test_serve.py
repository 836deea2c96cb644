"""``nightshift serve`` as a real process (``python -m tasks.serve``) on a free loopback port, against the
embedded SQLite registry with two tiny registered versions (built as in tests/unit/test_serve.py).

- it answers /predict for a batch with the champion's version, and stays up after bad requests;
- moving the alias switches it within its poll interval, with concurrent clients seeing no failure;
- killed (SIGKILL) while it reloads a new version and started again, it serves that version whole:
  the interrupted download left nothing a later start would take for a complete version.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _unit_helpers():
    spec = importlib.util.spec_from_file_location("serve_unit_helpers", ROOT / "tests" / "unit" / "test_serve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


helpers = _unit_helpers()


@pytest.fixture(scope="module")
def versions(tmp_path_factory: pytest.TempPathFactory):
    """The unit tests' registry (tiny versions 1, 2 and a broken 3) in a module-wide home; champion -> 1."""
    from tasks.core import tracking

    with helpers.registry_home(tmp_path_factory.mktemp("serve-process")) as bundles:
        tracking.set_alias("tiny", "champion", "1")
        yield bundles, Path(os.environ["NIGHTSHIFT_HOME"])


def start(home: Path, port: int, poll: float = 0.5) -> subprocess.Popen:
    from tasks.core import tracking

    env = {**os.environ, "NIGHTSHIFT_HOME": str(home), "MLFLOW_TRACKING_URI": tracking.tracking_uri()}
    env.pop("NIGHTSHIFT_SERVE_TOKEN", None)
    return subprocess.Popen([sys.executable, "-m", "tasks.serve", "--model", "tiny", "--port", str(port),
                             "--poll-seconds", str(poll), "--log-level", "warning"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def wait_version(port: int, version: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            status, body = call(port, "GET", "/ready")
            if status == 200 and body["version"] == version:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server on {port} never served version {version}")


def call(port: int, method: str, path: str, body: bytes | None = None):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        raw = response.read()
        return response.status, json.loads(raw) if raw.startswith(b"{") else raw
    finally:
        conn.close()


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_serves_the_champion_follows_the_alias_and_survives_a_kill_during_reload(versions) -> None:
    from tasks.core import tracking

    bundles, home = versions
    port = helpers.free_port()
    server = start(home, port)
    try:
        wait_version(port, "1")
        texts = helpers.keyword_texts(5, seed=3)
        status, body = call(port, "POST", "/predict", json.dumps({"texts": texts}).encode())
        assert status == 200 and body["version"] == "1" and len(body["predictions"]) == 5
        expected = helpers.offline(bundles["1"], texts)["label"].tolist()
        assert [p["label"] for p in body["predictions"]] == expected
        for bad in (b"{", b'{"texts": []}', b'{"texts": [1]}', json.dumps({"texts": ["x" * 20_000]}).encode(),
                    b'{"texts": ["' + b"x" * 1_100_000 + b'"]}'):
            assert call(port, "POST", "/predict", bad)[0] in (413, 422)
        assert call(port, "GET", "/health")[0] == 200

        failures, answers, done = [], [], threading.Event()

        def client() -> None:
            payload = json.dumps({"texts": texts[:2]}).encode()
            while not done.is_set():
                try:
                    status, body = call(port, "POST", "/predict", payload)
                    (answers if status == 200 else failures).append(body if status == 200 else status)
                except OSError as exc:
                    failures.append(repr(exc))

        clients = [threading.Thread(target=client) for _ in range(3)]
        for c in clients:
            c.start()
        tracking.set_alias("tiny", "champion", "2")
        wait_version(port, "2", timeout=30)  # the poller alone: no /reload
        time.sleep(0.5)
        done.set()
        for c in clients:
            c.join(timeout=30)
        assert failures == [] and {a["version"] for a in answers} <= {"1", "2"} and answers[-1]["version"] == "2"
    finally:
        stop(server)

    # killed during a reload: the next start serves the moved alias from a whole download
    shutil_root = home / "serving" / "tiny"
    for version_dir in shutil_root.glob("1"):
        import shutil

        shutil.rmtree(version_dir)  # force a real download of version 1 below
    tracking.set_alias("tiny", "champion", "2")
    server = start(home, port, poll=0.2)
    try:
        wait_version(port, "2")
        tracking.set_alias("tiny", "champion", "1")
        time.sleep(0.25)  # the poller is now downloading / loading version 1
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()
    finally:
        stop(server)
    assert not (shutil_root / "1").exists() or (shutil_root / "1" / "MLmodel").exists()
    server = start(home, port)
    try:
        wait_version(port, "1")
        status, body = call(port, "POST", "/predict", json.dumps({"texts": texts}).encode())
        assert status == 200 and body["version"] == "1"
        assert [p["label"] for p in body["predictions"]] == expected
    finally:
        stop(server)
    assert list(shutil_root.glob(".partial-*")) == []
