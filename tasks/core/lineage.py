"""Run bookkeeping shared by every stage task: stage logging, the run summary, what the flows hand each other.

``tracked()`` is the body of every thin stage ``@task`` (``tasks.stages``): it runs the stage against the artifact store,
times it, says whether it was a cache hit, and logs the stage's metrics and files to the stage's MLflow
run. The small frozen models here (``PreparedData``, ``TrainedModel``, ``Evaluated``, ``Deployed``) are
what the sub-flows return: references, never data.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.core import tracking
from tasks.core.config import flatten
from tasks.core.settings import get_settings
from tasks.core.store import ArtifactStore, DataError, StageError, StageRef


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class PreparedData(Frozen):
    """Output of prepare_data: one reference per prep stage."""

    run_id: str | None = Field(description="MLflow run of the prep sub-flow.")
    stages: dict[str, StageRef] = Field(description="ingest, validate, clean, split, encode, augment.")

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the data the model trains on (everything up to augment)."""
        return self.stages["augment"].fingerprint


class TrainedModel(Frozen):
    run_id: str | None
    stage: StageRef


class Evaluated(Frozen):
    run_id: str | None
    stage: StageRef


class Deployed(Frozen):
    run_id: str | None
    name: str
    version: str
    uri: str
    reused: bool
    release: dict[str, Any]


def store() -> ArtifactStore:
    return ArtifactStore(get_settings().artifacts_root)


