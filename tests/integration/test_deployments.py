"""``nightshift schedule`` against the real stack (infra/): deployments, runs triggered through the API,
a cron schedule that fires, parameter validation, one run per recipe at a time, and what lands in MLflow.

Two ``schedule`` processes serve two tiny SST-2 recipes (a few hundred rows, a one-layer encoder):

- ``nightly``: the default cron ``0 2 * * *`` (UTC); runs are triggered through the API the way the UI's
  run form does it: the whole ``recipe`` parameter, with one field changed;
- ``due``: a cron in Europe/Berlin time that comes due about a minute after the test starts, so the
  server's scheduler, not the test, creates its run.

Both processes are killed (their whole process group) when the module ends.
"""

from __future__ import annotations

import copy
import datetime as dt
import os
import signal
import subprocess
import sys
import time
import uuid
import zoneinfo
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
FLOW = "nightshift-pipeline"
RUN_TIMEOUT_S = 240
BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")


def tiny_recipe(name: str) -> dict[str, Any]:
    """SST-2 shrunk to seconds of training; a gate any model passes, so the first run becomes champion."""
    return {
        "name": name,
        "task": "text-classification",
        "data": {"train_path": str(ROOT / "data/sst2/train.parquet"), "test_path": str(ROOT / "data/sst2/dev.parquet"),
                 "text_column": "sentence", "label_column": "label", "labels": ["0", "1"], "max_rows": 600},
        "validate": {"max_conflict_fraction": 0.5, "max_leakage_fraction": 0.5, "max_truncation_rate": 1.0},
        "tokenizer": {"vocab_size": 500, "min_frequency": 1, "max_length": 32},
        "model": {"d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64},
        "train": {"epochs": 2, "batch_size": 64, "device": "cpu", "threads": 1},
        "evaluate": {"min_score": 0.0, "max_regression": 1.0},
    }


def next_due(zone: zoneinfo.ZoneInfo, lead_s: int = 60) -> dt.datetime:
    """The first whole minute at least ``lead_s`` seconds from now, in ``zone``."""
    at = dt.datetime.now(zone) + dt.timedelta(seconds=lead_s)
    return (at + dt.timedelta(minutes=1)).replace(second=0, microsecond=0) if at.second or at.microsecond else at


class Schedule:
    """A ``nightshift schedule`` process (its own process group), its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log = log
        self.handle = log.open("w")
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "schedule", *args], cwd=ROOT, env=env,
                                     stdout=self.handle, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)

    def output(self) -> str:
        self.handle.flush()
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        for sig, wait_s in ((signal.SIGINT, 20), (signal.SIGKILL, 10)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)  # the runner and the flow runs it started
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait_s)
            except subprocess.TimeoutExpired:
                continue
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # anything of the group left behind
        except (ProcessLookupError, PermissionError):
            pass
        self.handle.close()


@pytest.fixture(scope="module")
def prefect(stack) -> Iterator[Any]:
    """A synchronous Prefect client on the stack's server, with its auth string."""
    from prefect.client.orchestration import get_client
    from prefect.settings import (
        PREFECT_API_AUTH_STRING,
        PREFECT_API_URL,
        temporary_settings,
    )

    with temporary_settings(updates={PREFECT_API_URL: stack.env["PREFECT_API_URL"],
                                     PREFECT_API_AUTH_STRING: stack.env["PREFECT_API_AUTH_STRING"]}):
        with get_client(sync_client=True) as client:
            yield client


@pytest.fixture(scope="module")
def served(stack, prefect, tmp_path_factory) -> Iterator[dict[str, Any]]:
    """Both recipes served; waits until both deployments are on the server."""
    tag = uuid.uuid4().hex[:6]
    folder = tmp_path_factory.mktemp("deployments")
    names = {"nightly": f"it-{tag}-nightly", "due": f"it-{tag}-due"}
    paths = {}
    for key, name in names.items():
        paths[key] = folder / f"{key}.yaml"
        paths[key].write_text(yaml.safe_dump(tiny_recipe(name), sort_keys=False))
    due = next_due(BERLIN, lead_s=60)
    env = {**os.environ, **stack.env, "NIGHTSHIFT_HOME": str(stack.home), "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    processes = {
        "nightly": Schedule(["--config", str(paths["nightly"])], env, folder / "nightly.log"),
        "due": Schedule(["--config", str(paths["due"]), "--cron", f"{due.minute} {due.hour} * * *",
                         "--timezone", "Europe/Berlin"], env, folder / "due.log"),
    }
    try:
        deployments = {}
        deadline = time.monotonic() + 90
        for key, name in names.items():
            while key not in deployments:
                try:
                    deployments[key] = prefect.read_deployment_by_name(f"{FLOW}/{name}")
                except Exception:  # ObjectNotFound until the process has registered it
                    if processes[key].proc.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"schedule did not register {FLOW}/{name}:\n{processes[key].output()}")
                    time.sleep(1)
        yield {"names": names, "paths": paths, "due": due, "processes": processes, "deployments": deployments}
    finally:
        for process in processes.values():
            process.stop()


