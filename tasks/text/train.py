"""Stage: train (text). Fits the encoder (scratch Transformer or a pretrained checkpoint) and its
sequence head on the (augmented) train split, early-stopping on the validation split.

A pretrained encoder is fine-tuned with its own learning rate (``train.lr``), a separate one for
the fresh head (``train.head_lr``) and optional layer-wise decay (``train.layer_lr_decay``).

Run alone: ``python -m flows.train_model --config configs/sst2.yaml`` (after prepare_data).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch

from models.encoders import checkpoint_digest, resolve_pretrained
from models.multitask import MultiTaskModel, build_text_model, param_groups
from tasks.core.batching import predict_loader
from tasks.core.fit import (
    MODEL_FILE,
    STAGE,
    FitResult,
    StepCallback,
    fit_loader,
    score,
    store_trained,
)
from tasks.core.store import ArtifactStore, StageRef, stage_key
from tasks.text.config import TextRecipe
from tasks.text.loader import EncodedSplit, text_loader

HEAD = "label"  # the single head of a text classifier
VALIDATION_BATCH = 256


def train_config(recipe: TextRecipe) -> dict[str, Any]:
    """What decides the trained weights besides the data: the encoder (with the checkpoint's content
    hash when pretrained), training settings and the primary metric."""
    train = recipe.train.model_dump(mode="json", exclude={"threads", "scratch", "pretrained"})  # speed / applied
    model = recipe.model.model_dump(mode="json")
    if recipe.model.arch == "pretrained":
        model["checkpoint_sha256"] = checkpoint_digest(resolve_pretrained(recipe.model.pretrained))
    return {"model": model, "train": train, "max_length": recipe.tokenizer.max_length,
            "primary_metric": recipe.evaluate.primary_metric}


def serving_facts(recipe: TextRecipe, trained: StageRef) -> dict[str, Any]:
    """What the served predictor needs besides weights, tokenizer and labels: the cleaning rules the
    training data went through, the label names and the head to read; and, for the record, the
    encoder it was fine-tuned from (the HF config itself travels inside ``model.pt``)."""
    return {"clean": recipe.clean.model_dump(mode="json"), "label_names": recipe.data.label_names or {},
            "head": HEAD, "max_length": recipe.tokenizer.max_length, "encoder": trained.extra["encoder"]}


def build_model(recipe: TextRecipe, encoded: StageRef, num_classes: int) -> MultiTaskModel:
    """The encoder of ``model.arch`` with one sequence head, seeded by ``train.seed``."""
    torch.manual_seed(recipe.train.seed)
    return build_text_model(recipe.model, {HEAD: ("sequence", num_classes)},
                            vocab_size=int(encoded.extra["vocab_size"]), max_length=recipe.tokenizer.max_length,
                            pad_id=int(encoded.extra["pad_id"]), label_smoothing=recipe.train.label_smoothing)


def fit(model: MultiTaskModel, train: EncodedSplit, validation: EncodedSplit, recipe: TextRecipe,
        checkpoint_dir: Path | None = None, on_step: StepCallback | None = None,
        on_epoch: StepCallback | None = None) -> FitResult:
    """:func:`tasks.core.fit.fit_loader` on token-id splits (length-bucketed, dynamically padded batches)."""
    cfg = recipe.train
    val_loader = text_loader(validation, VALIDATION_BATCH, model.pad_id, HEAD)

    def validate(m: torch.nn.Module, device: torch.device) -> dict[str, float]:
        return score(validation.labels, predict_loader(m, val_loader, device, HEAD).argmax(1))

    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.head_lr, cfg.layer_lr_decay)
    return fit_loader(model, text_loader(train, cfg.batch_size, model.pad_id, HEAD), validate, cfg,
                      recipe.evaluate.primary_metric, checkpoint_dir, on_step, on_epoch, groups)


def run(
    recipe: TextRecipe, augmented: StageRef, encoded: StageRef, store: ArtifactStore, checkpoints_root: Path,
    force: bool = False, on_step: StepCallback | None = None, on_epoch: StepCallback | None = None,
) -> StageRef:
    """Train on ``augmented/train.parquet``, early-stop on ``encoded/validation.parquet``; store the model."""
    key = stage_key(STAGE, train_config(recipe), [augmented.fingerprint, encoded.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    train = EncodedSplit.read(augmented.file("train.parquet"))
    validation = EncodedSplit.read(encoded.file("validation.parquet"))
    labels = json.loads(encoded.file("labels.json").read_text())
    model = build_model(recipe, encoded, len(labels))
    checkpoint_dir = checkpoints_root / STAGE / key.fingerprint
    started = time.perf_counter()
    result = fit(model, train, validation, recipe, checkpoint_dir, on_step, on_epoch)
    return store_trained(
        key, store, primary_metric=recipe.evaluate.primary_metric, model=model, result=result,
        seconds=time.perf_counter() - started, labels=labels,
        rows={"train": len(train), "validation": len(validation)}, checkpoint_dir=checkpoint_dir,
        copies=[encoded.file("tokenizer.json")],
        extra={"encoder": {k: v for k, v in key.config["model"].items()
                           if k in ("arch", "pretrained", "checkpoint_sha256")}},
    )


def load_model(trained: StageRef) -> MultiTaskModel:
    """The trained model of a train stage directory, on the CPU, in eval mode."""
    ckpt = torch.load(trained.file(MODEL_FILE), map_location="cpu", weights_only=False)
    return MultiTaskModel.from_checkpoint(ckpt).eval()