def git_commit() -> str:
    """Commit of the working tree the code runs from; outside git (an installed image) NIGHTSHIFT_GIT_COMMIT,
    which infra/Dockerfile bakes in from its GIT_COMMIT build argument; else 'unknown'."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        commit = out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return commit or os.environ.get("NIGHTSHIFT_GIT_COMMIT", "").strip() or "unknown"


PREP_SLOTS = ("ingest", "validate", "clean", "split", "encode", "augment")

# The prep run's compact metric set: per stage rows in / accepted / rejected, seconds, and these key numbers (a
# stage may name its own in ``extra["key_metrics"]``); the rest goes to the report artifact ``<stage>/metrics.json``.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "validate": ("reject_fraction", "leakage_fraction", "warnings"),
    "encode": ("vocab_size", "train_truncation_rate", "mean", "std"),
    "augment": ("rows_augmented",),
}
METRICS_REPORT = "metrics.json"


def stage_metrics(stage: str, ref: StageRef, seconds: float) -> dict[str, float]:
    """Every number a stage reports, as ``<stage>.<name>``: its ``extra["metrics"]``, ``rows_*`` counts and seconds."""
    metrics = {f"{stage}.{k}": v for k, v in ref.extra.get("metrics", {}).items()
               if isinstance(v, (int, float)) and not isinstance(v, bool)}
    metrics.update({f"{stage}.rows_{k}": v for k, v in ref.rows.items()})
    metrics[f"{stage}.seconds"] = seconds
    return metrics


def compact_metrics(stage: str, ref: StageRef, seconds: float) -> dict[str, float]:
    """What a prep stage logs as MLflow metrics: rows input / accepted / rejected, its key numbers, seconds.

    Stages after prep (train, evaluate) log every metric: they report few, and curves are per step.
    """
    full = stage_metrics(stage, ref, seconds)
    if stage not in PREP_SLOTS:
        return full
    rows = ref.rows
    if "input" in rows and "rejected" in rows:
        compact = {f"{stage}.rows_input": rows["input"], f"{stage}.rows_rejected": rows["rejected"],
                   f"{stage}.rows_accepted": rows.get("accepted", rows["input"] - rows["rejected"])}
    else:
        compact = {f"{stage}.rows_{k}": v for k, v in rows.items()}
    for name in ref.extra.get("key_metrics", KEY_METRICS.get(stage, ())):
        if f"{stage}.{name}" in full:
            compact[f"{stage}.{name}"] = full[f"{stage}.{name}"]
    compact[f"{stage}.seconds"] = seconds
    return compact


def tracked(run_id: str | None, stage: str, work: Callable[[ArtifactStore], StageRef], log: Any = None) -> StageRef:
    """Run one stage against the store, then log its metrics, files and cache status to ``run_id``.

    A prep stage logs its compact metric set (:func:`compact_metrics`) and the full set as the report
    artifact ``<stage>/metrics.json``. ``log`` is where the one-line stage report goes (Prefect's run
    logger from ``tasks.stages``).
    """
    started = time.perf_counter()
    try:
        ref = work(store())
    except DataError as exc:  # the user's to fix: keep it one line, and say which stage found it
        raise exc if str(exc).startswith(stage) else DataError(f"{stage}: {exc}") from None
    except Exception as exc:
        raise StageError(stage, f"{type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - started
    status = "hit" if ref.cache_hit else "miss"
    (log or logging.getLogger("nightshift")).info("%s: cache %s (%s), %.2fs, rows %s", stage, status, ref.fingerprint[:12], seconds, ref.rows)
    if run_id is not None:
        tracking.log_metrics(run_id, compact_metrics(stage, ref, seconds))
        if stage in PREP_SLOTS:
            report = {"stage": stage, "fingerprint": ref.fingerprint, "cache": status, "rows": ref.rows,
                      "metrics": stage_metrics(stage, ref, seconds)}
            tracking.log_text(run_id, json.dumps(report, indent=2, sort_keys=True), f"{stage}/{METRICS_REPORT}")
        tracking.set_tags(run_id, {f"nightshift.cache.{stage}": status, f"nightshift.fingerprint.{stage}": ref.fingerprint})
        for name in ref.extra.get("log_files", []):
            tracking.log_artifact(run_id, ref.file(name), stage)
    return ref.model_copy(update={"extra": {**ref.extra, "seconds": seconds}})


def resumed_from(trained: StageRef) -> int | None:
    """The epoch this run's training resumed from (an interrupted run's checkpoint), or None.

    A cache hit trained nothing in this run, so it resumed nothing either.
    """
    return None if trained.cache_hit else trained.extra.get("resumed_from_epoch")


DATASET_DIGEST_LENGTH = 12  # MLflow keeps at most 36 characters of a dataset digest; the logs show 12 too


def data_paths(recipe: Any) -> tuple[str, str | None]:
    """The recipe's train and test paths; a recipe of several tasks (no ``data`` of its own) lists its tasks' joined by ", "."""
    data = getattr(recipe, "data", None)
    if data is not None:
        return data.train_path, data.test_path
    subs = list(recipe.sub_recipes().values())
    return ", ".join(s.data.train_path for s in subs), ", ".join(s.data.test_path or "-" for s in subs)


def log_data_input(run_id: str | None, recipe: Any, fingerprint: str, rows: dict[str, int], context: str) -> None:
    """Name the run's data in MLflow's Dataset column: the recipe's data, the data fingerprint as digest."""
    if run_id is None:
        return
    train_path, test_path = data_paths(recipe)
    source = ", ".join(p if "://" in p else str(Path(p).expanduser().resolve()) for p in train_path.split(", "))
    profile = {"rows": dict(rows), "train_path": train_path, "test_path": test_path,
               "fingerprint": fingerprint}
    tracking.log_dataset(run_id, name=recipe.name, digest=fingerprint[:DATASET_DIGEST_LENGTH], source=source,
                         context=context, profile=profile)


def build_summary(
    recipe: Any, run_id: str, data: PreparedData, trained: TrainedModel, evaluated: Evaluated,
    deployed: Deployed, total_seconds: float,
) -> dict[str, Any]:
    """The run summary, with the documented fields of ``--summary-json``."""
    stages = {**data.stages, "train": trained.stage, "evaluate": evaluated.stage}
    release = deployed.release
    summary = {
        "status": "completed",
        "recipe": recipe.name,
        "mlflow": {
            "tracking_uri": tracking.tracking_uri(), "experiment_id": tracking.experiment_of(run_id),
            "parent_run_id": run_id,
            "stage_runs": {"prep": data.run_id, "train": trained.run_id, "evaluate": evaluated.run_id,
                           "deploy": deployed.run_id},
        },
        "data": {"fingerprint": data.fingerprint, "rows": data_rows(data.stages)},
        "metrics": {"test": dict(evaluated.stage.extra["test"])},
        "train": {"resumed_from_epoch": resumed_from(trained.stage),
                  "best_epoch": trained.stage.extra.get("metrics", {}).get("best_epoch"),
                  "steps": trained.stage.extra.get("metrics", {}).get("steps")},
        "model": {"name": deployed.name, "version": deployed.version, "uri": deployed.uri},
        "decision": {"promoted": release["promoted"], "reason": release["reason"],
                     "champion_before": release["champion_before"], "champion_after": release["champion_after"]},
        "cache": {**{name: "hit" if ref.cache_hit else "miss" for name, ref in stages.items()},
                  "register": "hit" if deployed.reused else "miss"},
        "timings_s": {**{name: round(ref.extra.get("seconds", 0.0), 3) for name, ref in stages.items()},
                      "total": round(total_seconds, 3)},
    }
    _per_task(summary, data, evaluated)
    return summary


