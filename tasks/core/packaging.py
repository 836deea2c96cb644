"""The served model: one MLflow pyfunc for every kind, bundling weights, tokenizer or normalisation,
label map and serving rules.

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(frame)`` hands the frame to the kind's
inference-only predictor named in ``bundle.json`` (``tasks/<kind>/predict.py``). The predict path
imports only that predictor, ``models/`` and the libraries in :func:`pip_requirements`: no Prefect,
no pydantic-settings, no recipe loading, so the model serves anywhere the requirements are installed.

Classifiers answer with ``label`` (the predicted class as the data spells it), ``label_name`` (its
name from ``data.label_names``, else the label), ``score`` (its probability) and ``probabilities`` (one
per class, in the order of the ``labels`` metadata).
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array

# what the served code imports, each pinned to the version installed when the model was logged
REQUIREMENTS = ("mlflow", "torch", "tokenizers", "transformers", "safetensors", "pyarrow", "pandas", "numpy",
                "pydantic", "pyyaml")


class NightshiftModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around a kind's predictor (``bundle.json``: ``predictor = "module:Class"``)."""

    def load_context(self, context: Any) -> None:
        self.predictor = load_predictor(Path(context.artifacts["bundle"]))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame({self.predictor.input_column: list(model_input)})
        return self.predictor.predict(model_input)


def load_predictor(bundle: Path) -> Any:
    """The predictor class named in ``bundle.json`` (``"module:Class"``), loaded from the bundle folder."""
    meta = json.loads((bundle / "bundle.json").read_text())
    module, _, name = meta["predictor"].partition(":")
    return getattr(importlib.import_module(module), name).from_bundle(bundle)


def bundle_dir(model_dir: Path) -> Path:
    """The bundle folder inside a downloaded logged model (where the pyfunc keeps its ``bundle`` artifact)."""
    flavor = mlflow.models.Model.load(str(model_dir)).flavors.get("python_function", {})
    relative = (flavor.get("artifacts", {}).get("bundle") or {}).get("path", "artifacts/bundle")
    return model_dir / relative


def input_example(model_dir: Path, column: str) -> list[Any] | None:
    """The inputs of the example logged with the model (its ``column``), or None when it has none."""
    example = mlflow.models.Model.load(str(model_dir)).load_input_example(str(model_dir))
    if isinstance(example, pd.DataFrame) and column in example.columns:
        return example[column].tolist()
    return None


def signature(input_column: str, task: str = "text-classification") -> ModelSignature:
    """Variable-length input (a string column, or a list of ints for pixels); what the kind answers with.

    Classifiers declare label, label_name, score and probabilities. A token model takes ``text`` or
    pre-split ``tokens`` (either may be absent) and answers with nested entity lists, and a multi-task
    model with one column per head: their outputs are documented by their predictors, not declared here,
    rather than declared wrongly.
    """
    if task == "token-classification":
        return ModelSignature(inputs=Schema([ColSpec("string", "text", required=False),
                                             ColSpec(Array("string"), "tokens", required=False)]))
    column = ColSpec("string", input_column) if input_column == "text" else ColSpec(Array("long"), input_column)
    if task == "multi-task":
        return ModelSignature(inputs=Schema([column]))
    return ModelSignature(
        inputs=Schema([column]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("string", "label_name"), ColSpec("double", "score"),
                        ColSpec(Array("double"), "probabilities")]),
    )


def pip_requirements() -> list[str]:
    """Pinned to what is installed now: given explicitly, MLflow skips its slow inference (~3 s)."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for package in REQUIREMENTS:
        try:
            # a local build label (torch "2.13.0+cpu") names no release an index serves: pin the release
            pins.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return pins


def log_model(run_id: str, bundle_dir: Path, input_column: str, examples: list[Any], labels: list[str],
              task: str) -> str:
    """Log the bundle as a pyfunc under run ``run_id``; return the logged model's URI."""
    import models
    import tasks

    meta = json.loads((bundle_dir / "bundle.json").read_text())
    serving = bundle_dir / "serving.json"
    extra = json.loads(serving.read_text()).get("metadata", {}) if serving.exists() else {}
    code = [str(Path(models.__file__).parent), str(Path(tasks.__file__).parent)]
    with mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=NightshiftModel(),
            artifacts={"bundle": str(bundle_dir)},
            code_paths=code,
            signature=signature(input_column, task),
            input_example=pd.DataFrame({input_column: examples[:3]}),
            pip_requirements=pip_requirements(),
            metadata={"labels": labels, "task": task, "predictor": meta["predictor"], **extra},
        )
    return info.model_uri
