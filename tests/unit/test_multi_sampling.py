"""Batches across tasks: every batch from one task, the strategies' shares, seeded and resumable."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tasks.core.batching import Loader
from tasks.multi.sampling import multitask_loader, task_order, task_probabilities


def toy_loader(n: int, value: int, batch_size: int) -> Loader:
    """Rows whose input is the task's ``value`` (so a batch shows which task it came from)."""
    return Loader(
        size=n,
        batches=lambda rng: [b for b in np.array_split(rng.permutation(n) if rng is not None else np.arange(n),
                                                        math.ceil(n / batch_size))],
        inputs=lambda index: (torch.full((len(index), 1), value), torch.as_tensor(index)),
        targets=lambda index: {f"t{value}": torch.as_tensor(index)},
    )


def loaders(sizes: dict[str, int], batch_size: int = 10) -> dict[str, Loader]:
    return {name: toy_loader(n, i, batch_size) for i, (name, n) in enumerate(sizes.items())}


SIZES = {"big": 900, "small": 100}
BATCH = {"big": 10, "small": 10}


def counts(loader: Loader, seed: int = 0) -> dict[int, int]:
    out: dict[int, int] = {}
    for index in loader.batches(np.random.default_rng(seed)):
        task = int(loader.inputs(index)[0][0, 0])
        out[task] = out.get(task, 0) + 1
    return out


def test_every_batch_comes_from_one_task_with_its_local_rows() -> None:
    loader = multitask_loader(loaders(SIZES), BATCH, "proportional")
    seen = {0: set(), 1: set()}
    for index in loader.batches(np.random.default_rng(1)):
        ids, local = loader.inputs(index)
        task = int(ids[0, 0])
        assert (ids == task).all()  # one task per batch
        (target_name, target), = loader.targets(index).items()
        assert target_name == f"t{task}" and torch.equal(target, local)
        seen[task].update(local.tolist())
    assert seen[0] == set(range(900)) and seen[1] == set(range(100))  # proportional: one pass over every row


def test_proportional_shares_follow_the_sizes() -> None:
    loader = multitask_loader(loaders(SIZES), BATCH, "proportional")
    assert counts(loader) == {0: 90, 1: 10}


def test_temperature_gives_the_small_task_more_batches() -> None:
    p = task_probabilities([900, 100], "temperature", 2.0)
    assert p[1] == pytest.approx(10 / (30 + 10))  # sqrt sizes: 30 and 10
    c = counts(multitask_loader(loaders(SIZES), BATCH, "temperature", 2.0))
    assert sum(c.values()) == 100  # an epoch is one pass's batches whatever the strategy
    assert 15 <= c[1] <= 35  # ~25 expected, against 10 proportional
    assert task_probabilities([900, 100], "temperature", 1.0) == pytest.approx([0.9, 0.1])


def test_round_robin_alternates() -> None:
    order = task_order([900, 100], 6, "round_robin", 1.0, np.random.default_rng(0))
    assert order.tolist() == [0, 1, 0, 1, 0, 1]
    c = counts(multitask_loader(loaders(SIZES), BATCH, "round_robin"))
    assert c == {0: 50, 1: 50}  # the small task cycles through fresh passes


def test_seeded_and_deterministic() -> None:
    loader = multitask_loader(loaders(SIZES), BATCH, "temperature")
    a = [b.tolist() for b in loader.batches(np.random.default_rng([13, 2]))]
    b = [b.tolist() for b in loader.batches(np.random.default_rng([13, 2]))]
    c = [b.tolist() for b in loader.batches(np.random.default_rng([13, 3]))]
    assert a == b and a != c


def test_an_empty_task_gets_no_batches() -> None:
    c = counts(multitask_loader(loaders({"a": 50, "b": 0}), {"a": 10, "b": 10}, "round_robin"))
    assert c == {0: 5}


def test_each_task_keeps_its_own_batch_size_and_shares_follow_its_passes() -> None:
    # big: 900 rows in batches of 30 (30 batches a pass); small: 100 rows in batches of 5 (20 a pass)
    tasks = {"big": toy_loader(900, 0, 30), "small": toy_loader(100, 1, 5)}
    loader = multitask_loader(tasks, {"big": 30, "small": 5}, "proportional")
    assert loader.steps == 50
    sizes: dict[int, set[int]] = {0: set(), 1: set()}
    for index in loader.batches(np.random.default_rng(0)):
        ids, _ = loader.inputs(index)
        sizes[int(ids[0, 0])].add(len(index))
    assert sizes == {0: {30}, 1: {5}}
    assert counts(loader) == {0: 30, 1: 20}  # proportional to the batches a pass takes, not to the rows (90 / 10)
    # temperature works on the same pass counts: T = 2 gives sqrt(30) : sqrt(20)
    assert task_probabilities([30, 20], "temperature", 2.0)[1] == pytest.approx(20 ** 0.5 / (30 ** 0.5 + 20 ** 0.5))


def test_steps_per_epoch_sets_the_epoch_length() -> None:
    loader = multitask_loader(loaders(SIZES), BATCH, "proportional", steps_per_epoch=7)
    assert loader.steps == 7 and len(loader.batches(np.random.default_rng(0))) == 7
    c = counts(multitask_loader(loaders(SIZES), BATCH, "proportional", steps_per_epoch=400))
    assert c == {0: 360, 1: 40}  # longer than a pass: each task starts fresh passes, shares unchanged
