"""Born-again multi-task distillation for a sentence-classification task (BAM!, Clark et al. 2019).

A task with ``tasks.<t>.distill`` trains on soft targets: ``g * one_hot(gold) + (1 - g) * p_teacher(x)``,
where ``p_teacher`` are the class probabilities of a single-task model of the same task (its own
recipe, trained first by the train_model flow) on the task's train rows, and the gold share ``g`` grows
with training: linearly from ``1 - weight`` at the first step to 1 at the last (teacher annealing), or
stays at ``1 - weight``. The loss is the head's cross-entropy against those targets, so ``sum_t w_t * L_t``
is unchanged in form. The teacher reads the rows with its own tokenizer and model, so it may be any
text-classification model with the task's label map (scratch or pretrained, any vocabulary).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.core.batching import Loader
from tasks.core.fit import MODEL_FILE, resolve_device
from tasks.core.store import StageRef

Anneal = Literal["linear", "constant"]


def gold_share(progress: float, weight: float, anneal: Anneal) -> float:
    """The gold label's share of a target at ``progress`` (step / total steps) through training; the teacher
    has the rest. Written as the gold share so that weight 1 gives exactly ``progress``."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the teacher's weight must be in [0, 1], got {weight}")
    return 1.0 - weight + weight * min(max(progress, 0.0), 1.0) if anneal == "linear" else 1.0 - weight


def soft_targets(onehot: np.ndarray, teacher: np.ndarray, gold: float) -> np.ndarray:
    """Rows of ``gold * onehot + (1 - gold) * teacher`` (both (n, C), rows summing to 1): they sum to 1 too."""
    return gold * onehot + (1 - gold) * teacher


def teacher_probabilities(teacher: StageRef, train: StageRef, labels: list[str], device: str = "auto",
                          where: str = "distill") -> np.ndarray:
    """The teacher's class probabilities (n, C) on the task's encoded train rows (``train.parquet`` of ``train``),
    in the task's label order: the rows' text through the teacher's own tokenizer and model.

    ``teacher`` is a text-classification train stage (``model.pt``, ``tokenizer.json``, ``labels.json``).
    Its label map must be the task's: a ValueError naming ``where`` says which labels differ.
    """
    from tokenizers import Tokenizer

    from models.multitask import MultiTaskModel
    from tasks.text.encode import encode
    from tasks.text.loader import EncodedSplit, predict_proba

    teacher_labels = list(teacher.extra.get("labels") or [])
    if teacher_labels != list(labels):
        raise ValueError(f"{where}: the teacher's label map {teacher_labels} is not the task's {list(labels)} "
                         "(same labels in the same order: set data.labels alike in both recipes)")
    ckpt = torch.load(teacher.file(MODEL_FILE), map_location="cpu", weights_only=False)
    model = MultiTaskModel.from_checkpoint(ckpt).eval()
    if len(model.heads) != 1:
        raise ValueError(f"{where}: the teacher must be a single-task model, got heads {sorted(model.heads)}")
    head = next(iter(model.heads))
    texts = pq.read_table(train.file("train.parquet"), columns=["text"]).column("text").to_pylist()
    tokenizer = Tokenizer.from_file(str(teacher.file("tokenizer.json")))
    split = EncodedSplit.from_table(pa.table({"input_ids": encode(tokenizer, texts),
                                              "label_id": pa.array(np.zeros(len(texts), np.int64))}))
    dev = resolve_device(device)
    return predict_proba(model.to(dev), split, model.pad_id, dev, head)


def distilled(loader: Loader, gold: np.ndarray, teacher: np.ndarray, weight: float, anneal: Anneal, head: str) -> Loader:
    """``loader`` (a text loader, targets ``{head: labels}``) with soft targets by training progress.
    ``gold``: the rows' label indices (n,); ``teacher``: their teacher probabilities (n, C)."""
    if teacher.shape[0] != len(gold) or len(gold) != loader.size:
        raise ValueError(f"teacher probabilities for {teacher.shape[0]} rows, labels for {len(gold)}, loader of {loader.size}")
    onehot = np.eye(teacher.shape[1], dtype=np.float32)[gold]

    def progress_targets(index: np.ndarray, progress: float) -> dict[str, torch.Tensor]:
        return {head: torch.from_numpy(soft_targets(onehot[index], teacher[index], gold_share(progress, weight, anneal)))}

    return dataclasses.replace(loader, progress_targets=progress_targets)
