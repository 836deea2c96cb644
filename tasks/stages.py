"""The pipeline's Prefect tasks: the only ``@task``s in Nightshift.

Each is a thin wrapper: it asks the registry for the recipe's kind, runs that kind's stage against
the fingerprinted store (:func:`tasks.core.lineage.tracked`: cache hit or compute, timing, MLflow
logging) and returns the small frozen reference the next stage needs.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE
from prefect.context import FlowRunContext

from tasks import deploy as release_stage
from tasks import register as register_stage
from tasks.core import tracking
from tasks.core.config import flatten
from tasks.core.kind import ChampionScorer
from tasks.core.lineage import (
    Deployed,
    Evaluated,
    PreparedData,
    TrainedModel,
    build_summary,
    git_commit,
    log_data_input,
    resumed_from,
    summary_markdown,
    tracked,
)
from tasks.core.settings import get_settings
from tasks.core.store import StageRef, bounded, one_line
from tasks.registry import AnyRecipe, kind_of


def _logger() -> Any:
    try:
        return get_run_logger()
    except Exception:  # called outside a Prefect run (unit tests, benchmarks)
        import logging

        return logging.getLogger("nightshift")


# runs that carry the flattened recipe as params: the pipeline's, and the train run (a model version's source run)
PARAM_RUNS = ("pipeline", "train")


def open_run(recipe: AnyRecipe, kind: str, parent_run_id: str | None = None) -> str:
    """Start the MLflow run of a (sub-)flow: nested under the pipeline run when there is one.

    Plain bookkeeping, not a Prefect task: a run id returned by a task would become an upstream of
    every task it is handed to, and the flow's graph would fan out from it instead of reading like the
    DAG. The tracking calls retry transient failures themselves.
    """
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
    if parent_run_id is None or kind in PARAM_RUNS:
        tracking.log_params(run_id, flatten(recipe.as_dict()))
    return run_id


def close_run(run_id: str, failed: bool = False, tags: dict[str, Any] | None = None) -> None:
    if tags:
        tracking.set_tags(run_id, tags)
    tracking.end_run(run_id, "FAILED" if failed else "FINISHED")


@contextlib.contextmanager
def mlflow_run(recipe: AnyRecipe, kind: str, parent_run_id: str | None) -> Iterator[str]:
    """An MLflow run for the body of a sub-flow: FINISHED on success, FAILED (and re-raised) on error."""
    run_id = open_run(recipe, kind, parent_run_id)
    try:
        yield run_id
    except BaseException:
        close_run(run_id, failed=True)
        raise
    close_run(run_id)


@task(name="summarize", retries=2, retry_delay_seconds=2, cache_policy=NONE)
def summarize(
    recipe: AnyRecipe, run_id: str, data: PreparedData, trained: TrainedModel, evaluated: Evaluated,
    deployed: Deployed, started: float,
) -> dict[str, Any]:
    """Build the run summary; tag and log it on the parent MLflow run and as a Prefect markdown artifact."""
    from prefect.artifacts import create_markdown_artifact

    summary = build_summary(recipe, run_id, data, trained, evaluated, deployed, time.time() - started)
    tracking.set_tags(run_id, {"nightshift.data_fingerprint": data.fingerprint,
                               "nightshift.model_version": deployed.version,
                               "nightshift.promoted": summary["decision"]["promoted"]})
    log_data_input(run_id, recipe, data.fingerprint, data.stages["encode"].rows, "training")
    tracking.log_metrics(run_id, {f"test_{k}": v for k, v in flatten(summary["metrics"]["test"]).items()})  # multi-task: nested per task
    tracking.log_text(run_id, json.dumps(summary, indent=2), "summary.json")
    runs = {"pipeline": run_id, **summary["mlflow"]["stage_runs"]}
    on_server = summary["mlflow"]["tracking_uri"].startswith(("http://", "https://"))  # UI pages to link to
    markdown = summary_markdown(summary, {name: tracking.run_url(rid) for name, rid in runs.items()} if on_server else None)
    tracking.log_text(run_id, markdown, "summary.md")
    create_markdown_artifact(markdown, key=f"{recipe.name.lower().replace('_', '-').replace('.', '-')}-summary",
                             description="Nightshift run summary")
    return summary


# ---------------------------------------------------------------------------------------------- data prep


@task(name="ingest", cache_policy=NONE)
def ingest(recipe: AnyRecipe, run_id: str | None, force: bool = False) -> StageRef:
    """Read the recipe's files into canonical rows; malformed rows go to rejects with their reason."""
    return tracked(run_id, "ingest", lambda store: kind_of(recipe).ingest(recipe, store, force), _logger())