def data_rows(stages: dict[str, StageRef]) -> dict[str, int]:
    """Row accounting of the prep stages: input = accepted + rejected, accepted = train + validation + test."""
    split = stages["split"].rows
    accepted = sum(split.get(k, 0) for k in ("train", "validation", "test"))
    rejected = sum(ref.rows.get("rejected", 0) for ref in stages.values())
    return {"input": stages["ingest"].rows.get("input", accepted + rejected), "accepted": accepted,
            "rejected": rejected, "train": split.get("train", 0), "validation": split.get("validation", 0),
            "test": split.get("test", 0)}


def _per_task(summary: dict[str, Any], data: PreparedData, evaluated: Evaluated) -> None:
    """A run of several tasks (an evaluation with ``tasks_test``): metrics.test.<task>.<metric>,
    decision.tasks.<task> {passed, reason}, data.rows.tasks.<task> with the same accounting per task, and
    cache_tasks.<task>.<prep stage> (hit or miss: a change to one task's data re-prepares that task only)."""
    nested = evaluated.stage.extra.get("tasks_test")
    if nested is None:
        return
    summary["metrics"]["test"] = {name: dict(values) for name, values in nested.items()}
    decision = evaluated.stage.extra["decision"]
    summary["decision"]["tasks"] = {name: {"passed": d["passed"], "reason": d["reason"]}
                                    for name, d in decision.get("tasks", {}).items()}
    summary["cache_tasks"] = {name: {stage: "hit" if ref.extra["tasks"][name].get("cache_hit") else "miss"
                                     for stage, ref in data.stages.items()} for name in nested}
    summary["data"]["rows"]["tasks"] = {
        name: data_rows({stage: StageRef.model_validate(ref.extra["tasks"][name]) for stage, ref in data.stages.items()})
        for name in nested}


def resumed_line(summary: dict[str, Any]) -> str:
    """The markdown line that says training resumed from an interrupted run's checkpoint ("" when it did not)."""
    epoch = summary.get("train", {}).get("resumed_from_epoch")
    return "" if epoch is None else f"- train: resumed from epoch {epoch} (the checkpoint of an interrupted run)\n"


def summary_markdown(summary: dict[str, Any], run_urls: dict[str, str] | None = None) -> str:
    """The run summary as markdown (the Prefect artifact and ``summary.md``).

    ``run_urls`` maps ``pipeline`` and the stage runs (``prep``, ``train``, ...) to
    :func:`tracking.run_url`; on a tracking server those are UI pages, and the MLflow line links them.
    """
    test = " · ".join(f"{k} **{v:.4f}**" for k, v in flatten(summary["metrics"]["test"]).items())
    decision = summary["decision"]
    cache = ", ".join(f"{k}: {v}" for k, v in summary["cache"].items())
    links = {name: url for name, url in (run_urls or {}).items() if url.startswith(("http://", "https://"))}
    if "pipeline" in links:
        stages = " · ".join(f"[{name}]({url})" for name, url in links.items() if name != "pipeline")
        mlflow_line = (f"- MLflow: [open the run in MLflow]({links['pipeline']}) (run `{summary['mlflow']['parent_run_id']}`"
                       f"{'; ' + stages if stages else ''})\n")
    else:
        mlflow_line = (f"- MLflow: {summary['mlflow']['tracking_uri']}, experiment {summary['mlflow']['experiment_id']}, "
                       f"run `{summary['mlflow']['parent_run_id']}`\n")
    return (
        f"# Nightshift run: {summary['recipe']}\n\n"
        f"- test: {test}\n"
        f"- model: `{summary['model']['uri']}` — {'**promoted**' if decision['promoted'] else 'not promoted'}: "
        f"{decision['reason']} (champion {decision['champion_before']} → {decision['champion_after']})\n"
        f"{tasks_gate_line(decision)}"
        f"- data: fingerprint `{summary['data']['fingerprint'][:12]}`, rows {summary['data']['rows']}\n"
        f"- cache: {cache}\n"
        f"{resumed_line(summary)}"
        f"{mlflow_line}"
        f"- total time: {summary['timings_s']['total']:.1f} s\n"
    )


