"""Stage: train, for image recipes. Fits the recipe's image model (:mod:`models.vision`) on the train split.

The mechanics are the text stage's (:mod:`tasks.core.fit`, every kind's loop): the optimizer of
``train.optimizer`` (``adam`` for the founding document's run), the ``train.schedule`` learning
rate, optional gradient clipping (``train.grad_clip: null`` for none), seeded initialisation,
dropout and per-epoch shuffling (a CPU rerun is identical), early stopping on the validation metric
with the best epoch's weights kept, CUDA with bf16 autocast when present, and a checkpoint after every
epoch under ``$NIGHTSHIFT_HOME/checkpoints/train/<fingerprint>/`` so an interrupted run resumes.

Pixels stay uint8 until a batch is drawn, then go through :func:`tasks.vision.encode.normalize`
with the mean/std the normalize stage measured on the train split; those travel in the model file
and in ``normalization.json`` next to it, so evaluation and serving normalise identically.

Run alone: ``python -m flows.train_model --config configs/mnist.yaml`` (after prepare_data).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from models.vision import ImageClassifier, ImageModelConfig
from tasks.core.fit import FitResult, StepCallback, fit_loader, score, store_trained
from tasks.core.store import ArtifactStore, StageRef, stage_key
from tasks.vision.config import ImageRecipe
from tasks.vision.encode import LABELS_FILE, NORMALIZATION_FILE
from tasks.vision.loader import ImageSplit, image_loader, predict_proba

STAGE = "train"
MODEL_FILE = "model.pt"


def fit(
    model: ImageClassifier,
    train: ImageSplit,
    validation: ImageSplit,
    cfg: Any,
    primary_metric: str,
    mean: float,
    std: float,
    checkpoint_dir: Path | None = None,
    on_step: StepCallback | None = None,
    on_epoch: StepCallback | None = None,
) -> FitResult:
    """:func:`tasks.core.fit.fit_loader` on image splits: every kind's loop, checkpoints and early stopping."""

    def validate(m: torch.nn.Module, device: torch.device) -> dict[str, float]:
        return score(validation.labels, predict_proba(m, validation.pixels, mean, std, device).argmax(1))

    return fit_loader(model, image_loader(train.pixels, train.labels, cfg.batch_size, mean, std), validate,
                      cfg, primary_metric, checkpoint_dir, on_step, on_epoch)


def config_for_fingerprint(recipe: ImageRecipe) -> dict[str, Any]:
    """What decides the trained weights besides the data: model and training settings."""
    train = recipe.train.model_dump(mode="json", exclude={"threads", "scratch", "pretrained"})  # speed / applied
    return {"model": recipe.model.model_dump(mode="json"), "train": train,
            "primary_metric": recipe.evaluate.primary_metric}


def build_model(cfg: ImageModelConfig, image_shape: list[int] | tuple[int, int], num_classes: int, seed: int,
                label_smoothing: float = 0.0) -> ImageClassifier:
    """The recipe's network, initialised from ``seed``."""
    torch.manual_seed(seed)
    return ImageClassifier(cfg, (int(image_shape[0]), int(image_shape[1])), num_classes, label_smoothing)


def load_model(ref: StageRef) -> tuple[ImageClassifier, dict[str, Any]]:
    """The trained model of a train stage directory and its checkpoint's metadata (labels, normalization)."""
    ckpt = torch.load(ref.file(MODEL_FILE), map_location="cpu", weights_only=False)
    return ImageClassifier.from_checkpoint(ckpt), {k: ckpt[k] for k in ("labels", "normalization") if k in ckpt}


def run(
    recipe: ImageRecipe,
    augmented: StageRef,
    normalized: StageRef,
    store: ArtifactStore,
    checkpoints_root: Path,
    force: bool = False,
    on_step: StepCallback | None = None,
    on_epoch: StepCallback | None = None,
) -> StageRef:
    """Train on ``augmented/train.parquet``, early-stop on ``normalized/validation.parquet``; store the model."""
    config = config_for_fingerprint(recipe)
    key = stage_key(STAGE, config, [augmented.fingerprint, normalized.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    train = ImageSplit.read(augmented.file("train.parquet"))
    validation = ImageSplit.read(normalized.file("validation.parquet"))
    labels = json.loads(normalized.file(LABELS_FILE).read_text())
    normalization = json.loads(normalized.file(NORMALIZATION_FILE).read_text())
    mean, std = normalization["mean"], normalization["std"]
    model = build_model(recipe.model, normalization["image_shape"], len(labels), recipe.train.seed,
                        recipe.train.label_smoothing)
    checkpoint_dir = checkpoints_root / STAGE / key.fingerprint
    started = time.perf_counter()
    result = fit(model, train, validation, recipe.train, recipe.evaluate.primary_metric, mean, std,
                 checkpoint_dir, on_step, on_epoch)
    seconds = time.perf_counter() - started
    return store_trained(
        key, store, primary_metric=recipe.evaluate.primary_metric, model=model, result=result, seconds=seconds,
        labels=labels, rows={"train": len(train), "validation": len(validation)}, checkpoint_dir=checkpoint_dir,
        json_files={NORMALIZATION_FILE: normalization},
        checkpoint_meta={"normalization": normalization},
        extra={"model_kind": recipe.model.kind, "normalization": normalization},
    )
