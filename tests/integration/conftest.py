"""The real stack for integration tests: one ``nightshift stack up`` per session, in a temporary NIGHTSHIFT_HOME.

The stack is driven through its command line (``python -m infra.stack``) in a child process, as a
user would run it, so its servers are not children of pytest. It is always brought down at the end.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from infra import stack as infra_stack

ROOT = Path(__file__).resolve().parents[2]
UP_TIMEOUT_S = 240  # the command's own health timeout is 90 s; this only guards against a hang


@dataclass(frozen=True)
class Stack:
    """A running stack: the client variables, both UI addresses, its NIGHTSHIFT_HOME, how long ``up`` took."""

    home: Path
    env: dict[str, str]
    prefect_url: str
    mlflow_url: str
    up_seconds: float
    up_output: str

    @property
    def paths(self) -> infra_stack.StackPaths:
        return infra_stack.StackPaths.for_home(self.home)

    def command(self, *args: str, timeout: float = UP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``nightshift stack <args>`` against this stack's home."""
        return run_stack_command(self.home, *args, timeout=timeout)

    def pids(self) -> dict[str, int]:
        """Service -> pid, as recorded in the stack's pid files."""
        return {name: pid for name in infra_stack.SERVICES
                if (pid := infra_stack.read_pid(self.paths.pid_file(name))) is not None}

    def ports(self) -> dict[str, int]:
        """Service -> port, as recorded in stack.json."""
        state = infra_stack.read_state(self.paths)
        assert state is not None
        return {name: int(port) for name, port in state["ports"].items() if port}


def stack_command_env(home: Path) -> dict[str, str]:
    """The test process's environment pointed at ``home``, without client variables of some other stack."""
    env = {k: v for k, v in os.environ.items() if k not in infra_stack.ENV_KEYS and k != "PREFECT_API_KEY"}
    env["NIGHTSHIFT_HOME"] = str(home)
    return env


def run_stack_command(home: Path, *args: str, timeout: float = UP_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
    """``python -m infra.stack <args>`` from the project root, output captured."""
    return subprocess.run([sys.executable, "-m", "infra.stack", *args], cwd=ROOT, env=stack_command_env(home),
                          capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def log_tails(home: Path, lines: int = 30) -> str:
    """The last lines of every stack log, for a failure message."""
    logs = infra_stack.StackPaths.for_home(home).logs
    parts = []
    for log in sorted(logs.glob("*.log")) if logs.exists() else []:
        tail = log.read_text(errors="replace").splitlines()[-lines:]
        parts.append(f"--- {log.name}\n" + "\n".join(tail))
    return "\n".join(parts)


def assert_stack_gone(home: Path, pids: dict[str, int], ports: dict[str, int]) -> None:
    """No recorded process (nor anything of its process group) runs, and no port of the stack accepts connections."""
    for name, pid in pids.items():
        assert not infra_stack.process_alive(pid), f"{name} (pid {pid}) still runs after down"
        assert infra_stack.group_members(pid) == [], f"processes of {name}'s group still run after down"
    for name, port in ports.items():
        assert not infra_stack.port_open("127.0.0.1", port), f"port {port} of {name} still open after down"


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Bring the stack up once (free ports, temporary home), yield it, and always bring it down."""
    home = tmp_path_factory.mktemp("nightshift-stack")
    ports = [free_port() for _ in range(3)]
    args = ["up", "--postgres-port", str(ports[0]), "--prefect-port", str(ports[1]), "--mlflow-port", str(ports[2])]
    t0 = time.monotonic()
    try:
        done = run_stack_command(home, *args)
        elapsed = time.monotonic() - t0
        if done.returncode != 0:
            pytest.fail(f"nightshift stack up failed ({done.returncode}):\n{done.stdout}{done.stderr}\n{log_tails(home)}")
        env = infra_stack.stack_env(home, environ=stack_command_env(home), timeout=5.0)
        assert set(env) == set(infra_stack.ENV_KEYS), f"stack_env gave {sorted(env)}\n{done.stdout}"
        state = infra_stack.read_state(infra_stack.StackPaths.for_home(home))
        assert state is not None
        yield Stack(home=home, env=env, prefect_url=infra_stack.prefect_url(state),
                    mlflow_url=infra_stack.mlflow_url(state), up_seconds=elapsed, up_output=done.stdout)
    finally:
        paths = infra_stack.StackPaths.for_home(home)
        pids = {n: p for n in infra_stack.SERVICES if (p := infra_stack.read_pid(paths.pid_file(n))) is not None}
        state = infra_stack.read_state(paths)
        down = run_stack_command(home, "down", timeout=120)
        assert down.returncode == 0, down.stdout + down.stderr
        assert_stack_gone(home, pids, {n: int(p) for n, p in (state or {}).get("ports", {}).items() if p})
