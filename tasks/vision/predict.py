"""Inference-only predictor for image classification: what the served model runs.

A ``pixels`` column (one flat list of H*W integers 0-255 per image, row-major) is normalised as the
train split was and classified; the answer has ``label``, ``score`` and ``probabilities``.
Imports no Prefect, no MLflow and no pipeline settings.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from models.vision import ImageClassifier
from tasks.vision.loader import predict_proba


def pixel_rows(values: Any, n_pixels: int) -> np.ndarray:
    """The ``pixels`` cells of a DataFrame as a (n, n_pixels) uint8 array; ValueError naming a bad row.

    A cell is a flat list or numpy array of ``n_pixels`` integers 0-255, row-major.
    """
    rows = []
    for index, cell in enumerate(values):
        if cell is None:
            raise ValueError(f"pixels row {index}: missing")
        row = np.asarray(cell).reshape(-1)
        if row.size != n_pixels:
            raise ValueError(f"pixels row {index}: {row.size} values, expected {n_pixels}")
        if row.dtype.kind == "f" and not np.all(np.mod(row, 1) == 0):
            raise ValueError(f"pixels row {index}: expected integers 0-255, got fractions")
        if row.min() < 0 or row.max() > 255:
            raise ValueError(f"pixels row {index}: values outside 0-255 (min {row.min()}, max {row.max()})")
        rows.append(row.astype(np.uint8))
    return np.stack(rows) if rows else np.zeros((0, n_pixels), dtype=np.uint8)


class ImagePredictor:
    """A trained image classifier with the normalisation it was trained with and its label map."""

    input_column = "pixels"

    def __init__(self, model: ImageClassifier, labels: list[str], normalization: dict[str, Any]):
        self.model = model.eval()
        self.labels = labels
        self.normalization = normalization

    @classmethod
    def from_bundle(cls, bundle: Path) -> ImagePredictor:
        """Load from a bundle folder: ``model.pt``, ``labels.json``, ``normalization.json``."""
        ckpt = torch.load(bundle / "model.pt", map_location="cpu", weights_only=False)
        return cls(ImageClassifier.from_checkpoint(ckpt), json.loads((bundle / "labels.json").read_text()),
                   json.loads((bundle / "normalization.json").read_text()))

    def probabilities(self, pixels: np.ndarray) -> np.ndarray:
        """Class probabilities (n, C) for flat uint8 images (n, H*W)."""
        return predict_proba(self.model, pixels, self.normalization["mean"], self.normalization["std"])

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``label``, ``label_name`` (the digit again), ``score`` and ``probabilities`` for the ``pixels`` column."""
        if "pixels" not in frame.columns:
            raise ValueError(f"input needs a 'pixels' column; got {list(frame.columns)}")
        cells = frame["pixels"].tolist()
        if not cells:
            return pd.DataFrame({"label": [], "label_name": [], "score": [], "probabilities": []})
        probs = self.probabilities(pixel_rows(cells, self.model.in_features))
        labels = [self.labels[i] for i in probs.argmax(1)]
        return pd.DataFrame({"label": labels, "label_name": labels, "score": probs.max(1).astype(float),
                             "probabilities": [row.astype(float).tolist() for row in probs]})
