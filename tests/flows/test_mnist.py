"""The whole pipeline on a shrunken MNIST recipe: same flows, stages, MLflow layout, registry and CLI as text.

One module-scoped pair of runs (first: everything computed and promoted; second: every prep and train
stage a cache hit and no new model version) serves the assertions.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from tasks.registry import load_recipe
from tasks.vision import images

ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny-mnist"
TINY = [f"name={NAME}", "data.max_rows=3000", "augment.enabled=false", "train.epochs=5", "evaluate.min_score=0.8"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    """Two pipeline runs of the tiny recipe in one fresh NIGHTSHIFT_HOME."""
    from flows.pipeline import pipeline

    home = tmp_path_factory.mktemp("home")
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIGHTSHIFT_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(ROOT)
        recipe = load_recipe(ROOT / "configs" / "mnist.yaml", TINY)
        try:
            first = pipeline(recipe)
            second = pipeline(recipe)
        finally:
            torch.set_num_threads(threads)  # the recipe asks for 1 thread; leave the session as it was
        yield {"home": home, "recipe": recipe, "first": first, "second": second}


def stage_dir(home: Path, stage: str, fingerprint: str) -> Path:
    return Path(home) / "artifacts" / stage / fingerprint


def test_first_run_promotes_well_above_chance(runs) -> None:
    s = runs["first"]
    assert s["status"] == "completed" and s["recipe"] == NAME
    assert s["decision"]["promoted"] is True
    assert s["decision"]["champion_before"] is None and s["decision"]["champion_after"] == s["model"]["version"]
    assert s["metrics"]["test"]["accuracy"] > 0.85  # chance is 0.1
    assert s["metrics"]["test"]["macro_f1"] > 0.85
    assert all(v == "miss" for v in s["cache"].values())


def test_summary_fields_and_rows(runs) -> None:
    s = runs["first"]
    assert set(s) >= {"status", "recipe", "mlflow", "data", "metrics", "model", "decision", "cache", "timings_s"}
    assert set(s["mlflow"]["stage_runs"]) == {"prep", "train", "evaluate", "deploy"}
    rows = s["data"]["rows"]
    assert {k: rows[k] for k in ("input", "accepted", "rejected", "test")} == {"input": 6000, "accepted": 6000,
                                                                              "rejected": 0, "test": 3000}
    assert rows["train"] + rows["validation"] == 3000 and 290 <= rows["validation"] <= 310  # 10 % per class
    assert s["model"]["uri"] == f"models:/{NAME}/{s['model']['version']}"
    assert set(s["cache"]) == {"ingest", "validate", "clean", "split", "encode", "augment", "train", "evaluate",
                               "register"}
    json.dumps(s)


def test_mlflow_layout_and_artifacts(runs) -> None:
    s = runs["first"]
    mlflow.set_tracking_uri(s["mlflow"]["tracking_uri"])
    client = MlflowClient()
    parent = client.get_run(s["mlflow"]["parent_run_id"])
    assert parent.data.tags["nightshift.data_fingerprint"] == s["data"]["fingerprint"]
    assert parent.data.params["task"] == "image-classification" and parent.data.params["model.kind"] == "variant"
    prep = s["mlflow"]["stage_runs"]["prep"]
    assert "validate/validation_report.md" in {f.path for f in client.list_artifacts(prep, "validate")}
    assert "encode/normalization.json" in {f.path for f in client.list_artifacts(prep, "encode")}
    assert client.get_run(prep).data.metrics["encode.mean"] == pytest.approx(0.1307, abs=0.003)
    evaluate = {f.path for f in client.list_artifacts(s["mlflow"]["stage_runs"]["evaluate"], "evaluate")}
    assert {"evaluate/confusion_matrix.png", "evaluate/misclassified.png", "evaluate/report.json"} <= evaluate
    train_run = s["mlflow"]["stage_runs"]["train"]
    assert len(client.get_metric_history(train_run, "epoch_val_accuracy")) == 5
    version = client.get_model_version(NAME, s["model"]["version"])
    assert version.tags["nightshift.gate"] == "pass" and float(version.tags["metric.accuracy"]) > 0.85


def test_pyfunc_round_trip_equals_evaluate(runs) -> None:
    s = runs["first"]
    mlflow.set_tracking_uri(s["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    home = runs["home"]
    test = pq.read_table(next((Path(home) / "artifacts" / "encode").glob("*/test.parquet"))).slice(0, 25)
    pixels = images.to_numpy(test.column("pixels"))
    out = model.predict(pd.DataFrame({"pixels": [row.tolist() for row in pixels]}))
    assert list(out.columns) == ["label", "label_name", "score", "probabilities"]
    assert all(abs(sum(p) - 1) < 1e-4 for p in out["probabilities"])
    evaluated = next((Path(home) / "artifacts" / "evaluate").glob("*/predictions.json"))
    predictions = json.loads(evaluated.read_text())
    assert predictions["ids"][:25] == test.column("id").to_pylist()
    assert out["label"].tolist() == predictions["pred"][:25]


def test_cli_predicts_png_and_pgm(runs, tmp_path: Path, capsys, monkeypatch) -> None:
    from flows.cli import main

    test = pq.read_table(next((Path(runs["home"]) / "artifacts" / "encode").glob("*/test.parquet"))).slice(0, 2)
    pixels = images.to_numpy(test.column("pixels")).reshape(-1, 28, 28)
    paths = [tmp_path / "a.png", tmp_path / "b.pgm"]
    for path, digit in zip(paths, pixels):
        Image.fromarray(digit).save(path)
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(runs["home"]))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["predict", "--model", NAME, *map(str, paths)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    expected = model.predict(pd.DataFrame({"pixels": [d.reshape(-1).tolist() for d in pixels]}))["label"].tolist()
    assert [line["image"] for line in lines] == list(map(str, paths))
    assert [line["label"] for line in lines] == expected and all(0 < line["score"] <= 1 for line in lines)
    assert main(["predict", "--model", NAME, str(tmp_path / "missing.png")]) == 2
    assert "missing.png: image file not found" in capsys.readouterr().err


def test_second_run_hits_cache_and_adds_no_version(runs) -> None:
    first, second = runs["first"], runs["second"]
    prep_and_train = ("ingest", "validate", "clean", "split", "encode", "augment", "train")
    assert {k: second["cache"][k] for k in prep_and_train} == dict.fromkeys(prep_and_train, "hit")
    assert second["cache"]["register"] == "hit" and second["model"]["version"] == first["model"]["version"]
    assert second["decision"]["promoted"] is False and "already the champion" in second["decision"]["reason"]
    assert second["metrics"] == first["metrics"]
    mlflow.set_tracking_uri(second["mlflow"]["tracking_uri"])
    assert len(MlflowClient().search_model_versions(f"name = '{NAME}'")) == 1
    # the second evaluate re-scored the champion (v1, the same model) through the registry on the same images
    newest = max((Path(runs["home"]) / "artifacts" / "evaluate").glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    report = json.loads(newest.read_text())
    assert report["champion"]["accuracy"] == pytest.approx(report["test"]["accuracy"])
