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
from tasks.core.store import StageRef
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
    tracking.log_metrics(run_id, {f"test_{k}": v for k, v in summary["metrics"]["test"].items()})
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
def train(recipe: AnyRecipe, augmented: StageRef, encoded: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Train (or find the identical trained model in the store); per-step loss and per-epoch metrics to MLflow."""
    steps = tracking.MetricBuffer(run_id)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        steps.add(epoch, {f"epoch_{k}": v for k, v in metrics.items() if k != "epoch"})
        steps.flush()

    def work(store: Any) -> StageRef:
        ref = kind_of(recipe).train(recipe, augmented, encoded, store, get_settings().checkpoints_root, force,
                                    steps.add, on_epoch)
        steps.flush()
        return ref

    log_data_input(run_id, recipe, augmented.fingerprint, encoded.rows, "training")
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
        import pandas as pd

        model = tracking.load_pyfunc(f"models:/{model_name}/{version}")
        return [str(label) for label in model.predict(pd.DataFrame({column: list(inputs)}))["label"].tolist()]

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


@task(name="deploy", retries=0, cache_policy=NONE)
def deploy(recipe: AnyRecipe, version: str, evaluated: StageRef, encoded: StageRef, sample: int = 32) -> release_stage.Release:
    """Promote when the gate passed; smoke-test the champion alias against the offline predictions."""
    tracking.configure()
    kind = kind_of(recipe)
    decision = evaluated.extra["decision"]
    expected = json.loads(evaluated.file("predictions.json").read_text())["pred"][:sample]
    inputs = kind.examples(encoded, sample)
    outcome = release_stage.release(
        recipe.model_name, version, decision["passed"], decision["reason"],
        smoke=lambda uri: release_stage.smoke_test(uri, inputs, expected, kind.input_column))
    _logger().info("deploy: %s", outcome.reason)
    return outcome
