"""Inference-only predictor for multi-task models: texts in, every head's answer out.

The bundle holds one ``model.pt`` (the shared encoder and one head per task, named by the task), and per
task ``heads/<task>/`` (its kind's label map and tokenizer file) with ``serving.json`` ``"tasks"``
listing every task: its kind (``task``), its kind's predictor and that predictor's serving facts. Each
task is answered by its own kind's predictor reading its head of the one shared model (the weights are
loaded once).

``predict(frame)`` takes a ``text`` column and returns, per row:

- ``label``: a JSON object ``{"<task>": <that task's label>, ...}`` of every head's answer (a text task's
  class; a token task's ``label`` column as its kind defines it): the one value the deploy smoke test and
  the re-scoring of a multi-task champion compare;
- ``<task>.<column>`` for every column of every task's own predictor (``sst2.label``, ``sst2.score``,
  ``sst2.probabilities``, ``wnut17.entities`` ...).

Imports no Prefect, no MLflow and no pipeline settings; the kinds' predictors are imported by the
names the bundle records.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tokenizers import Tokenizer

from models.multitask import MultiTaskModel
from tasks.core.jsonable import plain

HEADS_DIR = "heads"


def task_predictor(predictor: str, model: MultiTaskModel, folder: Path, serving: dict[str, Any]) -> Any:
    """The kind's predictor (``"module:Class"``) on one head of the shared ``model``.

    A predictor class may offer ``from_model(model, folder, serving)``; otherwise it is built as
    ``Class(model, tokenizer, labels, serving)`` from ``folder``'s ``tokenizer.json`` and ``labels.json``
    (the text predictor's constructor), ``serving["head"]`` naming the head to read.
    """
    module, _, name = predictor.partition(":")
    cls = getattr(importlib.import_module(module), name)
    if hasattr(cls, "from_model"):
        return cls.from_model(model, folder, serving)
    return cls(model, Tokenizer.from_file(str(folder / "tokenizer.json")),
               json.loads((folder / "labels.json").read_text()), serving)


class MultiPredictor:
    """One shared model, one predictor per task."""

    input_column = "text"

    def __init__(self, predictors: dict[str, Any]):
        self.predictors = predictors

    @property
    def tasks(self) -> list[str]:
        return list(self.predictors)

    @classmethod
    def from_parts(cls, model: MultiTaskModel, heads: Path, serving: dict[str, Any]) -> MultiPredictor:
        """From a loaded shared model, the ``heads/`` folder and the serving facts (``serving["tasks"]``)."""
        model = model.eval()
        return cls({name: task_predictor(entry["predictor"], model, heads / name, entry["serving"])
                    for name, entry in serving["tasks"].items()})

    @classmethod
    def from_bundle(cls, bundle: Path) -> MultiPredictor:
        """Load from a bundle folder: ``model.pt``, ``heads/<task>/``, ``serving.json``."""
        bundle = Path(bundle)
        ckpt = torch.load(bundle / "model.pt", map_location="cpu", weights_only=False)
        return cls.from_parts(MultiTaskModel.from_checkpoint(ckpt), bundle / HEADS_DIR,
                              json.loads((bundle / "serving.json").read_text()))

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``label`` (every head's answer as one JSON object) and ``<task>.<column>`` for every task's own columns."""
        if "text" not in frame.columns:
            raise ValueError(f"input needs a 'text' column; got {list(frame.columns)}")
        texts = pd.DataFrame({"text": [str(t) for t in frame["text"].tolist()]})
        outputs = {name: predictor.predict(texts).reset_index(drop=True) for name, predictor in self.predictors.items()}
        combined = [json.dumps({name: plain(out["label"].iloc[i] if "label" in out.columns else out.iloc[i, 0])
                                for name, out in outputs.items()}, sort_keys=True, ensure_ascii=False)
                    for i in range(len(texts))]
        columns: dict[str, Any] = {"label": combined}
        for name, out in outputs.items():
            for column in out.columns:
                columns[f"{name}.{column}"] = out[column].tolist()
        return pd.DataFrame(columns)


def task_labels(combined: list[str], task: str) -> list[Any]:
    """One task's answers out of the combined ``label`` column (None where the model has no such task)."""
    return [json.loads(value).get(task) for value in combined]
