"""Run bookkeeping shared by every stage task: MLflow runs, stage logging, what the flows hand each other.

``tracked()`` is the body of every thin stage ``@task``: it runs the stage against the artifact store,
times it, says whether it was a cache hit, and logs the stage's metrics and files to the stage's MLflow
run. The small frozen models here (``PreparedData``, ``TrainedModel``, ``Evaluated``, ``Deployed``) are
what the sub-flows return: references, never data.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.context import FlowRunContext
from pydantic import BaseModel, ConfigDict, Field

from tasks import tracking
from tasks.artifacts import ArtifactStore, DataError, StageError, StageRef
from tasks.config import Recipe, flatten
from tasks.settings import get_settings


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class PreparedData(Frozen):
    """Output of prepare_data: one reference per prep stage."""

    run_id: str | None = Field(description="MLflow run of the prep sub-flow.")
    stages: dict[str, StageRef] = Field(description="ingest, validate, clean, split, tokenize, augment.")

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
    """Commit of the working tree the code runs from, or 'unknown' outside git."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # called outside a Prefect run (unit tests, benchmarks)
        import logging

        return logging.getLogger("nightshift")


def tracked(run_id: str | None, stage: str, work: Callable[[ArtifactStore], StageRef]) -> StageRef:
    """Run one stage against the store, then log its metrics, files and cache status to ``run_id``."""
    started = time.perf_counter()
    try:
        ref = work(store())
    except DataError as exc:  # the user's to fix: keep it one line, and say which stage found it
        raise exc if str(exc).startswith(stage) else DataError(f"{stage}: {exc}") from None
    except Exception as exc:
        raise StageError(stage, f"{type(exc).__name__}: {exc}") from exc
    seconds = time.perf_counter() - started
    status = "hit" if ref.cache_hit else "miss"
    _logger().info("%s: cache %s (%s), %.2fs, rows %s", stage, status, ref.fingerprint[:12], seconds, ref.rows)
    if run_id is not None:
        metrics = {f"{stage}.{k}": v for k, v in ref.extra.get("metrics", {}).items() if isinstance(v, (int, float))}
        metrics.update({f"{stage}.rows_{k}": v for k, v in ref.rows.items()})
        metrics[f"{stage}.seconds"] = seconds
        tracking.log_metrics(run_id, metrics)
        tracking.set_tags(run_id, {f"nightshift.cache.{stage}": status, f"nightshift.fingerprint.{stage}": ref.fingerprint})
        for name in ref.extra.get("log_files", []):
            tracking.log_artifact(run_id, ref.file(name), stage)
    return ref.model_copy(update={"extra": {**ref.extra, "seconds": seconds}})


@task(name="open-mlflow-run", retries=2, retry_delay_seconds=2, cache_policy=NONE)
def open_run(recipe: Recipe, kind: str, parent_run_id: str | None = None) -> str:
    """Start the MLflow run of a (sub-)flow: nested under the pipeline run when there is one."""
    settings = get_settings()
    tracking.configure(settings)
    experiment_id = tracking.ensure_experiment(recipe.name, settings)
    ctx = FlowRunContext.get()
    tags = {"nightshift.kind": kind, "nightshift.recipe": recipe.name, "nightshift.git_commit": git_commit(),
            "nightshift.config_hash": recipe.config_hash()}
    if ctx is not None and ctx.flow_run is not None:
        tags["prefect.flow_run_id"] = str(ctx.flow_run.id)
        tags["prefect.flow_run_name"] = str(ctx.flow_run.name)
    run_id = tracking.start_run(experiment_id, f"{recipe.name}-{kind}", parent_run_id, tags)
    if parent_run_id is None:
        tracking.log_params(run_id, flatten(recipe.as_dict()))
    return run_id


@task(name="close-mlflow-run", retries=2, retry_delay_seconds=2, cache_policy=NONE)
def close_run(run_id: str, failed: bool = False, tags: dict[str, Any] | None = None) -> None:
    if tags:
        tracking.set_tags(run_id, tags)
    tracking.end_run(run_id, "FAILED" if failed else "FINISHED")


@contextlib.contextmanager
def mlflow_run(recipe: Recipe, kind: str, parent_run_id: str | None) -> Iterator[str]:
    """An MLflow run for the body of a sub-flow: FINISHED on success, FAILED (and re-raised) on error."""
    run_id = open_run(recipe, kind, parent_run_id)
    try:
        yield run_id
    except BaseException:
        close_run(run_id, failed=True)
        raise
    close_run(run_id)


