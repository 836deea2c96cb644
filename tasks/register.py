"""Stage: register. Logs the trained model as one MLflow pyfunc and registers it as the challenger.

The bundle (weights + tokenizer + label map + cleaning rules + config; for image recipes weights +
normalisation + label map) is assembled in the artifact store, logged once as a pyfunc with signature
and input example, and registered as a new version of the recipe's model with alias ``challenger``
and lineage tags. A version already registered from the
same training fingerprint is reused, so an unchanged rerun adds no version.

Run alone: part of ``python -m flows.deploy_model --config configs/sst2.yaml``.
"""

from __future__ import annotations

import shutil
import sys
from typing import Any

import numpy as np
import pyarrow.parquet as pq
from prefect import task
from prefect.cache_policies import NONE
from pydantic import BaseModel, ConfigDict, Field

from tasks import tracking
from tasks.artifacts import ArtifactStore, StageRef, fingerprint, source_hash
from tasks.config import Recipe
from tasks.lineage import git_commit, tracked

STAGE = "package"
TRAIN_FP_TAG = "nightshift.train_fingerprint"


class RegisteredModel(BaseModel):
    """A registered model version, by reference."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(description="Registered model name.")
    version: str = Field(description="Registry version number.")
    uri: str = Field(description="models:/NAME/VERSION")
    reused: bool = Field(description="True when an existing version from the same training run was reused.")


IMAGE_TASK = "image-classification"


def bundle(recipe: Recipe, trained: StageRef, store: ArtifactStore) -> StageRef:
    """Assemble the pyfunc bundle directory (fingerprinted, so it is built once per trained model).

    Text: weights, tokenizer, label map and cleaning rules. Images: weights, normalisation (mean/std,
    image shape) and label map.
    """
    if recipe.task == IMAGE_TASK:
        meta = {"task": recipe.task, "recipe": recipe.name, "model_kind": trained.extra.get("model_kind")}
        files = ("model.pt", "normalization.json", "labels.json")
    else:
        meta = {"task": recipe.task, "clean": recipe.clean.model_dump(mode="json"),
                "tokenizer": recipe.tokenizer.model_dump(mode="json"), "recipe": recipe.name}
        files = ("model.pt", "tokenizer.json", "labels.json")
    code = source_hash(sys.modules[__name__])
    fp = fingerprint(STAGE, meta, [trained.fingerprint], code)
    if (hit := store.lookup(STAGE, fp)) is not None:
        return hit
    with store.writer(STAGE, fp) as w:
        for name in files:
            shutil.copyfile(trained.file(name), w.path / name)
        w.write_json("bundle.json", meta)
        return w.write_manifest(config=meta, inputs=[trained.fingerprint], code=code, rows={})


def register(
    recipe: Recipe, trained: StageRef, bundle_ref: StageRef, run_id: str, examples: list[Any],
    tags: dict[str, Any],
) -> RegisteredModel:
    """Log + register the bundle as a new version (or reuse the one from the same training run); alias challenger.

    ``examples`` are the input example's rows: texts, or pixel lists for image recipes.
    """
    from tasks import packaging

    name = recipe.model_name
    existing = tracking.find_version(name, TRAIN_FP_TAG, trained.fingerprint)
    if existing is not None:
        return RegisteredModel(name=name, version=existing, uri=f"models:/{name}/{existing}", reused=True)
    labels = list(trained.extra["labels"])
    if recipe.task == IMAGE_TASK:
        model_uri = packaging.log_image_classifier(run_id, bundle_ref.file(""), examples, labels,
                                                   trained.extra["normalization"]["image_shape"])
    else:
        model_uri = packaging.log_text_classifier(run_id, bundle_ref.file(""), examples, labels)
    version = tracking.register_version(model_uri, name, run_id, {TRAIN_FP_TAG: trained.fingerprint, **tags})
    tracking.set_alias(name, "challenger", version)
    return RegisteredModel(name=name, version=version, uri=f"models:/{name}/{version}", reused=False)


@task(name="register", retries=2, retry_delay_seconds=3, cache_policy=NONE)
def register_task(recipe: Recipe, trained: StageRef, evaluated: StageRef, tokenized: StageRef,
                  data_fingerprint: str, run_id: str) -> RegisteredModel:
    """Bundle, log and register the challenger (or reuse its existing version); tag it with lineage and the gate."""
    tracking.configure()
    bundle_ref = tracked(None, STAGE, lambda store: bundle(recipe, trained, store))
    if recipe.task == IMAGE_TASK:
        pixels = pq.read_table(tokenized.file("test.parquet"), columns=["pixels"]).column("pixels").slice(0, 3)
        examples: list[Any] = np.asarray(pixels.combine_chunks().flatten(), dtype=np.int64).reshape(
            len(pixels), -1).tolist()
    else:
        examples = pq.read_table(tokenized.file("test.parquet"), columns=["text"]).column("text").to_pylist()
    decision = evaluated.extra["decision"]
    tags = {"nightshift.data_fingerprint": data_fingerprint, "nightshift.recipe": recipe.name,
            "nightshift.config_hash": recipe.config_hash(), "nightshift.git_commit": git_commit(),
            **{f"metric.{k}": round(v, 6) for k, v in evaluated.extra["test"].items()}}
    registered = register(recipe, trained, bundle_ref, run_id, examples, tags)
    tracking.set_version_tags(registered.name, registered.version, {
        "nightshift.gate": "pass" if decision["passed"] else "fail", "nightshift.gate_reason": decision["reason"]})
    if registered.reused:
        tracking.set_alias(registered.name, "challenger", registered.version)
    return registered