@task(name="validate", cache_policy=NONE)
def validate(recipe: AnyRecipe, ingested: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Check the ingested data; write the validation report; fail above the recipe's thresholds."""
    return tracked(run_id, "validate", lambda store: kind_of(recipe).validate(recipe, ingested, store, force), _logger())


@task(name="clean", cache_policy=NONE)
def clean(recipe: AnyRecipe, validated: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Normalise and filter rows; every dropped row goes to rejects with its reason."""
    return tracked(run_id, "clean", lambda store: kind_of(recipe).clean(recipe, validated, store, force), _logger())


@task(name="split", cache_policy=NONE)
def split(recipe: AnyRecipe, cleaned: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Seeded, stratified, leakage-free train / validation / test split."""
    return tracked(run_id, "split", lambda store: kind_of(recipe).split(recipe, cleaned, store, force), _logger())


@task(name="encode", cache_policy=NONE)
def encode(recipe: AnyRecipe, split_ref: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Fit the encoding on train (tokenizer, pixel normalisation) and encode every split; the label map."""
    return tracked(run_id, "encode", lambda store: kind_of(recipe).encode(recipe, split_ref, store, force), _logger())


@task(name="augment", cache_policy=NONE)
def augment(recipe: AnyRecipe, encoded: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Seeded augmentation of the train split (originals kept); a pass-through when disabled."""
    augmented = tracked(run_id, "augment", lambda store: kind_of(recipe).augment(recipe, encoded, store, force), _logger())
    log_data_input(run_id, recipe, augmented.fingerprint, encoded.rows, "prepared")  # its fingerprint is the data's
    return augmented


# ---------------------------------------------------------------------------------------------- model


@task(name="train", cache_policy=NONE)
def train(recipe: AnyRecipe, augmented: StageRef, encoded: StageRef, run_id: str | None, force: bool = False,
          teachers: dict[str, TrainedModel] | None = None) -> StageRef:
    """Train (or find the identical trained model in the store); per-step loss and per-epoch metrics to MLflow.
    ``teachers``: a multi-task recipe's trained teachers by task (``tasks.<t>.distill``), tagged on the run."""
    steps = tracking.MetricBuffer(run_id)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        steps.add(epoch, {f"epoch_{k}": v for k, v in metrics.items() if k != "epoch"})
        steps.flush()

    def work(store: Any) -> StageRef:
        taught = {"teachers": {name: t.stage for name, t in teachers.items()}} if teachers else {}
        ref = kind_of(recipe).train(recipe, augmented, encoded, store, get_settings().checkpoints_root, force,
                                    steps.add, on_epoch, **taught)
        steps.flush()
        return ref

    log_data_input(run_id, recipe, augmented.fingerprint, encoded.rows, "training")
    if run_id is not None and teachers:
        tracking.set_tags(run_id, {f"nightshift.teacher.{name}.{key}": value for name, t in teachers.items()
                                   for key, value in (("run_id", t.run_id), ("fingerprint", t.stage.fingerprint))
                                   if value is not None})
    trained = tracked(run_id, "train", work, _logger())
    if run_id is not None and (epoch := resumed_from(trained)) is not None:
        _logger().info("train: resumed from epoch %s (the checkpoint of an interrupted run)", epoch)
        tracking.set_tags(run_id, {"nightshift.resumed_from_epoch": epoch})
        tracking.set_note(run_id, f"Training resumed from epoch {epoch}: the checkpoint an interrupted run left "
                                  f"(`last.pt` of train fingerprint `{trained.fingerprint[:12]}`).")
    return trained


def champion_scorer(model_name: str, column: str) -> tuple[str | None, ChampionScorer | None]:
    """The current champion's version and a scorer that loads it through the registry on first use."""
    version = tracking.alias_version(model_name, "champion")
    if version is None:
        return None, None

    def scorer(inputs: list[Any]) -> list[str]:
        return release_stage.predict_labels(tracking.load_pyfunc(f"models:/{model_name}/{version}"), inputs, column)

    return version, scorer


@task(name="evaluate", cache_policy=NONE)
def evaluate(recipe: AnyRecipe, trained: StageRef, encoded: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Score challenger and re-scored champion on the test split; apply the gate."""
    tracking.configure()
    kind = kind_of(recipe)
    version, scorer = champion_scorer(recipe.model_name, kind.input_column)
    return tracked(run_id, "evaluate",
                   lambda store: kind.evaluate(recipe, trained, encoded, store, version, scorer, force), _logger())


# ---------------------------------------------------------------------------------------------- release


@task(name="register", retries=2, retry_delay_seconds=3, cache_policy=NONE)
def register(recipe: AnyRecipe, trained: StageRef, evaluated: StageRef, encoded: StageRef,
             data_fingerprint: str, train_run_id: str) -> register_stage.RegisteredModel:
    """Bundle, log and register the challenger (or reuse its existing version); tag it with lineage and the gate.

    The model is logged into the train run, so that run (params, curves, the gate decision) is the
    version's source run.
    """
    tracking.configure()
    kind = kind_of(recipe)
    bundle_ref = tracked(None, register_stage.STAGE,
                         lambda store: register_stage.bundle(recipe, kind, trained, store), _logger())
    return register_stage.register(recipe, kind, trained, evaluated, bundle_ref, train_run_id,
                                   kind.examples(encoded, 3), data_fingerprint)


def move_context(run_id: str | None) -> release_stage.MoveContext:
    """Who moves an alias, for the alias history: this process, the MLflow run, the Prefect flow run."""
    ctx = FlowRunContext.get()
    flow_run_id = str(ctx.flow_run.id) if ctx is not None and ctx.flow_run is not None else None
    return release_stage.MoveContext(mlflow_run_id=run_id, prefect_flow_run_id=flow_run_id)


@contextlib.contextmanager
def release_lock(recipe: AnyRecipe, parent_run_id: str | None) -> Iterator[None]:
    """The model's release lock (``tasks.core.lock``) around register and deploy; waits at most
    ``deploy.lock_timeout_s``. Not a task: the flow's process holds it while its tasks run."""
    with release_stage.model_lock(recipe.model_name, recipe.deploy.lock_timeout_s, move_context(parent_run_id)):
        yield


def log_canary(run_id: str | None, report: dict[str, Any] | None, error: str | None = None) -> None:
    """Infra validation's figures on the deploy run: latencies, memory, the served version, pass or the failed check."""
    if run_id is None or report is None:
        return
    figures = {f"canary.{k}": report[k] for k in ("p50_ms", "p99_ms", "batch_ms", "rss_mb", "startup_s", "requests",
                                                   "in_process_s") if report.get(k) is not None}
    tracking.log_metrics(run_id, figures)
    tracking.set_tags(run_id, {"nightshift.canary.served_version": report.get("served_version") or report.get("version"),
                               "nightshift.canary.result": f"failed: {report.get('failed_check') or error}"
                               if error else "passed"})
    tracking.log_text(run_id, json.dumps({**report, "error": error}, indent=2), "canary.json")


def judged_against(evaluated: StageRef) -> str | None:
    """The champion version the evaluation compared against (part of every evaluate stage's key config)."""
    try:
        config = json.loads(evaluated.file("manifest.json").read_text())["config"]
    except (OSError, ValueError, KeyError):
        config = {}
    return config["champion_version"] if "champion_version" in config else evaluated.extra["decision"].get(
        "champion_version")


@task(name="deploy", retries=0, cache_policy=NONE)
def deploy(recipe: AnyRecipe, version: str, evaluated: StageRef, encoded: StageRef, run_id: str | None = None,
           parent_run_id: str | None = None) -> release_stage.Release:
    """Promote when the gate passed: infra-validate the challenger in a real server, move champion, check the live server."""
    tracking.configure()
    kind, cfg = kind_of(recipe), recipe.deploy
    decision = evaluated.extra["decision"]
    expected = [str(p) for p in json.loads(evaluated.file("predictions.json").read_text())["pred"][:cfg.canary_size]]
    inputs = kind.examples(encoded, cfg.canary_size)
    try:
        outcome = release_stage.release(
            recipe.model_name, version, decision["passed"], decision["reason"],
            gate_champion=judged_against(evaluated),
            validate=release_stage.validator(recipe.model_name, inputs, expected, kind.input_column, cfg),
            switch=release_stage.switcher(cfg), context=move_context(parent_run_id or run_id))
    except release_stage.ReleaseError as exc:
        report = getattr(exc.__cause__, "report", None)
        log_canary(run_id, report.model_dump() if report is not None else None, one_line(exc, 4000))
        raise
    log_canary(run_id, outcome.canary)
    if run_id is not None:
        tracking.set_tags(run_id, {"nightshift.release": bounded(outcome.reason, 5000), "nightshift.promoted": outcome.promoted})
    _logger().info("deploy: %s", outcome.reason)
    return outcome


# ---------------------------------------------------------------------------------------------- alerts


def flow_run_url() -> str | None:
    """The Prefect UI page of the current flow run (its id alone on the ephemeral API, which has no UI)."""
    from prefect.settings import PREFECT_UI_URL

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    ui = PREFECT_UI_URL.value()
    return f"{ui.rstrip('/')}/runs/flow-run/{ctx.flow_run.id}" if ui else f"prefect flow run {ctx.flow_run.id} (no UI)"


def _links(run_id: str | None) -> dict[str, str | None]:
    mlflow_url = None
    if run_id is not None:
        try:
            mlflow_url = tracking.run_url(run_id)
        except Exception:  # the tracking store itself may be what failed
            mlflow_url = f"run {run_id}"
    return {"mlflow_run": mlflow_url, "prefect_flow_run": flow_run_url()}


def validation_summary(data: PreparedData) -> dict[str, Any]:
    """Rows in, rows rejected (by stage) and the validation's rejects by reason, for the alert."""
    by_stage = {name: ref.rows.get("rejected", 0) for name, ref in data.stages.items() if ref.rows.get("rejected")}
    return {"rows_in": data.stages["ingest"].rows.get("input"), "rows_rejected": sum(by_stage.values()),
            "rejected_by_stage": by_stage,
            "rejected_by_reason": dict(data.stages["validate"].extra.get("rejects_by_reason") or {}),
            "status": data.stages["validate"].extra.get("status")}


@task(name="alert", retries=0, cache_policy=NONE)
def alert(summary: dict[str, Any], data: PreparedData, evaluated: Evaluated) -> bool:
    """POST the run's news (decision, metric diff, validation summary, links) to NIGHTSHIFT_ALERT_WEBHOOK, if set.

    True when the webhook accepted it. Never raises: an alert that could not be built or sent is logged.
    """
    # the run is complete (and maybe promoted) by now: whatever goes wrong here, building the message
    # included, is logged and must not turn it into a failed run (nor send a failed-run alert)
    try:
        from tasks import alerts

        settings = get_settings()
        if not settings.nightshift_alert_webhook:
            return False
        champion = alerts.champion_metrics(evaluated.stage.extra.get("metrics") or {})
        message = alerts.completed_message(summary, validation_summary(data), champion,
                                           _links(summary["mlflow"]["parent_run_id"]))
        return alerts.send(settings.nightshift_alert_webhook, message, settings.nightshift_alert_timeout_s)
    except Exception as exc:
        _logger().warning("alert: could not send the completed-run alert: %s: %s", type(exc).__name__, one_line(exc))
        return False


@contextlib.contextmanager
def alert_on_failure(recipe: AnyRecipe, run_id: str) -> Iterator[None]:
    """Around the pipeline's body: a failure sends the failed-run alert (stage, one-line error), then propagates."""
    try:
        yield
    except Exception as exc:
        from tasks import alerts

        settings = get_settings()
        if settings.nightshift_alert_webhook:
            try:
                message = alerts.failed_message(recipe.name, recipe.model_name, exc, _links(run_id))
                alerts.send(settings.nightshift_alert_webhook, message, settings.nightshift_alert_timeout_s)
            except Exception as alert_exc:  # the alert must never hide the run's own error
                _logger().warning("alert: could not send the failure alert: %s: %s", type(alert_exc).__name__,
                                  one_line(alert_exc))
        raise


# ---------------------------------------------------------------------------------------------- batch scoring


@task(name="score", retries=0, cache_policy=NONE)
def score_file(model: str, input_path: str, output_path: str, alias: str = "champion", batch_size: int = 1024,
               id_column: str = "id", input_column: str | None = None) -> dict[str, Any]:
    """Stream ``input_path`` through ``models:/MODEL@ALIAS`` into ``output_path``; rows and counts to MLflow."""
    from pathlib import Path

    from tasks import score as scoring
    from tasks.core.store import DataError

    tracking.configure()
    version = tracking.alias_version(model, alias)
    if version is None:
        raise DataError(f"score: registered model {model!r} has no alias {alias!r} in {tracking.tracking_uri()}")
    pyfunc = tracking.load_pyfunc(f"models:/{model}/{version}")
    column, pixels = scoring.model_inputs(pyfunc)
    ctx = FlowRunContext.get()
    tags = {"nightshift.kind": "score", "nightshift.model": model, "nightshift.model_version": version,
            "nightshift.alias": alias}
    if ctx is not None and ctx.flow_run is not None:
        tags["prefect.flow_run_id"] = str(ctx.flow_run.id)
    run_id = tracking.start_run(tracking.ensure_experiment(f"{model}-scoring"), f"score-{model}-v{version}", None, tags)
    tracking.log_params(run_id, {"model": model, "alias": alias, "version": version, "input": input_path,
                                 "output": output_path, "batch_size": batch_size, "input_column": input_column or column})
    try:
        result = scoring.score_file(pyfunc, model, version, Path(input_path), Path(output_path),
                                    input_column or column, batch_size, id_column, pixels)
    except BaseException:
        close_run(run_id, failed=True)
        raise
    from tasks.core.rejects import metric_name

    tracking.log_metrics(run_id, {"rows_in": result.rows_in, "rows_scored": result.rows_scored,
                                  "rows_rejected": result.rows_rejected, "seconds": result.seconds,
                                  **{f"rejected.{metric_name(k)}": v for k, v in result.rejected_by_reason.items()}})
    tracking.log_text(run_id, result.model_dump_json(indent=2), "score.json")
    close_run(run_id)
    _logger().info("score: %d rows in, %d scored, %d rejected (%s)", result.rows_in, result.rows_scored,
                   result.rows_rejected, result.rejected_by_reason)
    return {**result.model_dump(), "mlflow_run_id": run_id}
