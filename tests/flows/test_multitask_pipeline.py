"""The whole pipeline on a tiny multi-task recipe (SST-2 sentences + WNUT-17 NER on one scratch encoder):
Prefect's test harness, MLflow in tmp_path.

Two runs in one NIGHTSHIFT_HOME: the first computes and promotes everything; the second changes only
WNUT-17's data, so only WNUT-17 re-prepares (SST-2's ingest ... split are cache hits; encode re-runs for
both because the scratch tokenizer is trained on the union of the train splits). Then the evaluate stage
is run against a stand-in champion that is better on one task and worse on the other: refused, naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pandas as pd
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from tasks.registry import kind_of, recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]
PREP = ("ingest", "validate", "clean", "split", "encode", "augment")

pytestmark = pytest.mark.slow


def tiny(wnut_rows: int = 1500) -> dict:
    return {
        "name": "tiny-multi",
        "task": "multi-task",
        "tasks": {
            "sst2": {"task": "text-classification",
                     "data": {"train_path": "data/sst2/train.parquet", "test_path": "data/sst2/dev.parquet",
                              "text_column": "sentence", "label_column": "label", "labels": ["0", "1"],
                              "max_rows": 5000},
                     "evaluate": {"min_score": 0.6}},
            "wnut17": {"task": "token-classification", "loss_weight": 0.5,
                       "data": {"train_path": "data/wnut17/wnut17train.conll",
                                "test_path": "data/wnut17/emerging.test.annotated", "format": "conll",
                                "max_rows": wnut_rows},
                       "evaluate": {"min_score": 0.0, "max_regression": 0.05}},
        },
        "model": {"arch": "scratch", "d_model": 64, "n_layers": 1, "n_heads": 2, "d_ff": 128},
        "tokenizer": {"vocab_size": 3000, "max_length": 64},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.002},
        "multitask": {"sampling": "temperature", "temperature": 2.0},
        "deploy": {"canary": False},
    }


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    home = tmp_path_factory.mktemp("home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIGHTSHIFT_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(ROOT)
        first_recipe = recipe_from_dict(tiny())
        first = pipeline(first_recipe)
        second_recipe = recipe_from_dict(tiny(wnut_rows=1200))
        second = pipeline(second_recipe)
        yield {"home": home, "first": first, "second": second, "recipe": first_recipe, "second_recipe": second_recipe}


def test_summary_nests_metrics_and_decision_per_task(runs) -> None:
    s = runs["first"]
    assert s["status"] == "completed" and s["decision"]["promoted"] is True
    test = s["metrics"]["test"]
    assert set(test) == {"sst2", "wnut17"}
    assert set(test["sst2"]) == {"accuracy", "macro_f1"} and set(test["wnut17"]) == {"f1", "precision", "recall"}
    # SST-2 dev: the majority class is 444/872 = 0.509; the shared encoder's sentence head must clear it
    assert test["sst2"]["accuracy"] > 0.62
    assert set(s["decision"]["tasks"]) == {"sst2", "wnut17"}
    assert all(d["passed"] is True and d["reason"] for d in s["decision"]["tasks"].values())
    json.dumps(s)


def test_rows_are_accounted_for_per_task_and_in_total(runs) -> None:
    rows = dict(runs["first"]["data"]["rows"])
    per_task = rows.pop("tasks")
    for name, r in [*per_task.items(), ("total", rows)]:
        assert r["input"] == r["accepted"] + r["rejected"], name
        assert r["accepted"] == r["train"] + r["validation"] + r["test"], name
    for key, total in rows.items():
        assert total == sum(r[key] for r in per_task.values()), key
    assert per_task["sst2"]["test"] == 872 and per_task["sst2"]["input"] == 5000 + 872


def test_changing_one_tasks_data_reprepares_only_that_task(runs) -> None:
    first, second = runs["first"]["cache_tasks"], runs["second"]["cache_tasks"]
    assert all(v == "miss" for stages in first.values() for v in stages.values())
    assert {stage: second["wnut17"][stage] for stage in PREP} == dict.fromkeys(PREP, "miss")
    assert {stage: second["sst2"][stage] for stage in ("ingest", "validate", "clean", "split")} == dict.fromkeys(
        ("ingest", "validate", "clean", "split"), "hit")
    # scratch: the one tokenizer is trained on the union of the train splits, so every task re-encodes
    assert second["sst2"]["encode"] == "miss"
    assert runs["second"]["data"]["rows"]["tasks"]["sst2"] == runs["first"]["data"]["rows"]["tasks"]["sst2"]


def test_one_tokenizer_for_every_task(runs) -> None:
    encode = runs["recipe"]
    home = Path(runs["home"]) / "artifacts"
    from tasks.core.store import ArtifactStore
    from tasks.multi.prep import task_refs

    store = ArtifactStore(home)
    ref = kind_of(encode).encode(encode, _combined(store, encode, "split"), store, False)
    files = {name: sub.file("tokenizer.json").read_bytes() for name, sub in task_refs(ref).items()}
    vocab = {name: json.loads(data)["model"]["vocab"] for name, data in files.items()}
    assert vocab["sst2"] == vocab["wnut17"] and len(vocab["sst2"]) > 1000


def _combined(store, recipe, stage: str):
    """A combined prep stage's reference, recomputed from the store (every stage a cache hit)."""
    kind = kind_of(recipe)
    ref = kind.ingest(recipe, store, False)
    for name in PREP[1:]:
        ref = getattr(kind, name)(recipe, ref, store, False)
        assert ref.cache_hit
        if name == stage:
            return ref
    return ref


