"""What a person sees in MLflow's and Prefect's UIs, checked through their APIs.

Fast checks of the pieces (compact prep metrics, the environment defaults, the short printout), then
one pipeline run of a tiny keyword recipe (module scope, slow) for what the UIs read: the experiment's
kind, the model version's source run, the dataset inputs, the prep run's metric count and report
files, and a Prefect graph whose edges follow the stages rather than an MLflow run handle.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest

from tasks.core.environment import DEFAULTS, apply_defaults, exports
from tasks.core.lineage import (
    DATASET_DIGEST_LENGTH,
    PreparedData,
    brief,
    compact_metrics,
    resumed_line,
    stage_metrics,
)
from tasks.core.store import StageRef

PREP = ("ingest", "validate", "clean", "split", "encode", "augment")
NAME = "kw-ui"


# ---------------------------------------------------------------------------------------------- pieces


def ref(stage: str, rows: dict[str, int], metrics: dict[str, float], **extra) -> StageRef:
    return StageRef(stage=stage, fingerprint="f" * 64, path="/nowhere", rows=rows, extra={"metrics": metrics, **extra})


def test_compact_prep_metrics_keep_rows_key_numbers_and_seconds() -> None:
    metrics = {"reject_fraction": 0.01, "leakage_fraction": 0.0, "warnings": 1, "duration_s": 0.2,
               "train.num_labels": 2, "test.tokens_p99": 40, "train.label_fraction.0": 0.5}
    validate = ref("validate", {"input": 100, "rejected": 1, "train": 80, "test": 19}, metrics)
    compact = compact_metrics("validate", validate, 0.5)
    assert compact == {"validate.rows_input": 100, "validate.rows_rejected": 1, "validate.rows_accepted": 99,
                       "validate.reject_fraction": 0.01, "validate.leakage_fraction": 0.0, "validate.warnings": 1,
                       "validate.seconds": 0.5}
    full = stage_metrics("validate", validate, 0.5)
    assert full["validate.train.label_fraction.0"] == 0.5 and full["validate.rows_train"] == 80
    # a stage may name its own key numbers; stages after prep log everything
    assert "validate.duration_s" in compact_metrics("validate", ref("validate", validate.rows, metrics,
                                                                    key_metrics=["duration_s"]), 0.5)
    train = ref("train", {"train": 80}, {"best_epoch": 2, "steps": 30})
    assert compact_metrics("train", train, 1.0) == stage_metrics("train", train, 1.0)


def test_environment_defaults_never_override_the_user() -> None:
    env = {"HF_HUB_OFFLINE": "0"}
    applied = apply_defaults(env)
    assert env["HF_HUB_OFFLINE"] == "0" and "HF_HUB_OFFLINE" not in applied
    assert {k: env[k] for k in DEFAULTS if k != "HF_HUB_OFFLINE"} == {k: v for k, v in DEFAULTS.items()
                                                                      if k != "HF_HUB_OFFLINE"}
    assert env["TOKENIZERS_PARALLELISM"] == "false" and env["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert exports(env) == "" and "export HF_HUB_OFFLINE=1" in exports({})


def test_git_commit_outside_a_checkout_comes_from_the_image(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from tasks.core import lineage

    checkout = lineage.git_commit()
    assert len(checkout) == 40  # the tests run in a checkout: git wins over the variable
    monkeypatch.setenv("NIGHTSHIFT_GIT_COMMIT", "abc123")
    assert lineage.git_commit() == checkout
    no_repo = subprocess.CompletedProcess([], 128, stdout="", stderr="fatal: not a git repository")
    monkeypatch.setattr(lineage.subprocess, "run", lambda *a, **k: no_repo)
    assert lineage.git_commit() == "abc123"  # infra/Dockerfile's GIT_COMMIT build argument
    monkeypatch.delenv("NIGHTSHIFT_GIT_COMMIT")
    assert lineage.git_commit() == "unknown"


def test_brief_is_a_few_lines() -> None:
    stages = {s: ref(s, {"input": 10, "rejected": 0, "train": 10}, {}) for s in PREP}
    text = brief(PreparedData(run_id="r1", stages=stages))
    lines = text.splitlines()
    assert len(lines) == len(PREP) + 2
    assert "ingest" in lines[1] and "cache miss" in lines[1] and "ffffffffffff" in lines[1] and "input 10" in lines[1]
    assert resumed_line({"train": {"resumed_from_epoch": 3}}).startswith("- train: resumed from epoch 3")
    assert resumed_line({"train": {"resumed_from_epoch": None}}) == "" and resumed_line({}) == ""


# ---------------------------------------------------------------------------------------------- one run


def keyword_rows(n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)
    filler = "the a movie film story plot day night city game music food place time house road tree".split()
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(filler, k=rng.randint(4, 8))
        words.insert(rng.randrange(len(words) + 1), "wonderful" if label == "pos" else "terrible")
        rows.append((" ".join(words), label))
    return rows


@pytest.fixture(scope="module")
def run(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One pipeline run of a tiny keyword recipe in a fresh NIGHTSHIFT_HOME."""
    import pandas as pd
    import torch

    from flows.pipeline import pipeline
    from tasks.registry import recipe_from_dict

    base = tmp_path_factory.mktemp("ui")
    pd.DataFrame(keyword_rows(200, 1), columns=["text", "label"]).to_csv(base / "train.csv", index=False)
    recipe = recipe_from_dict({
        "name": NAME,
        "data": {"train_path": str(base / "train.csv"), "labels": ["neg", "pos"]},
        "tokenizer": {"vocab_size": 100, "min_frequency": 1},
        "model": {"arch": "scratch", "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.005, "seed": 3, "threads": 1},
        "evaluate": {"min_score": 0.0},
    })
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIGHTSHIFT_HOME", str(base / "home"))
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
            mp.setenv(var, "placeholder")
            mp.delenv(var)
        mp.chdir(base)
        try:
            summary = pipeline(recipe)
        finally:
            torch.set_num_threads(threads)
        yield SimpleNamespace(summary=summary, recipe=recipe, base=base)


@pytest.fixture(scope="module")
def client(run: SimpleNamespace):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(run.summary["mlflow"]["tracking_uri"])
    mlflow.set_registry_uri(run.summary["mlflow"]["tracking_uri"])
    return MlflowClient()


@pytest.mark.slow
def test_experiment_opens_as_model_training(run: SimpleNamespace, client) -> None:
    experiment = client.get_experiment(run.summary["mlflow"]["experiment_id"])
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.slow
def test_model_version_source_run_is_the_train_run(run: SimpleNamespace, client) -> None:
    s = run.summary
    train_id = s["mlflow"]["stage_runs"]["train"]
    version = client.get_model_version(NAME, s["model"]["version"])
    assert version.run_id == train_id
    train = client.get_run(train_id)
    assert train.data.params["train.epochs"] == "2"  # params ...
    assert len(client.get_metric_history(train_id, "epoch_val_accuracy")) == 2  # ... curves ...
    assert train.data.tags["nightshift.gate"] == version.tags["nightshift.gate"]  # ... and the gate decision
    assert train.data.tags["nightshift.gate_reason"] == version.tags["nightshift.gate_reason"]
    assert train.data.tags["nightshift.model_version"] == s["model"]["version"]
    assert train.data.metrics["test_accuracy"] == pytest.approx(s["metrics"]["test"]["accuracy"])
    assert "train/training_curves.png" in {f.path for f in client.list_artifacts(train_id, "train")}
    # logging the model into the finished train run keeps it finished, and its duration the training's
    deploy = client.get_run(s["mlflow"]["stage_runs"]["deploy"])
    assert train.info.status == "FINISHED" and train.info.end_time <= deploy.info.start_time


@pytest.mark.slow
def test_runs_name_their_dataset_with_the_fingerprint(run: SimpleNamespace, client) -> None:
    s = run.summary
    fingerprint = s["data"]["fingerprint"]
    for run_id in (s["mlflow"]["parent_run_id"], s["mlflow"]["stage_runs"]["train"], s["mlflow"]["stage_runs"]["prep"]):
        inputs = client.get_run(run_id).inputs.dataset_inputs
        assert len(inputs) == 1, run_id
        dataset = inputs[0].dataset
        assert dataset.name == NAME
        assert dataset.digest == fingerprint[:DATASET_DIGEST_LENGTH]
        assert json.loads(dataset.source)["uri"] == str((run.base / "train.csv").resolve())
        assert json.loads(dataset.profile)["fingerprint"] == fingerprint
        assert {t.key: t.value for t in inputs[0].tags}["mlflow.data.context"] in ("training", "prepared")


@pytest.mark.slow
def test_prep_run_logs_a_compact_set_and_the_full_report(run: SimpleNamespace, client) -> None:
    prep_id = run.summary["mlflow"]["stage_runs"]["prep"]
    metrics = client.get_run(prep_id).data.metrics
    assert len(metrics) <= 30, sorted(metrics)
    for stage in PREP:
        assert {f"{stage}.rows_input", f"{stage}.rows_rejected", f"{stage}.seconds"} <= set(metrics), stage
        assert f"{stage}/metrics.json" in {f.path for f in client.list_artifacts(prep_id, stage)}
    report = json.loads(Path(client.download_artifacts(prep_id, "validate/metrics.json", str(run.base))).read_text())
    assert report["stage"] == "validate" and len(report["metrics"]) > 20
    assert "validate.train.num_labels" in report["metrics"] and "validate.train.num_labels" not in metrics


@pytest.mark.slow
def test_prefect_graph_follows_the_stages(run: SimpleNamespace, client) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    prep_flow_run = client.get_run(run.summary["mlflow"]["stage_runs"]["prep"]).data.tags["prefect.flow_run_id"]
    with get_client(sync_client=True) as prefect:
        task_runs = prefect.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[prep_flow_run])))
    by_name = {t.name.rsplit("-", 1)[0]: t for t in task_runs}
    assert set(by_name) == set(PREP), sorted(by_name)  # no MLflow bookkeeping task in the graph
    for upstream, stage in zip(PREP, PREP[1:]):
        inputs = {i.id for values in by_name[stage].task_inputs.values() for i in values}
        assert inputs == {by_name[upstream].id}, stage  # one edge: the stage before it
    assert not any(by_name["ingest"].task_inputs.values())
