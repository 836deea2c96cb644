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


def test_joint_steps_take_one_batch_of_every_task() -> None:
    # big: 30 batches a pass, small: 20; a joint epoch is one pass over the largest, the small task cycles
    tasks = {"big": toy_loader(900, 0, 30), "small": toy_loader(100, 1, 5)}
    loader = multitask_loader(tasks, {"big": 30, "small": 5}, "temperature", step="joint")
    assert loader.steps == 30 and loader.parts is not None
    steps = loader.batches(np.random.default_rng(0))
    assert len(steps) == 30
    seen: dict[int, list[int]] = {0: [], 1: []}
    for batch in steps:
        parts = loader.parts(batch)
        assert [int(loader.inputs(part)[0][0, 0]) for part in parts] == [0, 1]  # every task, in recipe order
        assert [len(part) for part in parts] == [30, 5]  # each task its own batch size
        for t, part in enumerate(parts):
            seen[t] += loader.inputs(part)[1].tolist()
    assert sorted(seen[0]) == list(range(900))  # one pass over the big task
    assert len(seen[1]) == 150 and set(seen[1]) == set(range(100))  # 1.5 passes over the small one
    assert len(multitask_loader(tasks, {"big": 30, "small": 5}, step="joint", steps_per_epoch=7).batches(None)) == 7


