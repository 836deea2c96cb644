"""Benchmark: ``nightshift serve`` against ``mlflow models serve --env-manager local`` on the same registered model.

Run from the repository root, after a pipeline run registered a model in ``NIGHTSHIFT_HOME``::

    NIGHTSHIFT_HOME=/tmp/serve-home nice -n 5 .venv/bin/nightshift run --set train.epochs=1
    NIGHTSHIFT_HOME=/tmp/serve-home python bench/serve.py --json /tmp/nightshift-bench/serve.json \\
        [--model sst2] [--alias champion] [--clients 4] [--seconds 10] [--switch-seconds 60] [--rate 40]

1. **Closed loop.** Each server is started alone (one after the other, so they never share the CPU)
   on the version ``--alias`` points to, and warmed. ``--clients`` threads, each with its own
   keep-alive connection, send requests back to back for ``--seconds``: single sentences, then
   batches of 32 (SST-2 dev sentences). Per arm: p50 / p99 latency and throughput (requests/s and
   inputs/s). Both servers answer the same JSON over HTTP on loopback; MLflow's body is
   ``{"dataframe_records": [{"text": ...}]}``, ours ``{"texts": [...]}``.
2. **Switch under load** (ours only: MLflow's server cannot follow an alias). ``nightshift serve``
   follows a bench-only alias (``nightshift-bench``), never ``champion``, at a 1 s poll interval. A
   steady ``--rate`` requests/s is sent for ``--switch-seconds`` (open loop: latency counts from each
   request's scheduled time, so a stall is not hidden by a waiting client); halfway the alias moves to a
   second version (a registered copy of the same model when only one exists, so download, load, warm
   and swap all run). Reports errors (the target is 0), p50 / p99 over the whole run and in the 5 s
   after the move, and how long the server took to report the new version.

Result: ours = nightshift serve, baseline = mlflow models serve, ratio = our single-sentence
throughput over MLflow's (> 1: ours is better); every arm's figures and their ratios are in ``arms``,
the switch run in ``switch``.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tasks import canary

try:
    from bench import common
except ModuleNotFoundError:  # python bench/serve.py: bench/ itself is on the path
    import common  # type: ignore[no-redef]

DEV = common.ROOT / "data" / "sst2" / "dev.parquet"
BENCH_ALIAS = "nightshift-bench"
BATCH = 32


def sentences() -> list[str]:
    import pyarrow.parquet as pq

    return [str(s) for s in pq.read_table(DEV, columns=["sentence"]).column("sentence").to_pylist()]


# ------------------------------------------------------------------------------------------ the two servers


class Server:
    """One server process (its own process group, so stopping it stops MLflow's uvicorn child too)."""

    def __init__(self, kind: str, model: str, version: str, alias: str | None, threads: int | None, log: Path,
                 poll_seconds: float = 1.0):
        self.kind, self.port = kind, canary.free_port()
        bin_dir = str(Path(sys.executable).parent)
        # each server with its own defaults (torch's thread count for MLflow, ServeConfig.threads for ours)
        env = {**os.environ, "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
               "MLFLOW_DISABLE_TELEMETRY": "true"}
        if kind == "ours":
            which = ["--alias", alias] if alias else ["--version", version]
            cmd = [sys.executable, "-m", "tasks.serve", "--model", model, *which, "--port", str(self.port),
                   "--poll-seconds", str(poll_seconds), "--log-level", "warning",
                   *(["--threads", str(threads)] if threads else [])]
        else:
            from tasks.core.settings import get_settings

            env["MLFLOW_TRACKING_URI"] = env.get("MLFLOW_TRACKING_URI") or get_settings().tracking_uri
            cmd = [str(Path(bin_dir) / "mlflow"), "models", "serve", "-m", f"models:/{model}/{version}",
                   "--env-manager", "local", "--host", "127.0.0.1", "--port", str(self.port)]
        self.log = log.open("w")
        self.process = subprocess.Popen(cmd, cwd=common.ROOT, env=env, stdout=self.log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)
        self.started = time.perf_counter()

    def wait_ready(self, timeout: float = 180) -> float:
        if self.kind == "ours":  # the canary's wait: /ready answers 200, the process alive, a load error fails fast
            try:
                canary.wait_ready(f"http://127.0.0.1:{self.port}", self.process, timeout, Path(self.log.name), poll_s=0.2)
            except canary.InfraValidationError as exc:
                raise RuntimeError(f"ours server: {exc}; see {self.log.name}") from None
            return time.perf_counter() - self.started
        path = "/ping"  # MLflow's server has no /ready
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.kind} server exited ({self.process.returncode}); see {self.log.name}")
            try:
                if request(self.port, "GET", path)[0] == 200:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"{self.kind} server not ready after {timeout}s; see {self.log.name}")

    def body(self, texts: list[str]) -> bytes:
        if self.kind == "ours":
            return json.dumps({"texts": texts}).encode()
        return json.dumps({"dataframe_records": [{"text": t} for t in texts]}).encode()

    @property
    def path(self) -> str:
        return "/predict" if self.kind == "ours" else "/invocations"

    def stop(self) -> None:
        canary.stop(self.process, timeout_s=20, group=True)
        self.log.close()


