"""Benchmark: what Prefect and MLflow cost around the stages, and what an unchanged rerun costs.

Run from the repository root (offline; a few minutes on 2 cores)::

    python bench/overhead.py --json /tmp/nightshift-bench/overhead.json [--mode embedded --mode stack]

Each mode runs ``nightshift run`` twice, as a user does, in a fresh ``NIGHTSHIFT_HOME`` (an empty
stage cache): a cold run, then the same command again (an unchanged warm rerun: every stage a cache
hit). The recipe is SST-2 cut to ``--rows`` rows and one epoch, a small but real run.

- ``embedded``: Prefect's ephemeral API and MLflow on SQLite in that home (``nightshift run``'s default);
- ``stack``: the Prefect and MLflow servers of a running ``nightshift stack up`` (its client variables
  from ``nightshift stack env``), with the stage cache still in the fresh home.

Figures per mode, from the command's wall time and the run summary's ``timings_s`` (each stage's own
compute, measured inside the stage):

- ``overhead_fraction`` = (cold wall - sum of stage compute) / cold wall: interpreter start, imports,
  Prefect's API (ephemeral start-up or server calls), MLflow runs, params, artifacts and the model
  registration; target <= 0.10;
- ``warm_vs_cold`` = warm wall / cold wall; target <= 0.05.

The JSON is ``{"name", "ours", "baseline", "ratio", "unit", "machine", ...}``: ``ours`` the wall
times, ``baseline`` the stage compute sums, ``ratio`` = compute / wall of the embedded cold run
(> 1 is impossible; 1 would be no overhead at all).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

try:  # python -m bench.overhead
    from bench import common
except ModuleNotFoundError:  # python bench/overhead.py: bench/ itself is on the path
    import common  # type: ignore[no-redef]

TARGETS = {"overhead_fraction": ("<=", 0.10), "warm_vs_cold": ("<=", 0.05)}
MODES = ("embedded", "stack")
CLIENT_VARS = ("PREFECT_API_URL", "PREFECT_API_AUTH_STRING", "MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME",
               "MLFLOW_TRACKING_PASSWORD", "MLFLOW_REGISTRY_URI", "PREFECT_API_KEY")


def stage_compute(summary: Mapping[str, Any]) -> float:
    """Seconds the stages computed: every ``timings_s`` entry but ``total``."""
    return sum(float(v) for k, v in summary["timings_s"].items() if k != "total")


def figures(cold_wall: float, cold: Mapping[str, Any], warm_wall: float, warm: Mapping[str, Any]) -> dict[str, Any]:
    """One mode's figures from the two wall times and the two run summaries."""
    compute = stage_compute(cold)
    in_flow = float(cold["timings_s"]["total"])
    return {
        "cold_wall_s": round(cold_wall, 3),
        "cold_flow_s": round(in_flow, 3),  # the pipeline flow's own duration (no interpreter, no API start-up)
        "stage_compute_s": round(compute, 3),
        "stages_s": {k: v for k, v in cold["timings_s"].items() if k != "total"},
        "overhead_s": round(cold_wall - compute, 3),
        "overhead_fraction": round((cold_wall - compute) / cold_wall, 4),
        "in_flow_overhead_fraction": round((in_flow - compute) / cold_wall, 4),  # the part inside the flow
        "start_up_fraction": round((cold_wall - in_flow) / cold_wall, 4),  # before and after the flow
        "warm_wall_s": round(warm_wall, 3),
        "warm_flow_s": round(float(warm["timings_s"]["total"]), 3),
        "warm_vs_cold": round(warm_wall / cold_wall, 4),
        "warm_cache": warm["cache"],
    }


def verdicts(modes: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, bool]]:
    """Per mode and target: met or not."""
    ops = {"<=": lambda a, b: a <= b, ">=": lambda a, b: a >= b}
    return {mode: {name: ops[op](fig[name], bound) for name, (op, bound) in TARGETS.items()}
            for mode, fig in modes.items()}


