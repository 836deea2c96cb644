"""Batches for training and inference, whatever the kind: a :class:`Loader` says how to cut a split
into index batches and what the model's inputs and targets are for one batch. Inference-safe: torch
and numpy only, so the served predictors use it too."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def to_device(value: Any, device: torch.device) -> Any:
    """A tensor, or a dict of tensors (multi-head targets), moved to ``device``."""
    if isinstance(value, dict):
        return {k: v.to(device) for k, v in value.items()}
    return value.to(device)


@dataclass(frozen=True)
class Loader:
    """How :func:`fit_loader` reads one split, whatever the kind."""

    size: int  # rows in the split
    batches: Callable[[np.random.Generator | None], list[Any]]  # a step's index batch each; None: fixed order
    inputs: Callable[[np.ndarray], tuple[torch.Tensor, ...]]  # the model's inputs for one index batch (CPU)
    targets: Callable[[np.ndarray], Any]  # the model's targets for one index batch: a tensor or {head: tensor}
    steps: int | None = None  # batches per epoch when they are not ceil(size / batch size) (multi-task)
    # a step made of several index batches (multi-task joint steps: one per task, shapes differ): the
    # fit loop sums their losses before one optimiser step; None: every step is one index batch
    parts: Callable[[Any], list[np.ndarray]] | None = None
    # the batches of epoch N (1-based), when they depend on the epochs before it (multi-task: each task's
    # stream of passes continues across epochs); None: ``batches`` with the fit loop's per-epoch generator
    epoch_batches: Callable[[int], list[Any]] | None = None
    # with ``parts``: how the parts' gradients (one list per part, aligned on the trainable parameters,
    # None where a part did not reach one) become the step's, with step metrics to log; None: their sum
    combine: Callable[[list[list[torch.Tensor | None]]], tuple[list[torch.Tensor | None], dict[str, torch.Tensor]]] | None = None
    # which of the fit loop's optimisers takes a batch's step (multi-task, one optimiser per task: the
    # batch's task); None: there is one optimiser
    route: Callable[[Any], int] | None = None
    # targets that change as training goes on: (index batch, progress = step / total steps, in [0, 1)) ->
    # targets (multi-task distillation's teacher annealing); None: ``targets``
    progress_targets: Callable[[np.ndarray, float], Any] | None = None

    def targets_at(self, index: np.ndarray, progress: float) -> Any:
        """The targets of one index batch at ``progress`` through training."""
        return self.targets(index) if self.progress_targets is None else self.progress_targets(index, progress)


def logits_of(outputs: Any, head: str | None) -> torch.Tensor:
    """The logits of ``head`` in a model's outputs (a multi-head model returns ``{head: logits}``)."""
    return outputs[head] if isinstance(outputs, dict) else outputs


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: Loader, device: torch.device, head: str | None = None) -> np.ndarray:
    """Class probabilities (n, C) in the loader's row order."""
    model.eval()
    out: np.ndarray | None = None
    for index in loader.batches(None):
        inputs = [t.to(device) for t in loader.inputs(index)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            outputs, _ = model(*inputs)
        probs = torch.softmax(logits_of(outputs, head).float(), -1).cpu().numpy()
        if out is None:
            out = np.zeros((loader.size, probs.shape[1]), dtype=np.float32)
        out[index] = probs
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
