"""Infra validation (TFX's InfraValidator, for any Nightshift bundle): serve a version in a real server first.

Before ``champion`` moves, the challenger version is served by a fresh ``nightshift serve`` process
(``python -m tasks.serve --model NAME --version N``) on a free loopback port. The checks, in order,
each named in the error when it fails:

- ``load``: the process starts, loads the version from the registry and answers ``/ready`` with that
  version within ``deploy.canary_start_timeout_s`` (a bundle that only loads inside the pipeline's
  process, a missing file, a missing dependency fail here);
- ``predictions``: one request per canary input, then one request with all of them, answer exactly
  the offline predictions (``label`` of each output row);
- ``latency``: the p99 of the single-input requests is within ``deploy.max_p99_ms``;
- ``memory``: the server's resident memory (its children included) stays within ``deploy.max_rss_mb``.

The process is always stopped (terminate, then kill after 10 s). :func:`wait_for_version` is the
check of a live server after the alias moved (``deploy.server_url``).

``tasks.deploy.validator`` runs :func:`validate` for the deploy stage and ``nightshift promote``; run
alone on a registered version::

    python -c "from tasks.canary import validate; from tasks.core.config import DeployConfig; \
               print(validate('sst2', '3', ['a fine film'], ['positive'], 'text', DeployConfig()))"
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from tasks.core.config import DeployConfig
from tasks.serving.config import REQUEST_KEYS

TOKEN_ENV = "NIGHTSHIFT_SERVE_TOKEN"
CHECKS = ("load", "predictions", "latency", "memory", "switch")


class CanaryReport(BaseModel):
    """What the canary server did: the figures MLflow gets."""

    model_config = ConfigDict(frozen=True)

    model: str = Field(description="Registered model name.")
    version: str = Field(description="The version asked for.")
    served_version: str | None = Field(default=None, description="The version the server reported on /ready.")
    port: int = Field(description="The loopback port it listened on.")
    startup_s: float | None = Field(default=None, description="Seconds from start to /ready.")
    requests: int = Field(default=0, description="Single-input requests sent.")
    latencies_ms: list[float] = Field(default_factory=list, description="Latency of each single-input request (ms).")
    p50_ms: float | None = Field(default=None, description="Median single-request latency (ms).")
    p99_ms: float | None = Field(default=None, description="99th percentile single-request latency (ms).")
    batch_ms: float | None = Field(default=None, description="Latency of the one request with every canary input (ms).")
    rss_mb: float | None = Field(default=None, description="Peak resident memory of the server process tree (MiB).")
    mismatches: list[int] = Field(default_factory=list, description="Canary rows whose served label differs from the offline one.")
    failed_check: str | None = Field(default=None, description="The check that failed (load, predictions, latency, memory), or None.")


class InfraValidationError(RuntimeError):
    """A check of infra validation failed; ``check`` names it, ``report`` holds what was measured."""

    def __init__(self, check: str, message: str, report: CanaryReport | None = None):
        super().__init__(f"infra validation failed: {check}: {message}")
        self.check, self.detail, self.report = check, message, report


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def serve_command(name: str, version: str, host: str, port: int) -> list[str]:
    """The canary's command line: the same server users run, pinned to one version."""
    return [sys.executable, "-m", "tasks.serve", "--model", name, "--version", str(version), "--host", host,
            "--port", str(port)]


def _headers() -> dict[str, str]:
    token = os.environ.get(TOKEN_ENV)
    return {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}


def http_json(url: str, body: Any = None, timeout: float = 30.0, method: str | None = None) -> tuple[int, Any]:
    """(status, decoded JSON or text) of one request; connection errors raise ``OSError``."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers=_headers(), method=method or ("POST" if data else "GET"))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, raw = response.status, response.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")[:300]


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children (MiB); 0 when it is gone."""
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


