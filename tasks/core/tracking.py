"""Every MLflow call of Nightshift lives here (and in ``tasks.core.packaging`` for the pyfunc itself).

Runs are addressed by explicit run id through ``MlflowClient`` rather than MLflow's thread-local
"active run", because Prefect may run tasks in worker threads: a fluent ``mlflow.log_metric`` from a
task thread would silently start a stray run. The tracking URI is set by ``configure()``, called when
a flow starts, never on import.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunTag
from mlflow.exceptions import MlflowException, RestException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from tasks.core.settings import Settings, get_settings

log = logging.getLogger(__name__)
T = TypeVar("T")

# MLflow limits: 100 params / 1000 metrics per log_batch call, 6000 chars per param value.
_MAX_PARAMS, _MAX_METRICS, _MAX_PARAM_LEN = 100, 1000, 6000


def retry(fn: Callable[..., T]) -> Callable[..., T]:
    """Retry a tracking call on transient failures (server restarts, SQLite 'database is locked')."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        delay = 0.5
        for attempt in range(4):
            try:
                return fn(*args, **kwargs)
            except (MlflowException, OSError, ConnectionError) as exc:
                transient = isinstance(exc, (OSError, ConnectionError)) or "locked" in str(exc) or (
                    isinstance(exc, RestException) and exc.get_http_status_code() >= 500
                )
                if not transient or attempt == 3:
                    raise
                log.warning("tracking call %s failed (%s); retrying in %.1fs", fn.__name__, exc, delay)
                time.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    return wrapper


def configure(settings: Settings | None = None) -> str:
    """Point MLflow at the configured store (embedded SQLite by default); return the tracking URI."""
    settings = settings or get_settings()
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        settings.home.mkdir(parents=True, exist_ok=True)
        _create_embedded_store(uri, settings)
    exported = {var: os.environ.get(var) for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(settings.mlflow_registry_uri or uri)
    # MLflow exports both URIs to the environment; left there, Settings would read them back as the user's
    # own choice, and the next NIGHTSHIFT_HOME (a test, a second recipe) would keep this store
    for var, value in exported.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    return uri


_CREATED: set[str] = set()  # embedded stores this process has made sure exist


def _create_embedded_store(uri: str, settings: Settings) -> None:
    """Create the embedded SQLite store's tables once, under a file lock.

    Two processes opening a fresh store at once (two `nightshift run` started together) would both run
    MLflow's migrations and one fails with "table ... already exists"; the lock makes the second find
    the tables made.
    """
    if uri in _CREATED:
        return
    from tasks.core.lock import release_lock

    with release_lock(settings.home / "locks", "mlflow-db", 600, {"pid": os.getpid(), "command": "create MLflow store"}):
        store = MlflowClient(tracking_uri=uri, registry_uri=settings.mlflow_registry_uri or uri)
        store.search_experiments(max_results=1)
        store.search_registered_models(max_results=1)
    _CREATED.add(uri)


def client() -> MlflowClient:
    return MlflowClient()


# MLflow 3 opens an experiment in its GenAI view (traces, assistant) unless the experiment says what it is; the
# UI reads this tag (values "custom_model_development": model training, or "genai_development").
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


@retry
def ensure_experiment(name: str, settings: Settings | None = None) -> str:
    """Experiment id for ``name``, created on first use (artifacts under NIGHTSHIFT_HOME when embedded).

    The experiment is tagged as a model-training experiment, so MLflow's UI opens it on its runs.
    """
    settings = settings or get_settings()
    c = client()
    experiment = c.get_experiment_by_name(name)
    if experiment is not None:
        if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # made before the tag, or by someone else
            c.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return experiment.experiment_id
    location = None
    if settings.mlflow_tracking_uri is None:
        location = (settings.mlflow_artifact_root / name).as_uri()
    try:
        return c.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    except MlflowException:  # created concurrently by another run
        return c.get_experiment_by_name(name).experiment_id


@retry
def start_run(
    experiment_id: str, run_name: str, parent_run_id: str | None = None, tags: dict[str, str] | None = None
) -> str:
    """Create a run (nested under ``parent_run_id`` when given) and return its id."""
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client().create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


@retry
def end_run(run_id: str, status: str = "FINISHED", end_time: int | None = None) -> None:
    client().set_terminated(run_id, status=status, end_time=end_time)


@retry
def run_state(run_id: str) -> tuple[str, int | None]:
    """A run's status and end time (ms), to put back after something reopened it."""
    info = client().get_run(run_id).info
    return info.status, info.end_time


@retry
def set_tags(run_id: str, tags: dict[str, Any]) -> None:
    client().log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])


@retry
def log_params(run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in params.items()]
    for i in range(0, len(items), _MAX_PARAMS):
        client().log_batch(run_id, params=items[i : i + _MAX_PARAMS])


@retry
def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    now = int(time.time() * 1000)
    items = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
    for i in range(0, len(items), _MAX_METRICS):
        client().log_batch(run_id, metrics=items[i : i + _MAX_METRICS])


class MetricBuffer:
    """Collects per-step metrics and logs them in batches (one call per ``every`` steps, not per step)."""

    def __init__(self, run_id: str | None, every: int = 50):
        self.run_id, self.every, self.pending = run_id, every, []

    def add(self, step: int, metrics: dict[str, float]) -> None:
        if self.run_id is None:
            return
        now = int(time.time() * 1000)
        self.pending.extend(Metric(k, float(v), now, step) for k, v in metrics.items())
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        if self.run_id is not None and self.pending:
            items, self.pending = self.pending, []
            for i in range(0, len(items), _MAX_METRICS):
                _log_batch(self.run_id, items[i : i + _MAX_METRICS])


