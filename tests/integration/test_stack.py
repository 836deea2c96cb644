"""``nightshift stack``: the real PostgreSQL, Prefect server and MLflow server, as a user runs them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from infra import stack as infra_stack

from .conftest import Stack, assert_stack_gone

pytestmark = pytest.mark.integration


def request(url: str, auth: str | None = None, body: dict | None = None) -> tuple[int, bytes]:
    """(status, body) of a GET, or a JSON POST when ``body`` is given; ``auth`` is ``user:password``."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    if body is not None:
        req.add_header("Content-Type", "application/json")
    if auth is not None:
        req.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=20) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def mlflow_auth(stack: Stack) -> str:
    return f"{stack.env['MLFLOW_TRACKING_USERNAME']}:{stack.env['MLFLOW_TRACKING_PASSWORD']}"


def test_up_is_fast_and_says_how_to_log_in(stack: Stack) -> None:
    print(f"nightshift stack up took {stack.up_seconds:.1f} s")  # shown with -rP
    assert stack.up_seconds < 90, f"stack up took {stack.up_seconds:.1f} s"
    assert stack.prefect_url in stack.up_output and stack.mlflow_url in stack.up_output
    assert "PREFECT_API_AUTH_STRING" in stack.up_output and "MLFLOW_TRACKING_PASSWORD" in stack.up_output
    for secret in (stack.env["PREFECT_API_AUTH_STRING"], stack.env["MLFLOW_TRACKING_PASSWORD"]):
        assert secret not in stack.up_output  # never printed


def test_status_is_healthy(stack: Stack) -> None:
    done = stack.command("status")
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line.split() for line in done.stdout.splitlines()}
    assert set(rows) == set(infra_stack.SERVICES)
    for name, row in rows.items():
        assert row[1:3] == ["up", "healthy"], done.stdout
        assert f"pid {stack.pids()[name]}" in done.stdout


def test_env_lines_evaluate_to_stack_env(stack: Stack) -> None:
    done = stack.command("env")
    assert done.returncode == 0, done.stderr
    script = done.stdout + 'for v in ' + " ".join(infra_stack.ENV_KEYS) + '; do printf "%s=%s\\n" "$v" "$(printenv "$v")"; done'
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True, env={"PATH": os.environ["PATH"]})
    assert dict(line.split("=", 1) for line in out.stdout.splitlines()) == stack.env


def test_secrets_are_owner_only(stack: Stack) -> None:
    for path in (stack.paths.secrets, stack.paths.auth_ini):
        assert oct(path.stat().st_mode & 0o777) == oct(0o600), path


def test_prefect_refuses_unauthenticated_requests(stack: Stack) -> None:
    api = stack.env["PREFECT_API_URL"]
    assert request(f"{api}/flows/filter", body={})[0] == 401
    assert request(f"{api}/flows/filter", auth="admin:wrong-password", body={})[0] == 401
    status, body = request(f"{api}/flows/filter", auth=stack.env["PREFECT_API_AUTH_STRING"], body={})
    assert status == 200 and isinstance(json.loads(body), list)
    assert request(f"{api}/health")[0] == 200  # probes stay open


def test_mlflow_refuses_unauthenticated_requests(stack: Stack) -> None:
    search = f"{stack.env['MLFLOW_TRACKING_URI']}/api/2.0/mlflow/experiments/search?max_results=5"
    assert request(search)[0] == 401
    assert request(search, auth="admin:wrong-password-123")[0] == 401
    status, body = request(search, auth=mlflow_auth(stack))
    assert status == 200 and "experiments" in json.loads(body)
    assert request(f"{stack.env['MLFLOW_TRACKING_URI']}/")[0] == 401  # the UI too


def test_servers_bind_loopback_only(stack: Stack) -> None:
    # 127.0.0.2 is loopback too, but a server bound to 127.0.0.1 alone does not answer there
    for name, port in stack.ports().items():
        assert infra_stack.port_open("127.0.0.1", port), name
        assert not infra_stack.port_open("127.0.0.2", port), f"{name} listens beyond 127.0.0.1"


def test_postgres_runs_unprivileged(stack: Stack) -> None:
    pid = stack.pids()["postgres"]
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    uid = int(next(line for line in status if line.startswith("Uid:")).split()[1])
    assert uid != 0 or os.geteuid() != 0


def test_up_again_is_a_no_op(stack: Stack) -> None:
    before = stack.pids()
    t0 = time.monotonic()
    done = stack.command("up")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "already running" in done.stdout
    assert stack.pids() == before
    assert time.monotonic() - t0 < 20


def test_down_stops_everything_and_up_comes_back(stack: Stack) -> None:
    pids, ports = stack.pids(), stack.ports()
    assert set(pids) == set(infra_stack.SERVICES)
    done = stack.command("down", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_stack_gone(stack.home, pids, ports)
    assert stack.pids() == {}
    assert infra_stack.stack_env(stack.home) == {}
    assert stack.command("status").returncode == 1
    # the shared stack comes back for the tests that follow: same ports, same secrets, same data
    t0 = time.monotonic()
    done = stack.command("up")
    assert done.returncode == 0, done.stdout + done.stderr
    assert time.monotonic() - t0 < 90
    assert stack.ports() == ports
    assert infra_stack.stack_env(stack.home, timeout=5.0) == stack.env