def wait_final(prefect, flow_run_id, processes: dict[str, Schedule], timeout_s: float = RUN_TIMEOUT_S) -> Any:
    """The flow run once it is in a final state; fails with the schedule output when it takes too long."""
    deadline = time.monotonic() + timeout_s
    while True:
        run = prefect.read_flow_run(flow_run_id)
        if run.state is not None and run.state.is_final():
            return run
        if time.monotonic() > deadline:
            logs = "\n".join(f"--- {key}\n{p.output()}" for key, p in processes.items())
            pytest.fail(f"flow run {run.name} still {run.state.name if run.state else None} after {timeout_s:.0f} s\n{logs}")
        time.sleep(2)


def test_deployment_reads_back_with_schedule_timezone_and_form(served, prefect) -> None:
    nightly, due = served["deployments"]["nightly"], served["deployments"]["due"]
    name = served["names"]["nightly"]
    assert nightly.name == name and set(nightly.tags) == {"nightshift", f"recipe:{name}"}
    [schedule] = nightly.schedules
    assert (schedule.schedule.cron, schedule.schedule.timezone, schedule.active) == ("0 2 * * *", "UTC", True)
    at = served["due"]
    assert (due.schedules[0].schedule.cron, due.schedules[0].schedule.timezone) == (f"{at.minute} {at.hour} * * *",
                                                                                     "Europe/Berlin")
    assert nightly.enforce_parameter_schema is True
    assert nightly.global_concurrency_limit is not None and nightly.global_concurrency_limit.limit == 1
    assert nightly.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert nightly.parameters["recipe"]["name"] == name and nightly.parameters["force"] is False
    assert nightly.parameters["recipe"]["train"]["epochs"] == 2

    schema = nightly.parameter_openapi_schema
    assert schema["properties"]["recipe"]["$ref"] == "#/definitions/TextRecipe"
    train = schema["definitions"]["TrainConfig"]["properties"]
    assert train["epochs"]["description"].startswith("Maximum number of epochs")
    assert (train["epochs"]["minimum"], train["epochs"]["maximum"]) == (1, 1000)
    assert train["device"]["enum"] == ["auto", "cpu", "cuda"]
    assert schema["definitions"]["DataConfig"]["properties"]["max_rows"]["description"]


@pytest.mark.parametrize(("value", "reason"), [(0, "0 is less than the minimum of 1"),
                                               ("two", "'two' is not of type 'integer'")])
def test_invalid_parameter_is_refused_naming_the_field(served, prefect, value, reason) -> None:
    from prefect.exceptions import PrefectHTTPStatusError

    deployment = served["deployments"]["nightly"]
    recipe = copy.deepcopy(deployment.parameters["recipe"])
    recipe["train"]["epochs"] = value
    with pytest.raises(PrefectHTTPStatusError) as refused:
        prefect.create_flow_run_from_deployment(deployment.id, parameters={"recipe": recipe})
    assert refused.value.response.status_code == 409
    detail = refused.value.response.json()["detail"]
    assert "recipe.train.epochs" in detail and reason in detail, detail