def test_predict_returns_every_head(runs) -> None:
    s = runs["first"]
    mlflow.set_tracking_uri(s["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model(f"models:/tiny-multi/{s['model']['version']}")
    assert model.metadata.metadata["tasks"] == {"sst2": "text-classification", "wnut17": "token-classification"}
    sst2_dev = pq.read_table(ROOT / "data/sst2/dev.parquet").to_pandas()
    texts = sst2_dev["sentence"].tolist()
    out = model.predict(pd.DataFrame({"text": texts}))
    assert {"label", "sst2.label", "sst2.score", "sst2.probabilities", "wnut17.entities"} <= set(out.columns)
    combined = [json.loads(v) for v in out["label"]]
    assert all(set(c) == {"sst2", "wnut17"} for c in combined)
    assert [c["sst2"] for c in combined] == out["sst2.label"].tolist()
    # the served sentence head scores SST-2 dev exactly as evaluation did (same cleaning, tokenizer, weights)
    accuracy = float((out["sst2.label"].to_numpy() == sst2_dev["label"].astype(str).to_numpy()).mean())
    assert accuracy == pytest.approx(s["metrics"]["test"]["sst2"]["accuracy"], abs=2e-3)
    for text, entities in zip(texts, out["wnut17.entities"]):
        for e in entities:
            assert text[e["start"]:e["end"]] == e["text"]


def test_mlflow_makes_the_per_task_gate_plain(runs) -> None:
    s = runs["first"]
    mlflow.set_tracking_uri(s["mlflow"]["tracking_uri"])
    client = MlflowClient()
    parent = client.get_run(s["mlflow"]["parent_run_id"])
    assert parent.data.metrics["test_sst2.accuracy"] == pytest.approx(s["metrics"]["test"]["sst2"]["accuracy"])
    evaluate = client.get_run(s["mlflow"]["stage_runs"]["evaluate"])
    assert evaluate.data.metrics["evaluate.sst2.gate_passed"] == 1.0
    assert evaluate.data.metrics["evaluate.wnut17.gate_passed"] == 1.0
    files = {f.path for f in client.list_artifacts(evaluate.info.run_id, "evaluate")}
    assert "evaluate/gate.md" in files
    gate_md = Path(mlflow.artifacts.download_artifacts(run_id=evaluate.info.run_id, artifact_path="evaluate/gate.md"))
    assert "no task may fall more than its own max_regression" in gate_md.read_text()
    summary_md = Path(mlflow.artifacts.download_artifacts(run_id=parent.info.run_id, artifact_path="summary.md"))
    assert "**no task may regress**" in summary_md.read_text()
    train = client.get_run(s["mlflow"]["stage_runs"]["train"])
    assert {"sst2.train_loss", "wnut17.train_loss", "epoch_sst2.val_accuracy", "epoch_wnut17.val_f1",
            "epoch_val_selection_score"} <= set(train.data.metrics)
    version = client.get_model_version("tiny-multi", s["model"]["version"])
    assert version.tags["nightshift.gate"] == "pass" and "metric.sst2.accuracy" in version.tags


def test_gate_refuses_when_one_task_regresses_although_the_other_improves(runs, monkeypatch) -> None:
    """A stand-in champion that knows WNUT-17's gold tags but gets every SST-2 label wrong."""
    from tasks.core.store import ArtifactStore
    from tasks.multi.prep import task_refs

    monkeypatch.chdir(ROOT)
    recipe = runs["recipe"]
    store = ArtifactStore(Path(runs["home"]) / "artifacts")
    kind = kind_of(recipe)
    encoded = _combined(store, recipe, "encode")
    augmented = _combined(store, recipe, "augment")
    trained = kind.train(recipe, augmented, encoded, store, Path(runs["home"]) / "checkpoints", False, None, None)
    assert trained.cache_hit
    enc = task_refs(encoded)
    sst2 = pq.read_table(enc["sst2"].file("test.parquet")).to_pandas()
    wnut = pq.read_table(enc["wnut17"].file("test.parquet")).to_pandas()
    wrong_sentiment = {t: "1" if label == "0" else "0" for t, label in zip(sst2["text"], sst2["label"])}
    gold_tags = {" ".join(tokens): " ".join(tags) for tokens, tags in zip(wnut["tokens"], wnut["tags"])}

    def champion(texts: list[str]) -> list[str]:
        return [json.dumps({"sst2": wrong_sentiment.get(t, "0"), "wnut17": gold_tags.get(t, "")}) for t in texts]

    evaluated = kind.evaluate(recipe, trained, encoded, store, "99", champion, False)
    decision = evaluated.extra["decision"]
    assert decision["passed"] is False and decision["failed"] == ["wnut17"]
    assert decision["tasks"]["sst2"]["passed"] is True  # it improved on SST-2 (the champion is all wrong there)
    assert decision["tasks"]["sst2"]["champion"] < decision["tasks"]["sst2"]["challenger"]
    assert decision["tasks"]["wnut17"]["champion"] > 0.99  # gold tags (a few test sentences repeat with other tags)
    assert "wnut17: f1" in decision["reason"] and "regresses more than 0.05" in decision["reason"]