@retry
def _log_batch(run_id: str, metrics: list[Metric]) -> None:
    client().log_batch(run_id, metrics=metrics)


@retry
def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if path.is_dir():
        client().log_artifacts(run_id, str(path), artifact_path)
    elif path.exists():
        client().log_artifact(run_id, str(path), artifact_path)


@retry
def log_text(run_id: str, text: str, artifact_file: str) -> None:
    client().log_text(run_id, text, artifact_file)


@retry
def set_note(run_id: str, text: str) -> None:
    """The run's description (MLflow's ``mlflow.note.content``), shown at the top of the run page."""
    client().set_tag(run_id, "mlflow.note.content", text)


@retry
def log_dataset(run_id: str, name: str, digest: str, source: str, context: str = "training",
                profile: dict[str, Any] | None = None) -> None:
    """Log a dataset input of the run (MLflow's Dataset column): ``name (digest)``, read from ``source``.

    The dataset is described, not uploaded: what ``mlflow.data``'s meta dataset logs (name, digest, the
    source's path or URL, a profile), with the digest the caller gives (the data fingerprint).
    """
    web = source.startswith(("http://", "https://"))
    entity = Dataset(name=name, digest=digest, source_type="http" if web else "local",
                     source=json.dumps({"url": source} if web else {"uri": source}),
                     profile=None if profile is None else json.dumps(profile, default=str))
    client().log_inputs(run_id, datasets=[DatasetInput(entity, tags=[InputTag(MLFLOW_DATASET_CONTEXT, context)])])


UI_WORKFLOW = "workflowType=machine_learning"


def run_url(run_id: str) -> str:
    """Where a person finds the run: a UI link on a server, the run id on the embedded store."""
    run = client().get_run(run_id)
    uri = mlflow.get_tracking_uri()
    if uri.startswith("http"):
        # the UI's sidebar defaults to its GenAI workflow (traces, prompts) unless the link asks for model training
        return f"{uri.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run_id}?{UI_WORKFLOW}"
    return f"{uri} (experiment {run.info.experiment_id}, run {run_id})"


# ---------------------------------------------------------------- registry


@retry
def alias_version(name: str, alias: str) -> str | None:
    """Version number holding ``alias`` on registered model ``name``, or None."""
    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@retry
def find_version(name: str, tag: str, value: str) -> str | None:
    """Newest version of ``name`` whose tag ``tag`` equals ``value``, or None."""
    try:
        versions = client().search_model_versions(f"name = '{name}' and tags.`{tag}` = '{value}'")
    except MlflowException:
        return None
    newest = max((int(v.version) for v in versions), default=None)
    return None if newest is None else str(newest)


@retry
def register_version(model_uri: str, name: str, run_id: str, tags: dict[str, Any]) -> str:
    """Register ``model_uri`` as a new version of ``name`` with ``tags``; return the version."""
    c = client()
    try:
        c.create_registered_model(name, description="Trained and released by Nightshift.")
    except MlflowException:
        pass  # already exists
    # MLflow 3 logs a model as a LoggedModel (models:/m-<id>); a tracking server accepts that source only
    # together with its model_id (the embedded store does not check)
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    version = c.create_model_version(name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                     model_id=model_id)
    return str(version.version)


@retry
def set_alias(name: str, alias: str, version: str) -> None:
    client().set_registered_model_alias(name, alias, version)


@retry
def delete_alias(name: str, alias: str) -> None:
    client().delete_registered_model_alias(name, alias)


@retry
def version_info(name: str, version: str) -> dict[str, Any]:
    v = client().get_model_version(name, version)
    return {"version": str(v.version), "run_id": v.run_id, "source": v.source, "tags": dict(v.tags), "aliases": list(v.aliases)}


def _missing(exc: MlflowException) -> bool:
    """True when ``exc`` says the thing asked for does not exist; any other failure (auth, network, a
    broken store) is not an answer and must propagate."""
    return exc.error_code == "RESOURCE_DOES_NOT_EXIST"


@retry
def model_tags(name: str) -> dict[str, str]:
    """The registered model's own tags (empty when the model does not exist; other errors propagate)."""
    try:
        return dict(client().get_registered_model(name).tags)
    except MlflowException as exc:
        if not _missing(exc):
            raise
        return {}


@retry
def set_model_tag(name: str, key: str, value: str) -> None:
    """Set one tag on the registered model (values up to 5000 characters on a SQL store)."""
    client().set_registered_model_tag(name, key, value)


@retry
def model_exists(name: str) -> bool:
    """Whether registered model ``name`` exists (errors other than "does not exist" propagate)."""
    try:
        client().get_registered_model(name)
        return True
    except MlflowException as exc:
        if not _missing(exc):
            raise
        return False


def input_example(model_uri: str) -> list[Any] | None:
    """The inputs of the input example logged with a model (one column's values), or None when it has none."""
    example = mlflow.models.Model.load(model_uri).load_input_example(model_uri)
    if example is None:
        return None
    if hasattr(example, "columns"):
        return example[example.columns[0]].tolist()
    if isinstance(example, dict):
        return list(next(iter(example.values())))
    return list(example)


@retry
def download_model_version(name: str, version: str, dst: Path) -> Path:
    """Download registered version ``version`` of ``name`` (the whole logged model) into ``dst``; return the folder."""
    dst.mkdir(parents=True, exist_ok=True)
    return Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))


def load_pyfunc(model_uri: str) -> Any:
    """Load a pyfunc model by URI (``models:/NAME@alias`` or ``models:/NAME/VERSION``)."""
    return mlflow.pyfunc.load_model(model_uri)


@retry
def experiment_of(run_id: str) -> str:
    return client().get_run(run_id).info.experiment_id


def tracking_uri() -> str:
    return mlflow.get_tracking_uri()
