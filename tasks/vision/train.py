"""Stage: train, for image recipes. Fits the recipe's image model (:mod:`models.mlp`) on the train split.

The mechanics are the text stage's (:mod:`tasks.train`, whose helpers this reuses): the optimizer of
``train.optimizer`` (``adam`` for the founding document's run), the ``train.schedule`` learning
rate, optional gradient clipping (``train.grad_clip: null`` for none), seeded initialisation,
dropout and per-epoch shuffling (a CPU rerun is identical), early stopping on the validation metric
with the best epoch's weights kept, CUDA with bf16 autocast when present, and a checkpoint after every
epoch under ``$NIGHTSHIFT_HOME/checkpoints/train/<fingerprint>/`` so an interrupted run resumes.

Pixels stay uint8 until a batch is drawn, then go through :func:`tasks.vision.normalize.normalize`
with the mean/std the normalize stage measured on the train split; those travel in the model file
and in ``normalization.json`` next to it, so evaluation and serving normalise identically.

Run alone: ``python -m flows.train_model --config configs/mnist.yaml`` (after prepare_data).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

import models.mlp
from models.mlp import ImageClassifier, MLPConfig
from tasks import train as text_train
from tasks.artifacts import ArtifactStore, StageRef, fingerprint, source_hash
from tasks.config import Recipe, TrainConfig
from tasks.train import FitResult, Loader, fit_loader, predict_loader, store_trained
from tasks.vision import images
from tasks.vision.normalize import LABELS_FILE, NORMALIZATION_FILE, normalize

STAGE = "train"
MODEL_FILE = "model.pt"
PREDICT_BATCH = 1024


@dataclass(frozen=True)
class ImageSplit:
    """One split as arrays: flat uint8 pixels (n, H*W) and label ids (n,)."""

    pixels: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_table(cls, table: pa.Table) -> ImageSplit:
        return cls(images.to_numpy(table.column("pixels")), table.column("label_id").to_numpy().astype(np.int64))

    @classmethod
    def read(cls, path: Path) -> ImageSplit:
        return cls.from_table(pq.read_table(path, columns=["pixels", "label_id"]))


def shuffled_batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """``range(n)`` cut into batches, in a random permutation when ``rng`` is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def batch_tensor(pixels: np.ndarray, index: np.ndarray | slice, mean: float, std: float) -> torch.Tensor:
    """Normalised float32 pixels (B, H*W) of the rows ``index``."""
    return torch.from_numpy(normalize(pixels[index], mean, std))


def image_loader(pixels: np.ndarray, labels: np.ndarray, batch_size: int, mean: float, std: float) -> Loader:
    """Shuffled batches of normalised pixels for :func:`tasks.train.fit_loader`."""
    return Loader(
        labels=labels,
        batches=lambda rng: shuffled_batches(len(labels), batch_size, rng),
        inputs=lambda index: (batch_tensor(pixels, index, mean, std),),
    )


def predict_proba(
    model: ImageClassifier, pixels: np.ndarray, mean: float, std: float, device: torch.device | None = None,
    batch_size: int = PREDICT_BATCH,
) -> np.ndarray:
    """Class probabilities (n, C) of flat uint8 images (n, H*W), in row order."""
    loader = image_loader(pixels, np.zeros(len(pixels), dtype=np.int64), batch_size, mean, std)
    return predict_loader(model, loader, device or torch.device("cpu"))


def fit(
    model: ImageClassifier,
    train: ImageSplit,
    validation: ImageSplit,
    cfg: TrainConfig,
    primary_metric: str,
    mean: float,
    std: float,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """:func:`tasks.train.fit_loader` on image splits: the text stage's loop, checkpoints and early stopping."""
    return fit_loader(
        model, image_loader(train.pixels, train.labels, cfg.batch_size, mean, std),
        image_loader(validation.pixels, validation.labels, PREDICT_BATCH, mean, std),
        cfg, primary_metric, checkpoint_dir, on_step, on_epoch,
    )


def config_for_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What decides the trained weights besides the data: model and training settings."""
    train = recipe.train.model_dump(mode="json")
    train.pop("num_threads")  # speed only, not the result
    return {"model": recipe.model.model_dump(mode="json"), "train": train,
            "primary_metric": recipe.evaluate.primary_metric}


def build_model(cfg: MLPConfig, image_shape: list[int] | tuple[int, int], num_classes: int, seed: int) -> ImageClassifier:
    """The recipe's network, initialised from ``seed``."""
    torch.manual_seed(seed)
    return ImageClassifier(cfg, (int(image_shape[0]), int(image_shape[1])), num_classes)


def load_model(ref: StageRef) -> tuple[ImageClassifier, dict[str, Any]]:
    """The trained model of a train stage directory and its checkpoint's metadata (labels, normalization)."""
    ckpt = torch.load(ref.file(MODEL_FILE), map_location="cpu", weights_only=False)
    return ImageClassifier.from_checkpoint(ckpt), {k: ckpt[k] for k in ("labels", "normalization") if k in ckpt}


def run(
    recipe: Recipe,
    augmented: StageRef,
    normalized: StageRef,
    store: ArtifactStore,
    checkpoints_root: Path,
    force: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> StageRef:
    """Train on ``augmented/train.parquet``, early-stop on ``normalized/validation.parquet``; store the model."""
    if not isinstance(recipe.model, MLPConfig):  # pragma: no cover - the recipe validator guarantees it
        raise TypeError(f"{STAGE}: image recipes need an image model, got {type(recipe.model).__name__}")
    config = config_for_fingerprint(recipe)
    code = source_hash(sys.modules[__name__], models.mlp, text_train)
    fp = fingerprint(STAGE, config, [augmented.fingerprint, normalized.fingerprint], code)
    if not force and (hit := store.lookup(STAGE, fp)) is not None:
        return hit
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    train = ImageSplit.read(augmented.file("train.parquet"))
    validation = ImageSplit.read(normalized.file("validation.parquet"))
    labels = json.loads(normalized.file(LABELS_FILE).read_text())
    normalization = json.loads(normalized.file(NORMALIZATION_FILE).read_text())
    mean, std = normalization["mean"], normalization["std"]
    model = build_model(recipe.model, normalization["image_shape"], len(labels), recipe.train.seed)
    checkpoint_dir = checkpoints_root / STAGE / fp
    started = time.perf_counter()
    result = fit(model, train, validation, recipe.train, recipe.evaluate.primary_metric, mean, std,
                 checkpoint_dir, on_step, on_epoch)
    seconds = time.perf_counter() - started
    return store_trained(
        recipe, store, fp=fp, config=config, code=code, inputs=[augmented.fingerprint, normalized.fingerprint],
        model=model, result=result, seconds=seconds, labels=labels, rows={"train": len(train), "validation": len(validation)},
        checkpoint_dir=checkpoint_dir, json_files={NORMALIZATION_FILE: normalization},
        checkpoint_meta={"normalization": normalization},
        extra={"task": recipe.task, "model_kind": recipe.model.kind, "normalization": normalization},
    )
