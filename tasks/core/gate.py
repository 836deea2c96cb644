"""The release gate and the classification report every classifier kind shares.

The challenger must reach ``evaluate.min_score`` on the primary metric and must not fall more than
``evaluate.max_regression`` below the champion re-scored on the same test split. A multi-task
challenger is gated per task (:func:`gate_tasks`): every task by its own rule, and it passes only
when none fails.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from tasks.core.config import EvaluateConfig
from tasks.core.store import ArtifactStore, StageKey, StageRef


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


class TasksGateDecision(GateDecision):
    """The gate of a multi-task challenger: every task gated on its own, and passed only when all pass.

    ``tasks`` holds each task's own decision (its primary metric, ``min_score`` and ``max_regression``
    against the champion's same task re-scored on the same test split); ``failed`` names the tasks that
    did not pass. ``metric`` is ``"every task"`` and ``challenger`` the fraction of tasks that passed.
    """

    tasks: dict[str, GateDecision] = Field(description="Each task's own gate decision, by task name.")
    failed: list[str] = Field(default_factory=list, description="The tasks whose gate failed, in recipe order.")


NO_TASK_MAY_REGRESS = ("every task must reach its own min_score and no task may fall more than its own "
                       "max_regression below the champion's same task")


def gate_tasks(decisions: dict[str, GateDecision]) -> TasksGateDecision:
    """Combine per-task decisions: the challenger passes only when every task passes; the reason names the failures.

    Every task must have been judged against the same champion version (or none): ValueError otherwise.
    """
    if not decisions:
        raise ValueError("gate_tasks needs at least one task decision")
    failed = [name for name, d in decisions.items() if not d.passed]
    passed = len(decisions) - len(failed)
    versions = {d.champion_version for d in decisions.values() if d.champion_version is not None}
    if len(versions) > 1:
        # one multi-task model, one champion: tasks judged against different versions cannot be combined
        raise ValueError("gate_tasks: the tasks were judged against different champion versions ("
                         + ", ".join(f"{name}: v{d.champion_version}" for name, d in decisions.items()
                                     if d.champion_version is not None) + "); re-evaluate them against one champion")
    if failed:
        reason = (f"{len(failed)} of {len(decisions)} tasks failed the gate ({NO_TASK_MAY_REGRESS}): "
                  + "; ".join(f"{name}: {decisions[name].reason}" for name in failed))
    else:
        reason = f"all {len(decisions)} tasks passed ({NO_TASK_MAY_REGRESS}): " + "; ".join(
            f"{name}: {d.reason}" for name, d in decisions.items())
    return TasksGateDecision(passed=not failed, reason=reason, metric="every task", challenger=passed / len(decisions),
                             champion=None, champion_version=next(iter(versions), None),
                             tasks=dict(decisions), failed=failed)


def tasks_gate_markdown(decision: TasksGateDecision) -> str:
    """The per-task gate as a markdown table, under the rule it applies."""
    lines = [f"# Release gate: {'pass' if decision.passed else '**fail**'}\n",
             f"Rule: {NO_TASK_MAY_REGRESS}.\n", f"{decision.reason}\n",
             "| task | metric | challenger | champion | passed | reason |", "|---|---|---|---|---|---|"]
    for name, d in decision.tasks.items():
        champion = "—" if d.champion is None else f"{d.champion:.4f} (v{d.champion_version})"
        lines.append(f"| {name} | {d.metric} | {d.challenger:.4f} | {champion} | {'yes' if d.passed else '**no**'} | {d.reason} |")
    return "\n".join(lines) + "\n"


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


def store_evaluation(
    key: StageKey, store: ArtifactStore, *, ids: list[str], y_true: list[str], y_pred: list[str], labels: list[str],
    champion_pred: list[str] | None, champion_version: str | None, cfg: EvaluateConfig,
    write_more: Callable[[Path], tuple[list[str], dict[str, float]]] | None = None,
) -> StageRef:
    """The evaluate stage of every classifier kind, after prediction: the classification report of the
    challenger (and of the re-scored champion on the same rows), the gate, the confusion matrix, the
    predictions the smoke test compares with, and the stored output.

    ``write_more(directory)`` writes a kind's own files (misclassified digits) and returns their names
    and extra metrics.
    """
    report = classification_report(y_true, y_pred, labels)
    champion = classification_report(y_true, champion_pred, labels) if champion_pred is not None else None
    metric = cfg.primary_metric
    decision = gate(report[metric], champion[metric] if champion else None, champion_version, cfg)
    summary = {k: v for k, v in report.items() if k != "per_class"}
    metrics = {f"test_{k}": v for k, v in summary.items()}
    metrics.update({f"test_f1_{label}": row["f1"] for label, row in report["per_class"].items()})
    if champion:
        metrics.update({f"champion_test_{k}": v for k, v in champion.items() if k != "per_class"})
    with store.writer(key) as w:
        w.write_json("report.json", {"test": report, "champion": champion, "decision": decision.model_dump()})
        (w.path / "report.md").write_text(report_markdown(report, decision))
        cm = confusion_png(y_true, y_pred, labels, w.path / "confusion_matrix.png")
        w.write_json("confusion_matrix.json", {"labels": labels, "matrix": cm})
        w.write_json("predictions.json", {"ids": ids, "pred": y_pred})
        more, more_metrics = write_more(w.path) if write_more is not None else ([], {})
        return w.write_manifest(rows={"test": len(y_true)}, extra={
            "metrics": {**metrics, **more_metrics}, "test": summary, "decision": decision.model_dump(),
            "log_files": ["report.json", "report.md", "confusion_matrix.png", "confusion_matrix.json", *more]})