def tasks_gate_line(decision: dict[str, Any]) -> str:
    """The markdown line of a per-task gate: every task must pass, and which did not ("" for one task)."""
    tasks = decision.get("tasks")
    if not tasks:
        return ""
    verdicts = ", ".join(f"{name} {'pass' if d['passed'] else '**FAIL**'}" for name, d in tasks.items())
    return (f"- gate per task (every task must reach its own min_score; **no task may regress** beyond its own "
            f"max_regression against the champion's same task): {verdicts}\n")


def _stage_line(ref: StageRef) -> str:
    rows = ", ".join(f"{k} {v}" for k, v in ref.rows.items())
    return f"  {ref.stage:<9} cache {'hit ' if ref.cache_hit else 'miss'}  {ref.fingerprint[:12]}  rows: {rows}"


def brief(result: Any) -> str:
    """A few lines for ``python -m flows.<flow>``: per stage cache hit or miss, fingerprint prefix and rows; the outcome."""
    if isinstance(result, PreparedData):
        lines = ["prepare-data:", *(_stage_line(ref) for ref in result.stages.values()),
                 f"  data fingerprint {result.fingerprint[:12]}, MLflow run {result.run_id}"]
    elif isinstance(result, TrainedModel):
        metrics = result.stage.extra.get("metrics", {})
        resumed = resumed_from(result.stage)
        lines = ["train-model:", _stage_line(result.stage),
                 f"  best epoch {metrics.get('best_epoch')}, {metrics.get('steps')} steps"
                 f"{'' if resumed is None else f', resumed from epoch {resumed}'}; MLflow run {result.run_id}"]
    elif isinstance(result, Evaluated):
        test = ", ".join(f"{k} {v:.4f}" for k, v in result.stage.extra.get("test", {}).items())
        decision = result.stage.extra.get("decision", {})
        lines = ["evaluate-model:", _stage_line(result.stage), f"  test: {test}",
                 f"  gate: {'pass' if decision.get('passed') else 'fail'} ({decision.get('reason')}); "
                 f"MLflow run {result.run_id}"]
    elif isinstance(result, Deployed):
        release = result.release
        lines = ["deploy-model:", f"  model {result.uri}{' (existing version)' if result.reused else ''}: "
                 f"{'promoted to champion' if release.get('promoted') else 'not promoted'} ({release.get('reason')})",
                 f"  MLflow run {result.run_id}"]
    else:  # the pipeline's summary
        s = result
        test = ", ".join(f"{k} {v:.4f}" for k, v in flatten(s["metrics"]["test"]).items())
        cache = ", ".join(f"{k} {v}" for k, v in s["cache"].items())
        resumed = s.get("train", {}).get("resumed_from_epoch")
        lines = [f"nightshift-pipeline {s['recipe']}: {s['status']} in {s['timings_s']['total']:.1f} s",
                 f"  data fingerprint {s['data']['fingerprint'][:12]}, rows {s['data']['rows']}",
                 f"  cache: {cache}",
                 *([] if resumed is None else [f"  train resumed from epoch {resumed}"]),
                 f"  test: {test}",
                 f"  model {s['model']['uri']}: {'promoted' if s['decision']['promoted'] else 'not promoted'} "
                 f"({s['decision']['reason']})",
                 f"  MLflow run {s['mlflow']['parent_run_id']} ({s['mlflow']['tracking_uri']})"]
    return "\n".join(lines)
