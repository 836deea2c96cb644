"""Multi-task training pieces: the per-task view of the shared model, model selection, per-task logging."""

from __future__ import annotations

import pytest
import torch

from models.encoders import EncoderConfig, ScratchEncoder
from models.heads import SequenceHead, TokenHead
from models.multitask import MultiTaskModel
from tasks.multi.train import TaskLosses, _single_task_checkpoint, selection_score, task_groups
from tasks.registry import recipe_from_dict


def shared_model() -> MultiTaskModel:
    torch.manual_seed(0)
    encoder = ScratchEncoder(EncoderConfig(arch="scratch", d_model=16, n_layers=1, n_heads=2, d_ff=32), 50, 12, 0)
    return MultiTaskModel(encoder, {"sst2": SequenceHead(16, 2), "wnut17": TokenHead(16, 5)}, {"sst2": 1.0, "wnut17": 0.5})


def test_single_task_view_answers_exactly_as_the_shared_head() -> None:
    model = shared_model().eval()
    ids = torch.randint(1, 50, (3, 7))
    mask = torch.ones_like(ids)
    shared, _ = model(ids, mask)
    ckpt = model.checkpoint(labels=["sst2:0", "sst2:1"])
    for task, head in (("sst2", "label"), ("wnut17", "tags")):
        view = MultiTaskModel.from_checkpoint(_single_task_checkpoint(ckpt, task, head, ["x"])).eval()
        assert list(view.heads) == [head] and view.weights == {head: 1.0}
        out, _ = view(ids, mask)
        assert torch.equal(out[head], shared[task])


def test_weighted_loss_is_the_sum_of_task_losses() -> None:
    model = shared_model().eval()  # no dropout: both forwards see the same network
    ids = torch.randint(1, 50, (4, 6))
    mask = torch.ones_like(ids)
    targets = {"sst2": torch.tensor([0, 1, 1, 0]), "wnut17": torch.randint(0, 5, (4, 6))}
    _, loss = model(ids, mask, targets)
    losses = model.last_losses
    assert loss.item() == pytest.approx(losses["sst2"] + 0.5 * losses["wnut17"], rel=1e-5)
    _, only = model(ids, mask, {"sst2": targets["sst2"]})  # a batch of one task: that task's term alone
    assert only.item() == pytest.approx(losses["sst2"], rel=1e-5)


def recipe(**multitask):
    data = {"train_path": "x.csv"}
    return recipe_from_dict({"name": "m", "task": "multi-task", "multitask": multitask,
                             "tasks": {"a": {"task": "text-classification", "data": data},
                                       "b": {"task": "text-classification", "data": data,
                                             "evaluate": {"primary_metric": "macro_f1"}}}})


def test_selection_combines_each_tasks_primary_metric() -> None:
    val = {"a.accuracy": 0.9, "a.macro_f1": 0.1, "b.accuracy": 0.1, "b.macro_f1": 0.5}
    primaries = {"a": "accuracy", "b": "macro_f1"}
    assert selection_score(val, primaries, recipe()) == pytest.approx(0.7)
    weighted = recipe(selection="weighted", selection_weights={"a": 3, "b": 1})
    assert selection_score(val, primaries, weighted) == pytest.approx((3 * 0.9 + 0.5) / 4)


def test_per_task_losses_and_validation_metrics_are_logged_under_task_prefixes() -> None:
    model = shared_model()
    steps, epochs = [], []
    ids = torch.randint(1, 50, (2, 5))
    mask = torch.ones_like(ids)
    with TaskLosses(model, lambda s, m: steps.append(m), lambda e, m: epochs.append(m)) as callbacks:
        model(ids, mask, {"sst2": torch.tensor([0, 1])})
        callbacks.on_step(1, {"train_loss": 1.0})
        model(ids, mask, {"wnut17": torch.zeros(2, 5, dtype=torch.long)})
        callbacks.on_step(2, {"train_loss": 2.0})
        # a joint step: one forward per task before the optimiser steps, both losses reported
        model(ids, mask, {"sst2": torch.tensor([1, 0])})
        model(ids, mask, {"wnut17": torch.ones(2, 5, dtype=torch.long)})
        model(ids, mask)  # a validation forward adds nothing
        callbacks.on_step(3, {"train_loss": 3.0})
    assert set(steps[0]) == {"train_loss", "sst2.train_loss"} and set(steps[1]) == {"train_loss", "wnut17.train_loss"}
    assert set(steps[2]) == {"train_loss", "sst2.train_loss", "wnut17.train_loss"}
    assert not model._forward_hooks  # the hook goes with the context
    callbacks.on_epoch(1, {"epoch": 1, "train_loss": 1.5, "val_sst2.accuracy": 0.8, "val_selection_score": 0.7})
    assert epochs[0]["sst2.val_accuracy"] == 0.8 and epochs[0]["val_selection_score"] == 0.7
    assert epochs[0]["sst2.train_loss"] == pytest.approx((steps[0]["sst2.train_loss"] + steps[2]["sst2.train_loss"]) / 2)
    assert "wnut17.train_loss" in epochs[0] and callbacks.sums == {}


def test_a_tasks_own_optimiser_holds_the_encoder_and_its_head_only() -> None:
    from tasks.core.config import TrainConfig

    model = shared_model()
    groups = task_groups(model, "sst2", 2e-4, TrainConfig(weight_decay=0.01), 3e-3)
    owned = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert all(owned[id(p)] == 2e-4 for p in model.encoder.parameters())
    assert all(owned[id(p)] == 3e-3 for p in model.heads["sst2"].parameters())
    assert not any(id(p) in owned for p in model.heads["wnut17"].parameters())
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    assert id(model.heads["sst2"].proj.weight) in decayed and id(model.heads["sst2"].proj.bias) not in decayed
