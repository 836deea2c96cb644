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
within an epoch starts its next shuffled pass; in training (``seed`` given) each task's passes also
continue across epochs, so every row is seen once before any row is seen twice, however short the
epochs. Everything is seeded by the seed and the epoch number, so a resumed run sees the same batches.

``step="joint"`` instead makes every optimiser step out of one batch of *every* task: the fit loop sums
``w_t * L_t`` over the tasks before it steps, so each step follows the gradient of the whole multi-task
loss. The sampling strategy does not apply; each task's share of the rows is set by its batch size. An
epoch is then ``max_t b_t`` steps, or ``steps_per_epoch``. With ``gradient="pcgrad"`` the loader's
``combine`` (:func:`tasks.multi.gradients.pcgrad`) merges the tasks' gradients by surgery instead of
summing them.

With single steps the loader's ``route`` names the task of a batch (its index in ``loaders``), which
picks the optimiser that takes the step when every task has its own (``multitask.optimizer: per_task``).

Indices are global: task t's rows are ``offsets[t] .. offsets[t+1]-1``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator
from typing import Any, Literal

import numpy as np

from tasks.core.batching import Loader
from tasks.multi.gradients import pcgrad

Sampling = Literal["proportional", "temperature", "round_robin"]
Step = Literal["single", "joint"]
Gradient = Literal["sum", "pcgrad"]


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
                     temperature: float = 2.0, steps_per_epoch: int | None = None, step: Step = "single",
                     seed: int | None = None, gradient: Gradient = "sum") -> Loader:
    """One loader over the tasks' loaders (insertion order; ``batch_sizes``: the batch size each was built
    with), drawing batches per ``sampling`` (``step="joint"``: a batch of every task per step); an epoch
    is ``steps_per_epoch`` steps (None: one pass).

    With a ``seed`` the loader also has ``epoch_batches(epoch)``, which the fit loop uses: each task's
    batches then continue one endless stream of seeded passes across epochs, so an epoch shorter than a
    task's pass picks up where the last one stopped and every row is seen once before any is seen
    twice. Without it (``batches(rng)``) every epoch starts each task on a fresh pass, which, with
    ``steps_per_epoch`` well under a pass, trains on a random ~80% of a large task's rows, some of them
    several times, and never on the rest.
    """
    names = list(loaders)
    sizes = [loaders[name].size for name in names]
    if sum(sizes) == 0:
        raise ValueError("every task's train split is empty")
    passes = [math.ceil(n / batch_sizes[name]) for name, n in zip(names, sizes)]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    live = [t for t, n in enumerate(sizes) if n > 0]
    n_batches = steps_per_epoch or (max(passes) if step == "joint" else sum(passes))

    def order(rng: np.random.Generator | None) -> np.ndarray:
        """The task of each batch of an epoch (joint: every live task at every step)."""
        if step == "joint":
            return np.tile(live, n_batches)
        return task_order(passes, n_batches, sampling, temperature, rng)

    def assemble(tasks: np.ndarray, next_batch: Callable[[int], np.ndarray]) -> list[Any]:
        out = [next_batch(int(t)) + offsets[t] for t in tasks]
        return [tuple(out[i:i + len(live)]) for i in range(0, len(out), len(live))] if step == "joint" else out

    def batches(rng: np.random.Generator | None) -> list[Any]:
        pending: dict[int, list[np.ndarray]] = {t: [] for t in range(len(names))}

        def next_batch(t: int) -> np.ndarray:
            if not pending[t]:
                pending[t] = list(loaders[names[t]].batches(rng))[::-1]
            return pending[t].pop()

        return assemble(order(rng), next_batch)

    def epoch_batches(epoch: int) -> list[Any]:
        # the epochs before this one say how far into its stream each task already is; their orders are
        # recomputed from their seeds, so a resumed run continues exactly where the first one would have
        tasks = [order(np.random.default_rng([seed, e])) for e in range(1, epoch + 1)]
        used = np.bincount(np.concatenate([np.empty(0, np.int64), *tasks[:-1]]).astype(np.int64), minlength=len(names))
        streams = {t: itertools.islice(_stream(loaders[names[t]], seed, t), int(used[t]), None) for t in live}
        return assemble(tasks[-1], lambda t: next(streams[t]))

    def route(index: np.ndarray) -> int:
        return int(np.searchsorted(offsets, index[0], side="right") - 1)

    def split(index: np.ndarray) -> tuple[str, np.ndarray]:
        t = route(index)
        return names[t], index - offsets[t]

    def inputs(index: np.ndarray):
        name, local = split(index)
        return loaders[name].inputs(local)

    def targets(index: np.ndarray):
        name, local = split(index)
        return loaders[name].targets(local)

    def progress_targets(index: np.ndarray, progress: float):
        name, local = split(index)
        return loaders[name].targets_at(local, progress)

    return Loader(size=int(sum(sizes)), batches=batches, inputs=inputs, targets=targets, steps=n_batches,
                  parts=list if step == "joint" else None, epoch_batches=None if seed is None else epoch_batches,
                  combine=pcgrad if step == "joint" and gradient == "pcgrad" else None,
                  route=None if step == "joint" else route,
                  progress_targets=progress_targets if any(ld.progress_targets for ld in loaders.values()) else None)


def _stream(loader: Loader, seed: int, task: int) -> Iterator[np.ndarray]:
    """A task's batches, pass after pass, pass k shuffled by its own generator ``[seed, task, k]``."""
    for k in itertools.count():
        yield from loader.batches(np.random.default_rng([seed, 1_000 + task, k]))


def task_of_batch(loader_sizes: list[int], index: np.ndarray) -> int:
    """The task index of a global index batch (for tests and logging)."""
    offsets = np.concatenate([[0], np.cumsum(loader_sizes)])
    return int(np.searchsorted(offsets, index[0], side="right") - 1)
