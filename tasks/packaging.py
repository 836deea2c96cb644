"""The served model: one MLflow pyfunc that bundles weights, tokenizer, label map, cleaning rules and config.

``mlflow.pyfunc.load_model("models:/NAME@champion").predict(pd.DataFrame({"text": [...]}))`` returns a
DataFrame with ``label`` (the predicted class), ``score`` (its probability) and ``probabilities``
(one per class, in the order of the model's ``labels`` metadata). The same cleaning the training data
went through is applied to the input first, so served and offline predictions agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import pyarrow as pa
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, Schema
from mlflow.types.schema import Array

BUNDLE_FILES = ("model.pt", "tokenizer.json", "labels.json", "bundle.json")


class TextClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around the trained TransformerClassifier and its tokenizer."""

    def load_context(self, context: Any) -> None:
        import torch
        from tokenizers import Tokenizer

        from models.transformer import TransformerClassifier
        from tasks.config import CleanConfig

        bundle = Path(context.artifacts["bundle"])
        ckpt = torch.load(bundle / "model.pt", map_location="cpu", weights_only=False)
        self.model = TransformerClassifier.from_checkpoint(ckpt).eval()
        self.tokenizer = Tokenizer.from_file(str(bundle / "tokenizer.json"))
        self.labels: list[str] = json.loads((bundle / "labels.json").read_text())
        meta = json.loads((bundle / "bundle.json").read_text())
        self.clean = CleanConfig(**meta["clean"])

    def predict_texts(self, texts: list[str]) -> tuple[list[str], np.ndarray]:
        """Predicted labels and class probabilities (n, C) for raw texts."""
        import torch

        from tasks.clean import clean_texts
        from tasks.train import EncodedSplit, predict_proba

        cleaned = clean_texts(pa.array([str(t) for t in texts], pa.string()), self.clean).to_pylist()
        ids = [e.ids for e in self.tokenizer.encode_batch([t or "" for t in cleaned])]
        split = EncodedSplit.from_table(pa.table({
            "input_ids": pa.array(ids, pa.list_(pa.int64())), "label_id": pa.array(np.zeros(len(ids), np.int64)),
        }))
        probs = predict_proba(self.model, split, self.model.pad_id, torch.device("cpu"))
        return [self.labels[i] for i in probs.argmax(1)], probs

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "text" not in model_input.columns:
                raise ValueError(f"input needs a 'text' column; got {list(model_input.columns)}")
            texts = model_input["text"].tolist()
        else:
            texts = list(model_input)
        if not texts:
            return pd.DataFrame({"label": [], "score": [], "probabilities": []})
        labels, probs = self.predict_texts(texts)
        return pd.DataFrame({"label": labels, "score": probs.max(1).astype(float),
                             "probabilities": [row.astype(float).tolist() for row in probs]})


def signature() -> ModelSignature:
    """Variable-length text in; label, score and per-class probabilities out."""
    return ModelSignature(
        inputs=Schema([ColSpec("string", "text")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score"),
                        ColSpec(Array("double"), "probabilities")]),
    )


def pip_requirements() -> list[str]:
    """Pinned to what is installed now: given explicitly, MLflow skips its slow inference (~3 s)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg)}" for pkg in
            ("mlflow", "torch", "tokenizers", "pyarrow", "pandas", "numpy", "scikit-learn", "pydantic", "tqdm")]


def log_text_classifier(run_id: str, bundle_dir: Path, example_texts: list[str], labels: list[str]) -> str:
    """Log the bundle as a pyfunc under run ``run_id``; return the logged model's URI."""
    import models
    import tasks

    code = [str(Path(models.__file__).parent), str(Path(tasks.__file__).parent)]
    with mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=TextClassifierModel(),
            artifacts={"bundle": str(bundle_dir)},
            code_paths=code,
            signature=signature(),
            input_example=pd.DataFrame({"text": example_texts[:3]}),
            pip_requirements=pip_requirements(),
            metadata={"labels": labels, "task": "text-classification"},
        )
    return info.model_uri


# ---------------------------------------------------------------- image classification

IMAGE_BUNDLE_FILES = ("model.pt", "normalization.json", "labels.json", "bundle.json")


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


class ImageClassifierModel(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper around a trained image classifier and the normalisation it was trained with."""

    def load_context(self, context: Any) -> None:
        import torch

        from models.mlp import ImageClassifier

        bundle = Path(context.artifacts["bundle"])
        ckpt = torch.load(bundle / "model.pt", map_location="cpu", weights_only=False)
        self.model = ImageClassifier.from_checkpoint(ckpt).eval()
        self.labels: list[str] = json.loads((bundle / "labels.json").read_text())
        self.normalization = json.loads((bundle / "normalization.json").read_text())

    def predict_pixels(self, pixels: np.ndarray) -> tuple[list[str], np.ndarray]:
        """Predicted labels and class probabilities (n, C) for flat uint8 images (n, H*W)."""
        from tasks.vision.train import predict_proba

        probs = predict_proba(self.model, pixels, self.normalization["mean"], self.normalization["std"])
        return [self.labels[i] for i in probs.argmax(1)], probs

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        if isinstance(model_input, pd.DataFrame):
            if "pixels" not in model_input.columns:
                raise ValueError(f"input needs a 'pixels' column; got {list(model_input.columns)}")
            cells = model_input["pixels"].tolist()
        else:
            cells = list(model_input)
        if not cells:
            return pd.DataFrame({"label": [], "score": [], "probabilities": []})
        pixels = pixel_rows(cells, self.model.in_features)
        labels, probs = self.predict_pixels(pixels)
        return pd.DataFrame({"label": labels, "score": probs.max(1).astype(float),
                             "probabilities": [row.astype(float).tolist() for row in probs]})


def image_signature() -> ModelSignature:
    """Pixels in (one list of ints 0-255 per image, row-major); label, score and per-class probabilities out."""
    return ModelSignature(
        inputs=Schema([ColSpec(Array("long"), "pixels")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "score"),
                        ColSpec(Array("double"), "probabilities")]),
    )


def log_image_classifier(run_id: str, bundle_dir: Path, example_pixels: list[list[int]], labels: list[str],
                         image_shape: list[int]) -> str:
    """Log the image bundle as a pyfunc under run ``run_id``; return the logged model's URI."""
    import models
    import tasks

    code = [str(Path(models.__file__).parent), str(Path(tasks.__file__).parent)]
    example = pd.DataFrame({"pixels": [[int(v) for v in row] for row in example_pixels[:3]]})
    with mlflow.start_run(run_id=run_id, nested=True):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=ImageClassifierModel(),
            artifacts={"bundle": str(bundle_dir)},
            code_paths=code,
            signature=image_signature(),
            input_example=example,
            pip_requirements=pip_requirements(),
            metadata={"labels": labels, "task": "image-classification", "image_shape": list(image_shape),
                      "input": "pixels: H*W integers 0-255, row-major"},
        )
    return info.model_uri
