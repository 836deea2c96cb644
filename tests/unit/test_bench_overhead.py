"""bench/overhead.py: the figures computed from wall times and run summaries, and the run environments."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("bench.overhead")


def summary(stages: dict[str, float], total: float, cache: str = "miss") -> dict:
    return {"timings_s": {**stages, "total": total}, "cache": {name: cache for name in stages}}


def test_figures_split_overhead_into_start_up_and_in_flow(bench: ModuleType) -> None:
    cold = summary({"ingest": 2.0, "train": 50.0, "evaluate": 8.0}, total=70.0)
    warm = summary({"ingest": 0.1, "train": 0.2, "evaluate": 0.1}, total=4.0, cache="hit")
    fig = bench.figures(cold_wall=80.0, cold=cold, warm_wall=12.0, warm=warm)
    assert fig["stage_compute_s"] == 60.0  # "total" is not a stage
    assert fig["overhead_s"] == 20.0 and fig["overhead_fraction"] == 0.25
    # the two parts add up to the whole: 10 s inside the flow, 10 s before/after it
    assert fig["in_flow_overhead_fraction"] == 0.125 and fig["start_up_fraction"] == 0.125
    assert fig["warm_vs_cold"] == 0.15 and fig["warm_cache"] == {"ingest": "hit", "train": "hit", "evaluate": "hit"}


def test_verdicts_against_the_targets(bench: ModuleType) -> None:
    met = bench.verdicts({"embedded": {"overhead_fraction": 0.08, "warm_vs_cold": 0.2},
                          "stack": {"overhead_fraction": 0.11, "warm_vs_cold": 0.05}})
    assert met == {"embedded": {"overhead_fraction": True, "warm_vs_cold": False},
                   "stack": {"overhead_fraction": False, "warm_vs_cold": True}}


def test_run_env_embedded_drops_server_variables_stack_sets_them(bench: ModuleType, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://elsewhere/api")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://elsewhere")
    embedded = bench.run_env("embedded", tmp_path, None)
    assert "PREFECT_API_URL" not in embedded and "MLFLOW_TRACKING_URI" not in embedded
    assert embedded["NIGHTSHIFT_HOME"] == str(tmp_path)
    stack = {"PREFECT_API_URL": "http://127.0.0.1:4200/api", "MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}
    env = bench.run_env("stack", tmp_path, stack)
    assert env["PREFECT_API_URL"] == stack["PREFECT_API_URL"] and env["NIGHTSHIFT_HOME"] == str(tmp_path)


def test_recipe_arguments_parse_as_a_recipe(bench: ModuleType) -> None:
    from tasks.registry import load_recipe

    args = bench.recipe_arguments(rows=500, epochs=1, name="overhead-x")
    config = Path(args[args.index("--config") + 1])
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    recipe = load_recipe(config, overrides)
    assert (recipe.name, recipe.data.max_rows, recipe.train.epochs) == ("overhead-x", 500, 1)
