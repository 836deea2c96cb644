"""Inference-only predictor for text classification: what the served model runs.

Raw texts go through the cleaning the training data went through, the bundled tokenizer and the
trained encoder + head; the answer is a DataFrame with ``label`` (the class as the data spells it: what
evaluation, the gate and the smoke test compare), ``label_name`` (its name from ``data.label_names``, else
the label itself), ``score`` (its probability) and ``probabilities`` (one per class, in label-map order).
Imports no Prefect, no MLflow and no pipeline settings.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import torch
from tokenizers import Tokenizer

from models.multitask import MultiTaskModel
from tasks.text.clean import clean_texts
from tasks.text.config import CleanConfig
from tasks.text.loader import EncodedSplit, predict_proba


class TextPredictor:
    """A trained text classifier with its tokenizer, label map and cleaning rules."""

    input_column = "text"

    def __init__(self, model: MultiTaskModel, tokenizer: Tokenizer, labels: list[str], serving: dict):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = labels
        self.clean = CleanConfig(**serving["clean"])
        self.head: str = serving["head"]
        names = serving.get("label_names") or {}
        self.names = [names.get(label, label) for label in labels]

    @classmethod
    def from_bundle(cls, bundle: Path) -> TextPredictor:
        """Load from a bundle folder: ``model.pt``, ``tokenizer.json``, ``labels.json``, ``serving.json``."""
        ckpt = torch.load(bundle / "model.pt", map_location="cpu", weights_only=False)
        return cls(MultiTaskModel.from_checkpoint(ckpt), Tokenizer.from_file(str(bundle / "tokenizer.json")),
                   json.loads((bundle / "labels.json").read_text()), json.loads((bundle / "serving.json").read_text()))

    def probabilities(self, texts: list[str]) -> np.ndarray:
        """Class probabilities (n, C) for raw texts, in label-map order."""
        cleaned = clean_texts(pa.array([str(t) for t in texts], pa.string()), self.clean).to_pylist()
        ids = [e.ids for e in self.tokenizer.encode_batch([t or "" for t in cleaned])]
        split = EncodedSplit.from_table(pa.table({
            "input_ids": pa.array(ids, pa.list_(pa.int64())), "label_id": pa.array(np.zeros(len(ids), np.int64)),
        }))
        return predict_proba(self.model, split, self.model.pad_id, torch.device("cpu"), self.head)

    def records(self, texts: list[str]) -> list[dict]:
        """The rows of :meth:`predict` as plain dicts, without pandas: the model server's path, where
        building a one-row DataFrame costs about as much as the forward pass."""
        if not texts:
            return []
        probs = self.probabilities(texts)
        return [{"label": self.labels[best], "label_name": self.names[best], "score": float(row[best]),
                 "probabilities": row.astype(float).tolist()} for best, row in zip(probs.argmax(1).tolist(), probs)]

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``label``, ``label_name``, ``score`` and ``probabilities`` for the ``text`` column of ``frame``."""
        if "text" not in frame.columns:
            raise ValueError(f"input needs a 'text' column; got {list(frame.columns)}")
        return pd.DataFrame(self.records(frame["text"].tolist()), columns=["label", "label_name", "score", "probabilities"])