class Toy(torch.nn.Module):
    """Two tasks share w and pull it different ways: L_t = (t + 1) * (w . x - t)^2."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, -0.3]))

    def forward(self, x, index, targets=None):
        task = int(x[0, 0])
        pred = torch.stack([torch.ones(len(x)), index.float()], -1) @ self.w
        return {}, None if targets is None else (task + 1) * ((pred - task) ** 2).mean()


def toy_task(value: int) -> Loader:
    return Loader(size=4, batches=lambda rng: [np.arange(4)] * 3,
                  inputs=lambda i: (torch.full((len(i), 1), value), torch.as_tensor(i)),
                  targets=lambda i: {f"t{value}": torch.as_tensor(i)})


def reference_steps(tasks: tuple[int, ...], surgery: bool = False) -> torch.Tensor:
    """w after three AdamW steps on the tasks' losses, each task's gradient kept apart and PCGrad-merged
    when ``surgery``, summed by backward otherwise."""
    from tasks.multi.gradients import pcgrad

    model = Toy()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0)
    for _ in range(3):
        optimizer.zero_grad()
        losses = [model(torch.full((4, 1), t), torch.arange(4), targets=True)[1] for t in tasks]
        if surgery:
            parts = [[torch.autograd.grad(loss, model.w)[0]] for loss in losses]
            model.w.grad = pcgrad(parts)[0][0]
        else:
            sum(losses).backward()
        optimizer.step()
    return model.w.detach()


def fit_joint(gradient: str) -> tuple[torch.Tensor, list[dict[str, float]]]:
    from tasks.core.config import TrainConfig
    from tasks.core.fit import fit_loader

    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.1, weight_decay=0.0, warmup_fraction=0.0, schedule="constant",
                      grad_clip=None, patience=5)
    model, steps = Toy(), []
    joint = multitask_loader({"a": toy_task(0), "b": toy_task(1)}, {"a": 4, "b": 4}, step="joint", steps_per_epoch=3,
                             gradient=gradient)
    fit_loader(model, joint, lambda m, d: {"score": 0.0}, cfg, "score", on_step=lambda i, m: steps.append(m),
               progress=False)
    return model.w.detach(), steps


def test_a_joint_step_is_one_optimiser_step_on_the_summed_loss() -> None:
    w, steps = fit_joint("sum")
    assert torch.allclose(w, reference_steps((0, 1)))  # three steps, each on L_a + L_b
    assert not torch.allclose(w, reference_steps((1,)), atol=1e-3)  # not the last part's loss alone
    assert "grad_cosine" not in steps[0]


def test_a_pcgrad_joint_step_merges_the_tasks_gradients_by_surgery() -> None:
    w, steps = fit_joint("pcgrad")
    assert torch.allclose(w, reference_steps((0, 1), surgery=True))
    # the toy's two gradients agree at the first step and conflict from the second: the surgery changes the path
    assert [s["grad_conflict"] for s in steps] == [0.0, 1.0, 1.0]
    assert steps[0]["grad_cosine"] > 0 > steps[1]["grad_cosine"] >= -1.0
    assert not torch.allclose(w, reference_steps((0, 1)), atol=1e-3)


@pytest.mark.parametrize("step", ["single", "joint"])
def test_seeded_epochs_continue_each_tasks_passes(step: str) -> None:
    # epochs of 7 steps against passes of 90 and 10 batches: with a seed, an epoch picks up each task where the
    # last one stopped, so every row is seen once before any row is seen twice
    loader = multitask_loader(loaders(SIZES), BATCH, "temperature", 2.0, steps_per_epoch=7, step=step, seed=13)
    rows: dict[int, list[int]] = {0: [], 1: []}
    for epoch in range(1, 16):
        steps = loader.epoch_batches(epoch)
        assert len(steps) == 7
        for batch in steps:
            for part in (loader.parts(batch) if loader.parts else [batch]):
                ids, local = loader.inputs(part)
                rows[int(ids[0, 0])] += local.tolist()
    for task, n in ((0, 900), (1, 100)):
        seen = rows[task]
        whole = len(seen) // n * n
        assert all(sorted(seen[i:i + n]) == list(range(n)) for i in range(0, whole, n))  # whole passes, no repeats
        assert len(set(seen[whole:])) == len(seen) - whole
    if step == "joint":  # every step a batch of each: 105 big batches of 10, more than a pass over the big task
        assert len(rows[0]) == 15 * 7 * 10 and len(rows[1]) == 15 * 7 * 10
    again = multitask_loader(loaders(SIZES), BATCH, "temperature", 2.0, steps_per_epoch=7, step=step, seed=13)
    assert [str(b) for b in again.epoch_batches(9)] == [str(b) for b in loader.epoch_batches(9)]  # resumable


def test_per_task_optimisers_each_take_their_own_tasks_steps() -> None:
    from tasks.core.config import TrainConfig
    from tasks.core.fit import fit_loader

    cfg = TrainConfig(epochs=1, batch_size=4, lr=0.1, weight_decay=0.0, warmup_fraction=0.0, schedule="constant",
                      grad_clip=None, patience=5)
    rr = multitask_loader({"a": toy_task(0), "b": toy_task(1)}, {"a": 4, "b": 4}, "round_robin", steps_per_epoch=4)
    assert [rr.route(batch) for batch in rr.batches(None)] == [0, 1, 0, 1]

    def fitted(per_task: bool) -> torch.Tensor:
        model = Toy()
        groups = [[{"params": [model.w], "weight_decay": 0.0}] for _ in range(2)]
        fit_loader(model, rr, lambda m, d: {"score": 0.0}, cfg, "score", progress=False,
                   route_groups=groups if per_task else None)
        return model.w.detach()

    # the reference: two AdamW over the same w, task a's steps by one and task b's by the other
    model = Toy()
    adam = [torch.optim.AdamW([model.w], lr=0.1, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0) for _ in range(2)]
    for t in (0, 1, 0, 1):
        model.zero_grad()
        model(torch.full((4, 1), t), torch.arange(4), targets=True)[1].backward()
        adam[t].step()
    assert torch.allclose(fitted(per_task=True), model.w.detach())
    # one shared optimiser mixes the tasks' moments: another path
    assert not torch.allclose(fitted(per_task=False), model.w.detach(), atol=1e-3)
    with pytest.raises(ValueError, match="route_groups needs a loader with route"):
        joint = multitask_loader({"a": toy_task(0), "b": toy_task(1)}, {"a": 4, "b": 4}, step="joint")
        fit_loader(Toy(), joint, lambda m, d: {"score": 0.0}, cfg, "score", route_groups=[[], []])


def test_per_task_optimisers_resume_where_they_stopped(tmp_path) -> None:
    from tasks.core.config import TrainConfig
    from tasks.core.fit import fit_loader

    cfg = TrainConfig(epochs=3, batch_size=4, lr=0.1, weight_decay=0.0, warmup_fraction=0.3, grad_clip=None,
                      patience=5)
    rr = multitask_loader({"a": toy_task(0), "b": toy_task(1)}, {"a": 4, "b": 4}, "round_robin", steps_per_epoch=3)

    def fitted(checkpoint_dir=None, on_epoch=None) -> torch.Tensor:
        model = Toy()
        groups = [[{"params": [model.w], "weight_decay": 0.0}] for _ in range(2)]
        fit_loader(model, rr, lambda m, d: {"score": float(-m.w.detach().abs().sum())}, cfg, "score", checkpoint_dir,
                   on_epoch=on_epoch, progress=False, route_groups=groups)
        return model.w.detach()

    def stop(epoch: int, metrics: dict) -> None:
        if epoch == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fitted(tmp_path, stop)  # epoch 1's checkpoint holds both optimisers' moments
    assert torch.equal(fitted(tmp_path), fitted())
