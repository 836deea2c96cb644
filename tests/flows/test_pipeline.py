"""The whole pipeline on a shrunken SST-2 recipe: Prefect's test harness, MLflow in tmp_path.

One module-scoped pair of runs (first: everything computed and promoted; second: every stage a
cache hit and no new model version) serves most assertions, since each run costs tens of seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tasks.registry import load_recipe

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "name=tiny-sst2", "data.max_rows=6000", "tokenizer.vocab_size=3000", "model.d_model=64", "model.n_layers=1",
    "model.n_heads=2", "model.d_ff=128", "train.epochs=2", "train.batch_size=64", "train.lr=0.002",
    "evaluate.min_score=0.6",
]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    """Two pipeline runs of the tiny recipe in one fresh NIGHTSHIFT_HOME."""
    from flows.pipeline import pipeline

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIGHTSHIFT_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(ROOT)
        recipe = load_recipe(ROOT / "configs" / "sst2.yaml", TINY)
        first = pipeline(recipe)
        second = pipeline(recipe)
        yield {"home": home, "recipe": recipe, "first": first, "second": second}


def test_first_run_promotes_and_beats_majority(runs) -> None:
    s = runs["first"]
    assert s["status"] == "completed"
    assert s["decision"]["promoted"] is True
    assert s["decision"]["champion_before"] is None and s["decision"]["champion_after"] == s["model"]["version"]
    # SST-2 dev: the majority class is 444/872 = 0.509; a small model must clear it by a margin
    assert s["metrics"]["test"]["accuracy"] > 0.62
    assert s["metrics"]["test"]["macro_f1"] > 0.6
    assert all(v == "miss" for v in s["cache"].values())


def test_summary_has_design_fields(runs) -> None:
    s = runs["first"]
    assert set(s) >= {"status", "recipe", "mlflow", "data", "metrics", "model", "decision", "cache", "timings_s"}
    assert set(s["mlflow"]) == {"tracking_uri", "experiment_id", "parent_run_id", "stage_runs"}
    assert set(s["mlflow"]["stage_runs"]) == {"prep", "train", "evaluate", "deploy"}
    assert set(s["data"]["rows"]) == {"input", "accepted", "rejected", "train", "validation", "test"}
    assert set(s["decision"]) == {"promoted", "reason", "champion_before", "champion_after"}
    assert s["model"]["uri"] == f"models:/tiny-sst2/{s['model']['version']}"
    assert s["timings_s"]["total"] > 0
    json.dumps(s)


def test_rows_are_accounted_for(runs) -> None:
    rows = runs["first"]["data"]["rows"]
    assert rows["input"] == rows["accepted"] + rows["rejected"]
    assert rows["accepted"] == rows["train"] + rows["validation"] + rows["test"]
    assert rows["test"] == 872 and rows["input"] == 6000 + 872


def test_mlflow_layout(runs) -> None:
    s = runs["first"]
    mlflow.set_tracking_uri(s["mlflow"]["tracking_uri"])
    client = MlflowClient()
    parent = client.get_run(s["mlflow"]["parent_run_id"])
    assert parent.data.tags["nightshift.data_fingerprint"] == s["data"]["fingerprint"]
    assert parent.data.tags["prefect.flow_run_id"]
    assert parent.data.tags["nightshift.config_hash"] == runs["recipe"].config_hash()
    assert parent.data.params["train.epochs"] == "2"
    assert parent.data.metrics["test_accuracy"] == pytest.approx(s["metrics"]["test"]["accuracy"])
    for kind, run_id in s["mlflow"]["stage_runs"].items():
        child = client.get_run(run_id)
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id, kind
        assert child.info.status == "FINISHED"
    train = client.get_run(s["mlflow"]["stage_runs"]["train"])
    losses = client.get_metric_history(train.info.run_id, "train_loss")
    assert len(losses) > 50 and losses[-1].value < losses[0].value
    prep_files = {f.path for f in client.list_artifacts(s["mlflow"]["stage_runs"]["prep"], "validate")}
    assert "validate/validation_report.json" in prep_files
    eval_files = {f.path for f in client.list_artifacts(s["mlflow"]["stage_runs"]["evaluate"], "evaluate")}
    assert "evaluate/confusion_matrix.png" in eval_files


def test_pyfunc_round_trip(runs) -> None:
    s = runs["first"]
    mlflow.set_tracking_uri(s["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/tiny-sst2@champion")
    stage = Path(runs["home"]) / "artifacts" / "encode"
    test = pq.read_table(next(stage.glob("*/test.parquet"))).to_pandas()
    out = model.predict(pd.DataFrame({"text": test["text"].tolist()}))
    assert list(out.columns) == ["label", "label_name", "score", "probabilities"]
    assert set(out["label"]) <= {"0", "1"}
    assert all(abs(sum(p) - 1) < 1e-4 for p in out["probabilities"])
    accuracy = float((out["label"].to_numpy() == test["label"].to_numpy()).mean())
    assert accuracy == pytest.approx(s["metrics"]["test"]["accuracy"])


def test_second_run_hits_cache_and_adds_no_version(runs) -> None:
    first, second = runs["first"], runs["second"]
    prep_and_train = ("ingest", "validate", "clean", "split", "encode", "augment", "train")
    assert {k: second["cache"][k] for k in prep_and_train} == dict.fromkeys(prep_and_train, "hit")
    assert second["cache"]["register"] == "hit"
    # evaluate re-runs: the champion is now v1 (it was none), and the gate re-scores the champion
    assert second["cache"]["evaluate"] == "miss"
    assert second["model"]["version"] == first["model"]["version"]
    assert second["decision"]["promoted"] is False and "already the champion" in second["decision"]["reason"]
    assert second["metrics"] == first["metrics"]
    mlflow.set_tracking_uri(second["mlflow"]["tracking_uri"])
    assert len(MlflowClient().search_model_versions("name = 'tiny-sst2'")) == 1
    train_run = MlflowClient().get_run(second["mlflow"]["stage_runs"]["train"])
    assert train_run.data.tags["nightshift.cache.train"] == "hit"  # the cache hit is visible in MLflow too
