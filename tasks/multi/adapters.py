"""What multi-task training needs from each kind it combines, beyond the kind's slots: the head it puts
on the shared encoder, how its encoded splits are batched, and how its validation split is scored.

One :class:`TaskAdapter` per kind name (``Kind.name``): ``text`` and ``tokens``; the kinds' own modules
are imported inside the functions, when a recipe uses the kind. The head on the shared model is named
by the task (``sst2``); the kind's own single-task model names it ``single_head`` (``label``, ``tags``):
the name the per-task model handed to the kind's evaluate stage uses.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models.heads import SequenceHead, TokenHead
from tasks.core.batching import Loader, predict_loader
from tasks.core.fit import score
from tasks.core.store import StageRef

Validator = Callable[[nn.Module, torch.device], dict[str, float]]


@dataclass(frozen=True)
class TaskAdapter:
    """The per-kind pieces of multi-task training."""

    single_head: str  # the head's name in the kind's own single-task model
    labels: Callable[[StageRef], list[str]]  # the label (or tag) list of the task's encode output
    head: Callable[[Any, int, int], nn.Module]  # (task recipe, hidden size, number of labels) -> head
    # (task recipe, augment ref, encode ref, batch size, pad id, head name) -> train loader
    train_loader: Callable[[Any, StageRef, StageRef, int, int, str], Loader]
    # (task recipe, encode ref, pad id, head name) -> scorer of the validation split: metric name -> value
    validator: Callable[[Any, StageRef, int, str], Validator]


def _labels_json(encoded: StageRef) -> list[str]:
    return json.loads(encoded.file("labels.json").read_text())


def _text_head(sub: Any, hidden: int, n: int) -> nn.Module:
    return SequenceHead(hidden, n, sub.model.pooling, 0.0, sub.train.label_smoothing)


def _text_train_loader(sub: Any, augmented: StageRef, encoded: StageRef, batch_size: int, pad_id: int, head: str) -> Loader:
    from tasks.text.loader import EncodedSplit, text_loader

    return text_loader(EncodedSplit.read(augmented.file("train.parquet")), batch_size, pad_id, head)


def _text_validator(sub: Any, encoded: StageRef, pad_id: int, head: str) -> Validator:
    from tasks.text.loader import EncodedSplit, text_loader

    validation = EncodedSplit.read(encoded.file("validation.parquet"))
    loader = text_loader(validation, 256, pad_id, head)

    def validate(model: nn.Module, device: torch.device) -> dict[str, float]:
        return score(validation.labels, predict_loader(model, loader, device, head).argmax(1))

    return validate


TEXT = TaskAdapter(single_head="label", labels=_labels_json, head=_text_head, train_loader=_text_train_loader,
                   validator=_text_validator)



def _token_head(sub: Any, hidden: int, n: int) -> nn.Module:
    return TokenHead(hidden, n, sub.head.dropout, sub.train.label_smoothing)


def _windows(sub: Any, ref: StageRef, encoded: StageRef, split: str, labels: list[str] | None) -> Any:
    import pyarrow.parquet as pq

    from tasks.tokens.train import windows_of

    tok = sub.tokenizer
    table = pq.read_table(ref.file(f"{split}.parquet"))
    return table, windows_of(table, tok.max_length, tok.stride, int(encoded.extra["cls_id"]), int(encoded.extra["sep_id"]),
                             labels, tok.label_all_tokens)


def _token_train_loader(sub: Any, augmented: StageRef, encoded: StageRef, batch_size: int, pad_id: int, head: str) -> Loader:
    from tasks.tokens.loader import window_loader

    _, windows = _windows(sub, augmented, encoded, "train", _labels_json(encoded))
    return window_loader(windows, batch_size, pad_id, head)


def _token_validator(sub: Any, encoded: StageRef, pad_id: int, head: str) -> Validator:
    from tasks.tokens.train import validator

    table, windows = _windows(sub, encoded, encoded, "validation", None)
    return validator(windows, table.column("tags").to_pylist(), _labels_json(encoded), pad_id,
                     sub.head.constrained_decoding, head)


TOKENS = TaskAdapter(single_head="tags", labels=_labels_json, head=_token_head, train_loader=_token_train_loader,
                     validator=_token_validator)

ADAPTERS = {"text": TEXT, "tokens": TOKENS}  # by Kind.name


def adapter_for(kind_name: str) -> TaskAdapter:
    if kind_name not in ADAPTERS:
        raise ValueError(f"multi-task training has no adapter for kind {kind_name!r}: one of {', '.join(ADAPTERS)}")
    return ADAPTERS[kind_name]