def request(port: int, method: str, path: str, body: bytes | None = None, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# ------------------------------------------------------------------------------------------ load


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def latency_summary(latencies: list[float], seconds: float, inputs_per_request: int, errors: int) -> dict[str, Any]:
    ms = [x * 1000 for x in latencies]
    return {"requests": len(ms), "errors": errors, "seconds": round(seconds, 3),
            "p50_ms": _r(percentile(ms, 50)), "p90_ms": _r(percentile(ms, 90)), "p99_ms": _r(percentile(ms, 99)),
            "mean_ms": _r(statistics.fmean(ms)) if ms else None,
            "requests_per_s": round(len(ms) / seconds, 2), "inputs_per_s": round(len(ms) * inputs_per_request / seconds, 2)}


def _r(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def closed_loop(server: Server, texts: list[str], batch: int, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` threads send back to back for ``seconds`` (after 1 s of unmeasured warm-up)."""
    bodies = [server.body(texts[i:i + batch]) for i in range(0, len(texts) - batch + 1, batch)]
    latencies: list[float] = []
    errors = [0]
    start_at = time.perf_counter() + 1.0
    stop_at = start_at + seconds
    lock = threading.Lock()

    def client(index: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        mine, failed, i = [], 0, index
        while True:
            body = bodies[i % len(bodies)]
            i += clients
            t0 = time.perf_counter()
            if t0 >= stop_at:
                break
            try:
                conn.request("POST", server.path, body, {"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                ok = response.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            t1 = time.perf_counter()
            if t0 >= start_at:
                if ok:
                    mine.append(t1 - t0)
                else:
                    failed += 1
        with lock:
            latencies.extend(mine)
            errors[0] += failed

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return latency_summary(latencies, seconds, batch, errors[0])


def steady_with_switch(server: Server, texts: list[str], rate: float, seconds: float, model: str,
                       to_version: str, workers: int = 8) -> dict[str, Any]:
    """Open loop at ``rate`` requests/s for ``seconds``; the bench alias moves to ``to_version`` halfway."""
    from tasks.core import tracking

    interval = 1.0 / rate
    total = int(rate * seconds)
    t_start = time.perf_counter() + 0.5
    next_index = [0]
    lock = threading.Lock()
    results: list[tuple[float, float, bool, str | None]] = []  # (scheduled offset, latency, ok, version)

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        while True:
            with lock:
                i = next_index[0]
                next_index[0] += 1
            if i >= total:
                return
            scheduled = t_start + i * interval
            delay = scheduled - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            version = None
            try:
                conn.request("POST", server.path, server.body([texts[i % len(texts)]]), {"Content-Type": "application/json"})
                response = conn.getresponse()
                payload = response.read()
                ok = response.status == 200
                if ok:
                    version = json.loads(payload)["version"]
            except (OSError, http.client.HTTPException, ValueError):
                ok = False
                conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            done = time.perf_counter()
            with lock:
                results.append((scheduled - t_start, done - scheduled, ok, version))

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    for t in threads:
        t.start()
    time.sleep(max(0.0, t_start + seconds / 2 - time.perf_counter()))
    moved_at = time.perf_counter() - t_start
    tracking.set_alias(model, BENCH_ALIAS, to_version)
    switched_after = None
    while time.perf_counter() - t_start < seconds:
        status, body = request(server.port, "GET", "/ready")
        if status == 200 and json.loads(body)["version"] == to_version:
            switched_after = time.perf_counter() - t_start - moved_at
            break
        time.sleep(0.05)
    for t in threads:
        t.join()
    latencies = [lat for _, lat, ok, _ in results if ok]
    window = [lat * 1000 for offset, lat, ok, _ in results if ok and moved_at <= offset < moved_at + 5]
    versions = [v for *_, v in sorted(results)]
    return {
        "rate_per_s": rate, "seconds": seconds, "requests": len(results),
        "errors": sum(1 for *_, ok, _ in results if not ok),
        "p50_ms": _r(percentile([x * 1000 for x in latencies], 50)),
        "p99_ms": _r(percentile([x * 1000 for x in latencies], 99)),
        "max_ms": _r(max(latencies) * 1000) if latencies else None,
        "p99_ms_5s_after_move": _r(percentile(window, 99)),
        "alias_moved_at_s": round(moved_at, 3),
        "server_switched_after_s": None if switched_after is None else round(switched_after, 3),
        "answers_by_version": {v: versions.count(v) for v in sorted({v for v in versions if v})},
        "last_version": next((v for v in reversed(versions) if v), None),
    }


# ------------------------------------------------------------------------------------------ the run


def second_version(model: str, version: str) -> str:
    """A registered copy of ``version`` (same source, a new version number), made once and reused."""
    from tasks.core import tracking

    tag = f"copy of {version}"
    existing = tracking.find_version(model, "nightshift.bench", tag)
    if existing is not None:
        return existing
    info = tracking.version_info(model, version)
    return tracking.register_version(info["source"], model, info["run_id"], {"nightshift.bench": tag})


def run_benchmark(model: str, alias: str, clients: int, seconds: float, switch_seconds: float, rate: float,
                  threads: int | None, logs: Path, skip_baseline: bool = False) -> dict[str, Any]:
    from tasks.core import tracking

    tracking.configure()
    version = tracking.alias_version(model, alias)
    if version is None:
        raise SystemExit(f"bench/serve.py: {model} has no alias {alias!r}: run the pipeline first")
    texts = sentences()
    logs.mkdir(parents=True, exist_ok=True)
    arms: dict[str, dict[str, Any]] = {}
    startup: dict[str, float] = {}
    for kind in ("ours",) if skip_baseline else ("ours", "baseline"):
        server = Server("ours" if kind == "ours" else "mlflow", model, version, None, threads, logs / f"{kind}.log")
        try:
            startup[kind] = round(server.wait_ready(), 2)
            for name, batch in (("single", 1), (f"batch{BATCH}", BATCH)):
                closed_loop(server, texts, batch, clients, min(2.0, seconds))  # warm both paths first
                arms.setdefault(name, {})[kind] = closed_loop(server, texts, batch, clients, seconds)
        finally:
            server.stop()
    for figures in arms.values():
        if "baseline" in figures:
            figures["throughput_ratio"] = round(figures["ours"]["requests_per_s"] / figures["baseline"]["requests_per_s"], 2)
            figures["p50_ratio"] = round(figures["baseline"]["p50_ms"] / figures["ours"]["p50_ms"], 2)
    # one client, one sentence at a time: the latency a lone caller sees
    lone: dict[str, Any] = {}
    for kind in ("ours",) if skip_baseline else ("ours", "baseline"):
        server = Server("ours" if kind == "ours" else "mlflow", model, version, None, threads, logs / f"{kind}-lone.log")
        try:
            server.wait_ready()
            closed_loop(server, texts, 1, 1, 1.0)
            lone[kind] = closed_loop(server, texts, 1, 1, seconds)
        finally:
            server.stop()

    other = second_version(model, version)
    tracking.set_alias(model, BENCH_ALIAS, version)
    server = Server("ours", model, version, BENCH_ALIAS, threads, logs / "switch.log", poll_seconds=1.0)
    try:
        server.wait_ready()
        switch = steady_with_switch(server, texts, rate, switch_seconds, model, other)
        switch.update({"from_version": version, "to_version": other})
    finally:
        server.stop()
        tracking.delete_alias(model, BENCH_ALIAS)

    ours_single = arms["single"]["ours"]
    base_single = arms["single"].get("baseline")
    return {
        "name": "serve",
        "model": f"models:/{model}/{version}",
        "clients": clients,
        "ours": {"server": "nightshift serve", **ours_single, "startup_s": startup.get("ours")},
        "baseline": None if base_single is None else {"server": "mlflow models serve --env-manager local",
                                                       **base_single, "startup_s": startup.get("baseline")},
        "ratio": arms["single"].get("throughput_ratio"),
        "unit": "single-sentence requests/s, ours over baseline (closed loop)",
        "arms": arms,
        "lone_client": lone,
        "switch": switch,
        "threads": threads,
        "machine": common.machine(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="Write the result here.")
    parser.add_argument("--model", default="sst2", help="Registered model (default: sst2).")
    parser.add_argument("--alias", default="champion", help="Benchmark the version this alias names.")
    parser.add_argument("--clients", type=int, default=4, help="Concurrent closed-loop clients.")
    parser.add_argument("--seconds", type=float, default=10.0, help="Measured seconds per closed-loop arm.")
    parser.add_argument("--switch-seconds", type=float, default=60.0, help="Length of the steady run with the switch.")
    parser.add_argument("--rate", type=float, default=40.0, help="Requests/s of the steady run.")
    parser.add_argument("--threads", type=int, help="torch threads of ours (default: its own, 1); MLflow keeps torch's.")
    parser.add_argument("--logs", type=Path, default=Path("/tmp/nightshift-bench/serve-logs"), help="Server logs.")
    parser.add_argument("--skip-baseline", action="store_true", help="Only ours (no mlflow models serve).")
    args = parser.parse_args(argv)
    from tasks.core.environment import apply_defaults

    apply_defaults()
    result = run_benchmark(args.model, args.alias, args.clients, args.seconds, args.switch_seconds, args.rate,
                           args.threads, args.logs, args.skip_baseline)
    path = common.write_result(args.json, result)
    rows = [("arm", "server", "p50 ms", "p99 ms", "req/s", "inputs/s")]
    for arm, figures in result["arms"].items():
        for kind in ("ours", "baseline"):
            if kind in figures:
                f = figures[kind]
                rows.append((arm, kind, str(f["p50_ms"]), str(f["p99_ms"]), str(f["requests_per_s"]), str(f["inputs_per_s"])))
    print(common.table(rows))
    s = result["switch"]
    print(f"switch: {s['requests']} requests at {s['rate_per_s']}/s, {s['errors']} errors, p99 {s['p99_ms']} ms "
          f"(5 s after the move: {s['p99_ms_5s_after_move']} ms), switched after {s['server_switched_after_s']} s")
    print(f"ratio (single-sentence throughput, ours / mlflow): {result['ratio']}; written to {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
