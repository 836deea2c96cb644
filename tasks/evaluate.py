"""Stage: evaluate. Scores the challenger (and the re-scored champion) on the test split and gates it.

The challenger must reach ``evaluate.min_score`` on the primary metric, and must not fall below the
champion by more than ``evaluate.max_regression``, both measured on the *same current* test split:
the champion is re-scored, never compared by the numbers it had when it was trained.

Run alone: ``python -m flows.evaluate_model --config configs/sst2.yaml`` (after train_model).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from models.transformer import TransformerClassifier
from tasks import tracking
from tasks.artifacts import ArtifactStore, StageRef, fingerprint, source_hash
from tasks.config import EvaluateConfig, Recipe
from tasks.lineage import tracked
from tasks.train import MODEL_FILE, EncodedSplit, predict_proba, score

STAGE = "evaluate"

# A champion scorer: raw test texts in, predicted label strings out (the loaded pyfunc).
ChampionScorer = Callable[[list[str]], list[str]]


class GateDecision(BaseModel):
    """Whether the challenger may replace the champion, and why."""

    model_config = ConfigDict(frozen=True)

    passed: bool = Field(description="True when the challenger may be promoted.")
    reason: str = Field(description="One sentence a person can read.")
    metric: str = Field(description="Primary metric compared.")
    challenger: float = Field(description="Challenger's score on the current test split.")
    champion: float | None = Field(default=None, description="Champion's score on the same split, when there is one.")
    champion_version: str | None = Field(default=None, description="Registry version of the champion re-scored.")


def classification_report(y_true: list[str], y_pred: list[str], labels: list[str]) -> dict[str, Any]:
    """accuracy, macro_f1 and per-class precision/recall/F1/support for string labels."""
    true, pred = np.asarray(y_true, dtype=object), np.asarray(y_pred, dtype=object)
    precision, recall, f1, support = precision_recall_fscore_support(
        true, pred, labels=labels, average=None, zero_division=0
    )
    per_class = {
        label: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
        for label, p, r, f, s in zip(labels, precision, recall, f1, support)
    }
    return {
        "accuracy": float(np.mean(true == pred)) if len(true) else 0.0,
        "macro_f1": float(np.mean(f1)) if len(f1) else 0.0,
        "per_class": per_class,
    }


def gate(challenger: float, champion: float | None, champion_version: str | None, cfg: EvaluateConfig) -> GateDecision:
    """Apply the release gate to primary-metric scores measured on the same test split."""
    common = {"metric": cfg.primary_metric, "challenger": challenger, "champion": champion,
              "champion_version": champion_version}
    if challenger < cfg.min_score:
        return GateDecision(passed=False, reason=f"{cfg.primary_metric} {challenger:.4f} is below min_score {cfg.min_score}", **common)
    if champion is None:
        return GateDecision(passed=True, reason=f"{cfg.primary_metric} {challenger:.4f} ≥ min_score {cfg.min_score}; no champion yet", **common)
    if challenger < champion - cfg.max_regression:
        return GateDecision(
            passed=False,
            reason=(f"{cfg.primary_metric} {challenger:.4f} regresses more than {cfg.max_regression} below "
                    f"champion v{champion_version} ({champion:.4f}) on the same test split"),
            **common,
        )
    return GateDecision(
        passed=True,
        reason=(f"{cfg.primary_metric} {challenger:.4f} ≥ min_score {cfg.min_score} and within {cfg.max_regression} "
                f"of champion v{champion_version} ({champion:.4f})"),
        **common,
    )


def confusion_png(y_true: list[str], y_pred: list[str], labels: list[str], path: Path) -> list[list[int]]:
    """Write a labelled confusion-matrix heat map; return the matrix (rows = true, cols = predicted)."""
    from matplotlib.figure import Figure

    cm = confusion_matrix(y_true, y_pred, labels=labels)
    size = max(4.0, 0.6 * len(labels) + 2)
    fig = Figure(figsize=(size, size))
    ax = fig.subplots()
    ax.imshow(cm, cmap="Blues")
    ax.set(xticks=range(len(labels)), yticks=range(len(labels)), xticklabels=labels, yticklabels=labels,
           xlabel="predicted", ylabel="true", title="confusion matrix (test)")
    for (i, j), value in np.ndenumerate(cm):
        ax.text(j, i, str(value), ha="center", va="center",
                color="white" if value > cm.max() / 2 else "black", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return cm.tolist()


def report_markdown(report: dict[str, Any], decision: GateDecision) -> str:
    lines = ["# Evaluation on the test split\n", f"- accuracy: **{report['accuracy']:.4f}**",
             f"- macro F1: **{report['macro_f1']:.4f}**", f"- gate: **{'pass' if decision.passed else 'fail'}** — {decision.reason}\n",
             "| class | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    for label, row in report["per_class"].items():
        lines.append(f"| {label} | {row['precision']:.3f} | {row['recall']:.3f} | {row['f1']:.3f} | {row['support']} |")
    return "\n".join(lines) + "\n"


def run(
    recipe: Recipe,
    trained: StageRef,
    tokenized: StageRef,
    store: ArtifactStore,
    champion_version: str | None = None,
    champion_scorer: ChampionScorer | None = None,
    force: bool = False,
) -> StageRef:
    """Score the trained model on ``tokenized/test.parquet``, re-score the champion, apply the gate."""
    config = {"evaluate": recipe.evaluate.model_dump(mode="json"), "champion_version": champion_version}
    code = source_hash(sys.modules[__name__])
    fp = fingerprint(STAGE, config, [trained.fingerprint, tokenized.fingerprint], code)
    if not force and (hit := store.lookup(STAGE, fp)) is not None:
        return hit
    test_table = pq.read_table(tokenized.file("test.parquet"))
    test = EncodedSplit.from_table(test_table)
    labels = json.loads(trained.file("labels.json").read_text())
    model = TransformerClassifier.from_checkpoint(torch.load(trained.file(MODEL_FILE), weights_only=False))
    probs = predict_proba(model, test, model.pad_id, torch.device("cpu"))
    y_true = test_table.column("label").to_pylist()
    y_pred = [labels[i] for i in probs.argmax(1)]
    report = classification_report(y_true, y_pred, labels)
    assert abs(report["accuracy"] - score(test.labels, probs.argmax(1))["accuracy"]) < 1e-9

    champion_report = None
    if champion_scorer is not None:
        champion_pred = champion_scorer(test_table.column("text").to_pylist())
        champion_report = classification_report(y_true, champion_pred, labels)
    metric = recipe.evaluate.primary_metric
    decision = gate(report[metric], champion_report[metric] if champion_report else None, champion_version, recipe.evaluate)

    with store.writer(STAGE, fp) as w:
        w.write_json("report.json", {"test": report, "champion": champion_report, "decision": decision.model_dump()})
        (w.path / "report.md").write_text(report_markdown(report, decision))
        cm = confusion_png(y_true, y_pred, labels, w.path / "confusion_matrix.png")
        w.write_json("confusion_matrix.json", {"labels": labels, "matrix": cm})
        w.write_json("predictions.json", {"ids": test_table.column("id").to_pylist(), "pred": y_pred})
        metrics = {f"test_{k}": v for k, v in report.items() if k != "per_class"}
        metrics.update({f"test_f1_{label}": row["f1"] for label, row in report["per_class"].items()})
        if champion_report:
            metrics.update({f"champion_test_{k}": v for k, v in champion_report.items() if k != "per_class"})
        return w.write_manifest(
            config=config, inputs=[trained.fingerprint, tokenized.fingerprint], code=code,
            rows={"test": len(test)},
            extra={"metrics": metrics, "test": {k: v for k, v in report.items() if k != "per_class"},
                   "decision": decision.model_dump(),
                   "log_files": ["report.json", "report.md", "confusion_matrix.png", "confusion_matrix.json"]},
        )


def champion_scorer(model_name: str) -> tuple[str | None, ChampionScorer | None]:
    """The current champion's version and a scorer that loads it through the registry on first use."""
    version = tracking.alias_version(model_name, "champion")
    if version is None:
        return None, None

    def scorer(texts: list[str]) -> list[str]:
        import pandas as pd

        model = tracking.load_pyfunc(f"models:/{model_name}/{version}")
        return [str(label) for label in model.predict(pd.DataFrame({"text": texts}))["label"].tolist()]

    return version, scorer


@task(name="evaluate", cache_policy=NONE)
def evaluate_task(recipe: Recipe, trained: StageRef, tokenized: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Score challenger and re-scored champion on the test split; apply the gate."""
    tracking.configure()
    if recipe.task == "image-classification":
        from tasks.vision import evaluate as vision_evaluate

        version, pixel_scorer = vision_evaluate.champion_scorer(recipe.model_name)
        return tracked(run_id, STAGE, lambda store: vision_evaluate.run(
            recipe, trained, tokenized, store, version, pixel_scorer, force))
    version, scorer = champion_scorer(recipe.model_name)
    return tracked(run_id, STAGE, lambda store: run(recipe, trained, tokenized, store, version, scorer, force))