def run_env(mode: str, home: Path, stack: Mapping[str, str] | None) -> dict[str, str]:
    """The environment of one ``nightshift run``: a fresh home; no server variables (embedded) or the stack's."""
    env = {k: v for k, v in os.environ.items() if k not in CLIENT_VARS}
    env["NIGHTSHIFT_HOME"] = str(home)
    if mode == "stack":
        assert stack, "stack mode needs the stack's client variables"
        env.update(stack)
    return env


def timed_run(args: list[str], env: Mapping[str, str], summary: Path) -> tuple[float, dict[str, Any]]:
    """Wall seconds of one ``nightshift run`` (the whole process) and its summary."""
    cmd = [sys.executable, "-m", "flows.cli", "run", *args, "--summary-json", str(summary)]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=common.ROOT, env=dict(env), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"nightshift run failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return wall, json.loads(summary.read_text())


def measure(mode: str, recipe_args: list[str], stack: Mapping[str, str] | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix=f"nightshift-overhead-{mode}-") as tmp:
        home = Path(tmp)
        env = run_env(mode, home, stack)
        cold_wall, cold = timed_run(recipe_args, env, home / "cold.json")
        warm_wall, warm = timed_run(recipe_args, env, home / "warm.json")
    if any(v != "hit" for k, v in warm["cache"].items()):
        print(f"warning: the warm rerun was not all cache hits: {warm['cache']}", file=sys.stderr)
    return figures(cold_wall, cold, warm_wall, warm)


def recipe_arguments(rows: int, epochs: int, name: str) -> list[str]:
    """SST-2 cut to ``rows`` rows and ``epochs`` epochs, under its own name (its own experiment and model)."""
    return ["--config", str(common.ROOT / "configs" / "sst2.yaml"), "--set", f"name={name}",
            "--set", f"data.max_rows={rows}", "--set", f"train.epochs={epochs}", "--set", "train.device=cpu"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="where to write the result")
    parser.add_argument("--mode", action="append", choices=MODES, help="embedded and/or stack (default: both)")
    parser.add_argument("--rows", type=int, default=8000, help="SST-2 train rows (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    modes = args.mode or list(MODES)
    stack = None
    if "stack" in modes:
        from infra.stack import stack_env

        stack = stack_env(timeout=5.0)
        if not stack:
            raise SystemExit("stack mode: no running stack under NIGHTSHIFT_HOME (`nightshift stack up`), "
                             "or pass --mode embedded")
    tag = time.strftime("%H%M%S")
    results = {}
    for mode in modes:
        print(f"{mode}: cold run, then the warm rerun ...", flush=True)
        results[mode] = measure(mode, recipe_arguments(args.rows, args.epochs, f"overhead-{mode}-{tag}"), stack)
        fig = results[mode]
        print(f"  cold {fig['cold_wall_s']:.1f} s (stages {fig['stage_compute_s']:.1f} s, overhead "
              f"{fig['overhead_fraction']:.1%}), warm {fig['warm_wall_s']:.1f} s ({fig['warm_vs_cold']:.1%} of cold)")
    first = results[modes[0]]
    result = {
        "name": "overhead",
        "unit": "s",
        "ours": {mode: {"cold_wall_s": f["cold_wall_s"], "warm_wall_s": f["warm_wall_s"]} for mode, f in results.items()},
        "baseline": {mode: {"stage_compute_s": f["stage_compute_s"]} for mode, f in results.items()},
        "ratio": round(first["stage_compute_s"] / first["cold_wall_s"], 4),
        "modes": results,
        "targets": {k: f"{op} {v}" for k, (op, v) in TARGETS.items()},
        "met": verdicts(results),
        "recipe": {"config": "configs/sst2.yaml", "data.max_rows": args.rows, "train.epochs": args.epochs},
        "machine": common.machine(),
    }
    print(f"wrote {common.write_result(args.json, result)}")


if __name__ == "__main__":
    main()
