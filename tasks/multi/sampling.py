"""Batches across tasks: one :class:`tasks.core.batching.Loader` over several tasks' train loaders.

Every batch comes from one task (its own batch size, length bucketing and padding), so its targets are
``{task: tensor}`` and the model's loss for it is ``w_t * L_t``; over an epoch the loss summed is
``sum_t w_t * L_t`` with each task's share set by the sampling strategy. The shares are computed on
``b_t``, the batches one pass over task t's train split takes (``ceil(rows_t / batch_size_t)``; with one
batch size for all tasks that is the same as computing them on the rows):

- ``proportional``: each task gets batches in proportion to ``b_t`` (largest remainder), in seeded
  random order: an epoch of ``sum_t b_t`` batches sees every row of every task once.
- ``temperature``: each batch's task is drawn with ``p_t ~ b_t^(1/T)`` (T = 1: proportional; large T:
  uniform), which gives small tasks more steps than their size alone would.
- ``round_robin``: the tasks in turn.

An epoch is ``sum_t b_t`` batches whatever the strategy, or ``steps_per_epoch`` when given (validation,
early stopping and the best epoch then come every that many steps). A task that runs out of batches
within an epoch starts a fresh shuffled pass. Everything draws from the fit loop's per-epoch generator,
so a resumed run sees the same batches. Indices are global: task t's rows are
``offsets[t] .. offsets[t+1]-1``.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from tasks.core.batching import Loader

Sampling = Literal["proportional", "temperature", "round_robin"]


def task_probabilities(sizes: list[int], sampling: Sampling, temperature: float = 1.0) -> np.ndarray:
    """The share of batches each task gets, from each task's ``b_t`` in ``sizes`` (round_robin: equal shares)."""
    n = np.asarray(sizes, dtype=np.float64)
    if sampling == "round_robin":
        p = np.ones_like(n)
    elif sampling == "temperature":
        p = n ** (1.0 / temperature)
    else:
        p = n.copy()
    p[n == 0] = 0.0
    return p / p.sum()


def task_order(sizes: list[int], n_batches: int, sampling: Sampling, temperature: float,
               rng: np.random.Generator | None) -> np.ndarray:
    """The task of each of ``n_batches`` batches (task indices)."""
    tasks = len(sizes)
    p = task_probabilities(sizes, sampling, temperature)
    if sampling == "round_robin":
        live = np.flatnonzero(p > 0)
        return live[np.arange(n_batches) % len(live)]
    if sampling == "temperature" and rng is not None:
        return rng.choice(tasks, size=n_batches, p=p)
    # proportional (and temperature without a generator: its expected counts), largest remainder
    exact = p * n_batches
    counts = np.floor(exact).astype(np.int64)
    for t in np.argsort(-(exact - counts), kind="stable")[: n_batches - int(counts.sum())]:
        counts[t] += 1
    order = np.repeat(np.arange(tasks), counts)
    return rng.permutation(order) if rng is not None else order


def multitask_loader(loaders: dict[str, Loader], batch_sizes: dict[str, int], sampling: Sampling = "proportional",
                     temperature: float = 2.0, steps_per_epoch: int | None = None) -> Loader:
    """One loader over the tasks' loaders (insertion order; ``batch_sizes``: the batch size each was built
    with), drawing batches per ``sampling``; an epoch is ``steps_per_epoch`` batches (None: one pass)."""
    names = list(loaders)
    sizes = [loaders[name].size for name in names]
    if sum(sizes) == 0:
        raise ValueError("every task's train split is empty")
    passes = [math.ceil(n / batch_sizes[name]) for name, n in zip(names, sizes)]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n_batches = steps_per_epoch or sum(passes)

    def batches(rng: np.random.Generator | None) -> list[np.ndarray]:
        pending: dict[int, list[np.ndarray]] = {t: [] for t in range(len(names))}
        out = []
        for t in task_order(passes, n_batches, sampling, temperature, rng):
            if not pending[t]:
                pending[t] = list(loaders[names[t]].batches(rng))[::-1]
            out.append(pending[t].pop() + offsets[t])
        return out

    def split(index: np.ndarray) -> tuple[str, np.ndarray]:
        t = int(np.searchsorted(offsets, index[0], side="right") - 1)
        return names[t], index - offsets[t]

    def inputs(index: np.ndarray):
        name, local = split(index)
        return loaders[name].inputs(local)

    def targets(index: np.ndarray):
        name, local = split(index)
        return loaders[name].targets(local)

    return Loader(size=int(sum(sizes)), batches=batches, inputs=inputs, targets=targets, steps=n_batches)


def task_of_batch(loader_sizes: list[int], index: np.ndarray) -> int:
    """The task index of a global index batch (for tests and logging)."""
    offsets = np.concatenate([[0], np.cumsum(loader_sizes)])
    return int(np.searchsorted(offsets, index[0], side="right") - 1)
