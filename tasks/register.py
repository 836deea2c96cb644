"""Stage: register. Logs the trained model as one MLflow pyfunc and registers it as the challenger.

The bundle (weights + tokenizer + label map + cleaning rules + config; for image recipes weights +
normalisation + label map) is assembled in the artifact store, logged once as a pyfunc with signature
and input example into the train run (the version's source run), and registered as a new version of
the recipe's model with alias ``challenger`` and lineage and gate tags. A version already registered
from the same training fingerprint is reused, so an unchanged rerun adds no version and leaves its
recorded gate decision as it was.

Run alone: part of ``python -m flows.deploy_model --config configs/sst2.yaml``.
"""

from __future__ import annotations

import shutil
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.core import tracking
from tasks.core.kind import Kind
from tasks.core.lineage import git_commit
from tasks.core.store import ArtifactStore, StageRef, stage_key

STAGE = "package"
TRAIN_FP_TAG = "nightshift.train_fingerprint"
VERSION_TAG = "nightshift.model_version"


class RegisteredModel(BaseModel):
    """A registered model version, by reference."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Registered model name.")
    version: str = Field(description="Registry version number.")
    uri: str = Field(description="models:/NAME/VERSION")
    reused: bool = Field(description="True when an existing version from the same training run was reused.")


def bundle(recipe: Any, kind: Kind, trained: StageRef, store: ArtifactStore) -> StageRef:
    """Assemble the pyfunc bundle directory (fingerprinted, so it is built once per trained model).

    The kind's ``bundle_files`` from the trained stage (weights, tokenizer or normalisation, label
    map ...), ``serving.json`` (what the predictor needs from the recipe: cleaning rules, label names)
    and ``bundle.json``: the task and the predictor class to load.
    """
    meta = {"task": kind.task, "predictor": kind.predictor, "recipe": recipe.name}
    serving = kind.serving(recipe, trained)
    key = stage_key(STAGE, {**meta, "serving": serving}, [trained.fingerprint], __name__)
    if (hit := store.cached(key)) is not None:
        return hit
    with store.writer(key) as w:
        for name in kind.bundle_files:
            source = trained.file(name)
            if source.is_dir():
                shutil.copytree(source, w.path / name)
            else:
                shutil.copyfile(source, w.path / name)
        w.write_json("bundle.json", meta)
        w.write_json("serving.json", serving)
        return w.write_manifest(rows={})


def register(
    recipe: Any, kind: Kind, trained: StageRef, evaluated: StageRef, bundle_ref: StageRef, run_id: str,
    examples: list[Any], data_fingerprint: str,
) -> RegisteredModel:
    """Log + register the bundle as a new version with alias challenger, lineage and gate tags.

    A version already registered from the same training fingerprint is reused (an unchanged rerun adds
    none): it gets the challenger alias back, but its recorded gate decision is never rewritten.
    ``examples`` are the input example's rows: texts, or pixel lists for image recipes.

    ``run_id`` is the train run: the model is logged into it and it is the version's source run, so the
    registry links to the run with the params and curves; it also gets the gate decision (tags) and the
    test metrics. A reused version keeps its own source run; this run is only tagged with its number.
    """
    from tasks.core import packaging

    name = recipe.model_name
    existing = tracking.find_version(name, TRAIN_FP_TAG, trained.fingerprint)
    if existing is not None:
        tracking.set_alias(name, "challenger", existing)
        tracking.set_tags(run_id, {VERSION_TAG: existing})
        return RegisteredModel(name=name, version=existing, uri=f"models:/{name}/{existing}", reused=True)
    decision = evaluated.extra["decision"]
    gate = {"nightshift.gate": "pass" if decision["passed"] else "fail", "nightshift.gate_reason": decision["reason"]}
    tags = {TRAIN_FP_TAG: trained.fingerprint, "nightshift.data_fingerprint": data_fingerprint,
            "nightshift.recipe": recipe.name, "nightshift.task": kind.task,
            "nightshift.config_hash": recipe.config_hash(), "nightshift.git_commit": git_commit(), **gate,
            **{f"metric.{k}": round(v, 6) for k, v in evaluated.extra["test"].items()}}
    state = tracking.run_state(run_id)
    model_uri = packaging.log_model(run_id, bundle_ref.file(""), kind.input_column, examples,
                                    list(trained.extra["labels"]), kind.task)
    if state[0] != "RUNNING":
        tracking.end_run(run_id, *state)  # logging reopened the finished train run: keep its status and duration
    version = tracking.register_version(model_uri, name, run_id, tags)
    tracking.set_alias(name, "challenger", version)
    tracking.set_tags(run_id, {**gate, VERSION_TAG: version})
    tracking.log_metrics(run_id, {f"test_{k}": v for k, v in evaluated.extra["test"].items()})
    return RegisteredModel(name=name, version=version, uri=f"models:/{name}/{version}", reused=False)