def _tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])[:500]


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0, group: bool = False) -> None:
    """Terminate the server; kill it when it has not exited after ``timeout_s``.

    ``group``: signal the process group (a server started with ``start_new_session=True`` whose
    children, like ``mlflow models serve``'s uvicorn, must stop with it).
    """
    def send(sig: signal.Signals) -> None:
        if group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)

    if proc.poll() is not None:
        return
    send(signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        proc.wait(timeout=timeout_s)


def wait_ready(base: str, proc: subprocess.Popen[bytes] | None, timeout_s: float, log: Path | None = None,
               poll_s: float = 0.25) -> dict[str, Any]:
    """Poll ``GET /ready`` every ``poll_s`` until it answers 200; fail when the process exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    last = "no answer"
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise InfraValidationError("load", f"the server exited with code {proc.returncode} before it was ready"
                                               + (f": {_tail(log)}" if log else ""))
        try:
            status, body = http_json(f"{base}/ready", timeout=5)
            if status == 200 and isinstance(body, dict):
                return body
            if isinstance(body, dict) and body.get("load_error"):  # it tried and failed: no point in waiting on
                raise InfraValidationError("load", f"the server could not load the version: {body['load_error']}")
            last = f"/ready answered {status}: {str(body)[:200]}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(poll_s)
    raise InfraValidationError("load", f"not ready after {timeout_s:g}s (deploy.canary_start_timeout_s); last: {last}"
                                       + (f"; log: {_tail(log)}" if log else ""))


def _labels(body: Any, n: int) -> list[str]:
    if not isinstance(body, dict) or not isinstance(body.get("predictions"), list) or len(body["predictions"]) != n:
        raise InfraValidationError("predictions", f"expected {n} predictions, got {str(body)[:200]}")
    return [str(row.get("label")) if isinstance(row, dict) else str(row) for row in body["predictions"]]


def probe(base: str, name: str, version: str, inputs: list[Any], expected: list[str], column: str,
          cfg: DeployConfig, report: dict[str, Any], pid: int | None = None) -> None:
    """Send the canary requests to a ready server and check predictions, latency and memory (fills ``report``)."""
    if column not in REQUEST_KEYS:
        raise InfraValidationError("predictions", f"the server takes no request key for input column {column!r} "
                                                  f"(keys: {', '.join(REQUEST_KEYS.values())})")
    key = REQUEST_KEYS[column]
    latencies, got = [], []
    for item in inputs:
        started = time.perf_counter()
        status, body = http_json(f"{base}/predict", {key: [item]})
        latencies.append(round((time.perf_counter() - started) * 1000, 3))
        if status != 200:
            raise InfraValidationError("predictions", f"/predict answered {status}: {str(body)[:200]}")
        got.extend(_labels(body, 1))
    report.update(requests=len(latencies), latencies_ms=latencies, p50_ms=float(np.percentile(latencies, 50)),
                  p99_ms=float(np.percentile(latencies, 99)))
    started = time.perf_counter()
    status, body = http_json(f"{base}/predict", {key: list(inputs)})
    report["batch_ms"] = round((time.perf_counter() - started) * 1000, 3)
    if status != 200:
        raise InfraValidationError("predictions", f"/predict of {len(inputs)} inputs answered {status}: {str(body)[:200]}")
    batch = _labels(body, len(inputs))
    served = body.get("version")
    if served is not None and str(served) != str(version):
        raise InfraValidationError("predictions", f"/predict answered with version {served}, not {version}")
    mismatches = sorted({i for i, (s, b, e) in enumerate(zip(got, batch, expected)) if s != e or b != e})
    report["mismatches"] = mismatches
    if mismatches:
        i = mismatches[0]
        raise InfraValidationError("predictions", f"served predictions differ from the offline ones at canary rows "
                                                  f"{mismatches[:10]} (row {i}: served {got[i]!r}, offline {expected[i]!r})")
    if report["p99_ms"] > cfg.max_p99_ms:
        raise InfraValidationError("latency", f"p99 {report['p99_ms']:.1f} ms > deploy.max_p99_ms {cfg.max_p99_ms:g}")
    if pid is not None:
        report["rss_mb"] = round(max(report.get("rss_mb") or 0.0, rss_mb(pid)), 1)
        if report["rss_mb"] > cfg.max_rss_mb:
            raise InfraValidationError("memory", f"server RSS {report['rss_mb']:.0f} MiB > deploy.max_rss_mb "
                                                 f"{cfg.max_rss_mb:g}")


def validate(
    name: str, version: str, inputs: list[Any], expected: list[str], column: str, cfg: DeployConfig,
    command: Callable[[str, str, str, int], list[str]] = serve_command, host: str = "127.0.0.1",
) -> CanaryReport:
    """Serve ``name`` v``version`` in a fresh process and run every check; return the report.

    Raises :class:`InfraValidationError` (``check`` = load | predictions | latency | memory) with the
    report so far. The process is stopped whatever happens.
    """
    if len(inputs) != len(expected) or not inputs:
        raise ValueError(f"canary: {len(inputs)} inputs for {len(expected)} expected predictions")
    port = free_port(host)
    base = f"http://{host}:{port}"
    report: dict[str, Any] = {"model": name, "version": str(version), "port": port}
    with tempfile.TemporaryDirectory(prefix="nightshift-canary-") as tmp:
        log = Path(tmp) / "server.log"
        started = time.perf_counter()
        with log.open("wb") as out:
            proc = subprocess.Popen(command(name, str(version), host, port), stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=dict(os.environ))
        try:
            ready = wait_ready(base, proc, cfg.canary_start_timeout_s, log)
            report["startup_s"] = round(time.perf_counter() - started, 3)
            report["served_version"] = None if ready.get("version") is None else str(ready["version"])
            report["rss_mb"] = round(rss_mb(proc.pid), 1)
            if report["served_version"] != str(version):
                raise InfraValidationError("load", f"/ready reports version {report['served_version']}, not {version}")
            probe(base, name, str(version), inputs, expected, column, cfg, report, proc.pid)
        except InfraValidationError as exc:
            raise InfraValidationError(exc.check, exc.detail,
                                       CanaryReport(**report, failed_check=exc.check)) from None
        except OSError as exc:  # the server died mid-request
            raise InfraValidationError("load", f"{type(exc).__name__}: {exc}; log: {_tail(log)}",
                                       CanaryReport(**report, failed_check="load")) from None
        finally:
            stop(proc)
    return CanaryReport(**report)


def wait_for_version(server_url: str, version: str, timeout_s: float) -> float:
    """Tell a live server to ``/reload`` and wait until ``/ready`` reports ``version``; return the seconds.

    Raises :class:`InfraValidationError` (``switch``) when it does not within ``timeout_s``.
    """
    base = server_url.rstrip("/")
    started = time.monotonic()
    last = "no answer"
    try:
        status, body = http_json(f"{base}/reload", {}, timeout=min(timeout_s, 60))
        last = f"/reload answered {status}: {str(body)[:200]}"
    except OSError as exc:
        last = f"/reload: {type(exc).__name__}: {exc}"
    while time.monotonic() - started < timeout_s:
        try:
            status, body = http_json(f"{base}/ready", timeout=5)
            if status == 200 and isinstance(body, dict) and str(body.get("version")) == str(version):
                return round(time.monotonic() - started, 3)
            last = f"/ready answered {status}: {str(body)[:200]}"
        except OSError as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.5)
    raise InfraValidationError("switch", f"{base} did not report version {version} within {timeout_s:g}s "
                                         f"(deploy.switch_timeout_s); last: {last}")