PREP_STAGES = ("ingest", "validate", "clean", "split", "tokenize", "augment")


def build_summary(
    recipe: Recipe, run_id: str, data: PreparedData, trained: TrainedModel, evaluated: Evaluated,
    deployed: Deployed, total_seconds: float,
) -> dict[str, Any]:
    """The run summary, with exactly the fields DESIGN.md lists for ``--summary-json``."""
    stages = {**data.stages, "train": trained.stage, "evaluate": evaluated.stage}
    split = data.stages["split"].rows
    accepted = sum(split.get(k, 0) for k in ("train", "validation", "test"))
    rejected = sum(ref.rows.get("rejected", 0) for ref in data.stages.values())
    release = deployed.release
    return {
        "status": "completed",
        "recipe": recipe.name,
        "mlflow": {
            "tracking_uri": tracking.tracking_uri(), "experiment_id": tracking.experiment_of(run_id),
            "parent_run_id": run_id,
            "stage_runs": {"prep": data.run_id, "train": trained.run_id, "evaluate": evaluated.run_id,
                           "deploy": deployed.run_id},
        },
        "data": {
            "fingerprint": data.fingerprint,
            "rows": {"input": data.stages["ingest"].rows.get("input", accepted + rejected), "accepted": accepted,
                     "rejected": rejected, "train": split.get("train", 0), "validation": split.get("validation", 0),
                     "test": split.get("test", 0)},
        },
        "metrics": {"test": dict(evaluated.stage.extra["test"])},
        "model": {"name": deployed.name, "version": deployed.version, "uri": deployed.uri},
        "decision": {"promoted": release["promoted"], "reason": release["reason"],
                     "champion_before": release["champion_before"], "champion_after": release["champion_after"]},
        "cache": {**{name: "hit" if ref.cache_hit else "miss" for name, ref in stages.items()},
                  "register": "hit" if deployed.reused else "miss"},
        "timings_s": {**{name: round(ref.extra.get("seconds", 0.0), 3) for name, ref in stages.items()},
                      "total": round(total_seconds, 3)},
    }


def summary_markdown(summary: dict[str, Any]) -> str:
    test = " · ".join(f"{k} **{v:.4f}**" for k, v in summary["metrics"]["test"].items())
    decision = summary["decision"]
    cache = ", ".join(f"{k}: {v}" for k, v in summary["cache"].items())
    return (
        f"# Nightshift run: {summary['recipe']}\n\n"
        f"- test: {test}\n"
        f"- model: `{summary['model']['uri']}` — {'**promoted**' if decision['promoted'] else 'not promoted'}: "
        f"{decision['reason']} (champion {decision['champion_before']} → {decision['champion_after']})\n"
        f"- data: fingerprint `{summary['data']['fingerprint'][:12]}`, rows {summary['data']['rows']}\n"
        f"- cache: {cache}\n"
        f"- MLflow: {summary['mlflow']['tracking_uri']}, experiment {summary['mlflow']['experiment_id']}, "
        f"run `{summary['mlflow']['parent_run_id']}`\n"
        f"- total time: {summary['timings_s']['total']:.1f} s\n"
    )


@task(name="summarize", retries=2, retry_delay_seconds=2, cache_policy=NONE)
def summarize(
    recipe: Recipe, run_id: str, data: PreparedData, trained: TrainedModel, evaluated: Evaluated,
    deployed: Deployed, started: float,
) -> dict[str, Any]:
    """Build the run summary; tag and log it on the parent MLflow run and as a Prefect markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    summary = build_summary(recipe, run_id, data, trained, evaluated, deployed, time.time() - started)
    tracking.set_tags(run_id, {"nightshift.data_fingerprint": data.fingerprint,
                               "nightshift.model_version": deployed.version,
                               "nightshift.promoted": summary["decision"]["promoted"]})
    tracking.log_metrics(run_id, {f"test_{k}": v for k, v in summary["metrics"]["test"].items()})
    tracking.log_text(run_id, json.dumps(summary, indent=2), "summary.json")
    markdown = summary_markdown(summary)
    tracking.log_text(run_id, markdown, "summary.md")
    create_markdown_artifact(markdown, key=f"{recipe.name.lower().replace('_', '-').replace('.', '-')}-summary",
                             description="Nightshift run summary")
    return summary
