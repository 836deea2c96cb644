"""Stage: train (tokens). Fits the encoder (pretrained MiniLM by default, or the scratch Transformer)
and a per-token tag head on the (augmented) train windows, early-stopping on validation entity F1.

Labels sit on each word's first sub-token (``tokenizer.label_all_tokens``: on every piece, B- -> I-
after the first); long sentences train as several windows. Validation decodes per word (windows
merged, IOB2-constrained when ``head.constrained_decoding``) and scores with seqeval, strict IOB2.

Run alone: ``python -m flows.train_model --config configs/wnut17.yaml`` (after prepare_data).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from models.encoders import checkpoint_digest, resolve_pretrained
from models.multitask import MultiTaskModel, build_text_model, param_groups
from tasks.core.fit import (
    MODEL_FILE,
    STAGE,
    FitResult,
    StepCallback,
    fit_loader,
    store_trained,
)
from tasks.core.store import ArtifactStore, StageRef, stage_key
from tasks.tokens.config import TokenRecipe
from tasks.tokens.loader import (
    Windows,
    align_labels,
    build_windows,
    continuation_map,
    window_loader,
    word_log_probs,
)
from tasks.tokens.tags import constrained_decode

HEAD = "tags"  # the single head of a tagger
VALIDATION_BATCH = 64


def entity_scores(y_true: list[list[str]], y_pred: list[list[str]]) -> dict[str, float]:
    """seqeval strict IOB2 entity-level ``f1``, ``precision``, ``recall``."""
    from seqeval.metrics import f1_score, precision_score, recall_score
    from seqeval.scheme import IOB2

    kwargs = {"mode": "strict", "scheme": IOB2, "zero_division": 0}
    return {"f1": float(f1_score(y_true, y_pred, **kwargs)), "precision": float(precision_score(y_true, y_pred, **kwargs)),
            "recall": float(recall_score(y_true, y_pred, **kwargs))}


def decode(log_probs: list[np.ndarray], labels: list[str], constrained: bool) -> list[list[str]]:
    """Tags per word from per-word log-probabilities: IOB2-constrained Viterbi, or argmax."""
    if constrained:
        return [[labels[i] for i in constrained_decode(lp, labels)] for lp in log_probs]
    return [[labels[i] for i in lp.argmax(1)] if len(lp) else [] for lp in log_probs]


def windows_of(table, max_length: int, stride: int, cls_id: int, sep_id: int, labels: list[str] | None = None,
               label_all_tokens: bool = False) -> Windows:
    """The windows of encoded rows (``piece_ids``, ``piece_words``, and ``tag_ids`` when ``labels`` is given)."""
    piece_ids, piece_words = table.column("piece_ids").to_pylist(), table.column("piece_words").to_pylist()
    n_words = [len(t) for t in table.column("tokens").to_pylist()]
    piece_labels = None
    if labels is not None:
        cont = continuation_map(labels)
        piece_labels = [align_labels(w, t, label_all_tokens, cont)
                        for w, t in zip(piece_words, table.column("tag_ids").to_pylist())]
    return build_windows(list(zip(piece_ids, piece_words)), piece_labels, n_words, max_length, stride, cls_id, sep_id)


def train_config(recipe: TokenRecipe) -> dict[str, Any]:
    """What decides the trained weights besides the data."""
    train = recipe.train.model_dump(mode="json", exclude={"threads", "scratch", "pretrained"})
    model = recipe.model.model_dump(mode="json")
    if recipe.model.arch == "pretrained":
        model["checkpoint_sha256"] = checkpoint_digest(resolve_pretrained(recipe.model.pretrained))
    return {"model": model, "train": train, "head": recipe.head.model_dump(mode="json"),
            "alignment": recipe.tokenizer.model_dump(mode="json", include={"max_length", "stride", "label_all_tokens"}),
            "primary_metric": recipe.evaluate.primary_metric}


def serving_facts(recipe: TokenRecipe, trained: StageRef) -> dict[str, Any]:
    """What the served predictor needs besides weights, tokenizer and tags."""
    extra = trained.extra
    return {"clean": recipe.clean.model_dump(mode="json"), "head": HEAD, "max_length": recipe.tokenizer.max_length,
            "stride": recipe.tokenizer.stride, "word_split": recipe.tokenizer.word_split,
            "constrained_decoding": recipe.head.constrained_decoding,
            "special_ids": extra["special_ids"], "encoder": extra["encoder"]}


def build_model(recipe: TokenRecipe, encoded: StageRef, num_tags: int) -> MultiTaskModel:
    """The encoder of ``model.arch`` with one token head, seeded by ``train.seed``."""
    torch.manual_seed(recipe.train.seed)
    return build_text_model(recipe.model, {HEAD: ("token", num_tags)}, vocab_size=int(encoded.extra["vocab_size"]),
                            max_length=recipe.tokenizer.max_length, pad_id=int(encoded.extra["pad_id"]),
                            label_smoothing=recipe.train.label_smoothing, head_dropout=recipe.head.dropout)


def validator(windows: Windows, gold: list[list[str]], labels: list[str], pad_id: int, constrained: bool, head: str = HEAD):
    """A fit-loop validator: seqeval scores of the merged, decoded validation windows."""
    def validate(model: torch.nn.Module, device: torch.device) -> dict[str, float]:
        pred = decode(word_log_probs(model, windows, pad_id, head, device, VALIDATION_BATCH), labels, constrained)
        return entity_scores(gold, pred)
    return validate


def fit(model: MultiTaskModel, train: Windows, validation: Windows, gold: list[list[str]], labels: list[str],
        recipe: TokenRecipe, checkpoint_dir: Path | None = None, on_step: StepCallback | None = None,
        on_epoch: StepCallback | None = None) -> FitResult:
    """:func:`tasks.core.fit.fit_loader` on train windows; validation entity F1 picks the best epoch."""
    cfg = recipe.train
    groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.head_lr, cfg.layer_lr_decay)
    return fit_loader(model, window_loader(train, cfg.batch_size, model.pad_id, HEAD),
                      validator(validation, gold, labels, model.pad_id, recipe.head.constrained_decoding),
                      cfg, recipe.evaluate.primary_metric, checkpoint_dir, on_step, on_epoch, groups)


def run(recipe: TokenRecipe, augmented: StageRef, encoded: StageRef, store: ArtifactStore, checkpoints_root: Path,
        force: bool = False, on_step: StepCallback | None = None, on_epoch: StepCallback | None = None) -> StageRef:
    """Train on ``augmented/train.parquet``, early-stop on ``encoded/validation.parquet``; store the model."""
    key = stage_key(STAGE, train_config(recipe), [augmented.fingerprint, encoded.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    labels = json.loads(encoded.file("labels.json").read_text())
    special = {k: int(encoded.extra[k]) for k in ("pad_id", "unk_id", "cls_id", "sep_id")}
    tok = recipe.tokenizer
    train_table = pq.read_table(augmented.file("train.parquet"))
    val_table = pq.read_table(encoded.file("validation.parquet"))
    train = windows_of(train_table, tok.max_length, tok.stride, special["cls_id"], special["sep_id"], labels,
                       tok.label_all_tokens)
    validation = windows_of(val_table, tok.max_length, tok.stride, special["cls_id"], special["sep_id"])
    model = build_model(recipe, encoded, len(labels))
    checkpoint_dir = checkpoints_root / STAGE / key.fingerprint
    started = time.perf_counter()
    result = fit(model, train, validation, val_table.column("tags").to_pylist(), labels, recipe, checkpoint_dir,
                 on_step, on_epoch)
    return store_trained(
        key, store, primary_metric=recipe.evaluate.primary_metric, model=model, result=result,
        seconds=time.perf_counter() - started, labels=labels,
        rows={"train": train_table.num_rows, "validation": val_table.num_rows, "train_windows": len(train)},
        checkpoint_dir=checkpoint_dir, copies=[encoded.file("tokenizer.json")],
        extra={"special_ids": special,
               "encoder": {k: v for k, v in key.config["model"].items() if k in ("arch", "pretrained", "checkpoint_sha256")}},
    )


def load_model(trained: StageRef) -> MultiTaskModel:
    """The trained model of a train stage directory, on the CPU, in eval mode."""
    ckpt = torch.load(trained.file(MODEL_FILE), map_location="cpu", weights_only=False)
    return MultiTaskModel.from_checkpoint(ckpt).eval()