@pytest.fixture(scope="module")
def triggered(served, prefect) -> dict[str, Any]:
    """Two runs of the nightly recipe triggered back to back with ``train.epochs=1``; both waited for.

    The states of both are sampled while they run: with the deployment's limit of one, the second
    must wait (``AwaitingConcurrencySlot``) and never run alongside the first.
    """
    from prefect.client.schemas.objects import StateType

    deployment = served["deployments"]["nightly"]
    recipe = copy.deepcopy(deployment.parameters["recipe"])  # what the run form holds, one field changed
    recipe["train"]["epochs"] = 1
    first = prefect.create_flow_run_from_deployment(deployment.id, parameters={"recipe": recipe, "force": False})
    second = prefect.create_flow_run_from_deployment(deployment.id, parameters={"recipe": recipe, "force": False})
    samples: list[tuple[str, str, str, str]] = []
    active = {StateType.PENDING, StateType.RUNNING}
    deadline = time.monotonic() + RUN_TIMEOUT_S + 60
    while time.monotonic() < deadline:
        runs = [prefect.read_flow_run(first.id), prefect.read_flow_run(second.id)]
        samples.append(tuple(x for run in runs for x in (run.state.type.value, run.state.name)))
        if all(run.state.is_final() for run in runs):
            break
        time.sleep(1)
    first, second = (wait_final(prefect, run.id, served["processes"], 5) for run in (first, second))
    return {"first": first, "second": second, "samples": samples, "active": {t.value for t in active}}


def test_triggered_run_with_an_override_completes(triggered, prefect, served) -> None:
    first = triggered["first"]
    assert first.state.is_completed(), f"{first.state.name}: {first.state.message}\n{served['processes']['nightly'].output()}"
    assert first.parameters["recipe"]["train"]["epochs"] == 1


def test_second_run_of_a_recipe_waits_for_the_first(triggered) -> None:
    first, second, samples = triggered["first"], triggered["second"], triggered["samples"]
    assert second.state.is_completed(), f"{second.state.name}: {second.state.message}"
    both_active = [s for s in samples if s[0] in triggered["active"] and s[2] in triggered["active"]]
    assert not both_active, f"two runs of one recipe at once: {both_active}"
    assert any("AwaitingConcurrencySlot" in (s[1], s[3]) for s in samples), samples
    earlier, later = sorted((first, second), key=lambda run: run.start_time)
    assert earlier.end_time <= later.start_time  # the one that waited started only after the other had ended


def test_runs_and_champion_are_on_the_mlflow_server(triggered, served, stack, prefect, monkeypatch) -> None:
    from mlflow.tracking import MlflowClient

    for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):  # MLflow's basic-auth login
        monkeypatch.setenv(var, stack.env[var])
    uri = stack.env["MLFLOW_TRACKING_URI"]
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = served["names"]["nightly"]
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None
    flow_run = triggered["first"]
    [parent] = client.search_runs([experiment.experiment_id],
                                  f"tags.`prefect.flow_run_id` = '{flow_run.id}' and tags.`nightshift.kind` = 'pipeline'")
    assert parent.info.status == "FINISHED"
    assert parent.data.params["train.epochs"] == "1"  # the override reached the run
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert sorted(run.data.tags["nightshift.kind"] for run in children) == ["deploy", "evaluate", "prep", "train"]
    assert all(run.info.status == "FINISHED" for run in children)
    champion = client.get_model_version_by_alias(name, "champion")
    assert champion.version == parent.data.tags["nightshift.model_version"]

    # the run's markdown artifact links the parent run's page in the MLflow UI
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    [artifact] = [a for a in prefect.read_artifacts(
        artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id]))) if a.type == "markdown"]
    page = (f"{uri.rstrip('/')}/#/experiments/{experiment.experiment_id}/runs/{parent.info.run_id}"
            "?workflowType=machine_learning")  # opens in the UI's model-training workflow, not GenAI
    assert f"[open the run in MLflow]({page})" in artifact.data


def test_cron_schedule_fires_without_a_trigger(served, prefect) -> None:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterDeploymentId

    deployment = served["deployments"]["due"]
    due = served["due"]
    deadline = time.monotonic() + max(0.0, (due - dt.datetime.now(BERLIN)).total_seconds()) + 30
    fired = []
    while not fired:
        runs = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(deployment_id=FlowRunFilterDeploymentId(
            any_=[deployment.id])))
        fired = [run for run in runs if run.expected_start_time and abs(
            (run.expected_start_time - due).total_seconds()) < 1]
        if not fired:
            assert time.monotonic() < deadline, f"no run scheduled for {due.isoformat()}: {[r.expected_start_time for r in runs]}"
            time.sleep(2)
    [run] = fired
    assert run.auto_scheduled  # created by the server's scheduler, not by a trigger
    run = wait_final(prefect, run.id, served["processes"])
    assert run.state.is_completed(), f"{run.state.name}: {run.state.message}\n{served['processes']['due'].output()}"
    assert run.start_time >= due - dt.timedelta(seconds=1)
