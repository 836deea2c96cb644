"""Training mechanics: bucketing, dynamic padding, schedule, threads, determinism, resume, loss falls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from models.encoders import EncoderConfig
from models.multitask import MultiTaskModel, build_text_model, param_groups
from tasks.core.batching import predict_loader
from tasks.core.config import TrainConfig
from tasks.core.fit import FitResult, WeightAverage, fit_loader, lr_multiplier, probe_steps, score, torch_threads, warmup_linear
from tasks.text.loader import (
    EncodedSplit,
    collate,
    length_bucketed_batches,
    text_loader,
)

HEAD = "label"


def fit(model: MultiTaskModel, train: EncodedSplit, val: EncodedSplit, cfg: TrainConfig, metric: str,
        checkpoint_dir: Path | None = None, on_step=None, on_epoch=None) -> FitResult:
    """The core fit loop on token-id splits, validated by accuracy of the one head."""
    val_loader = text_loader(val, 64, model.pad_id, HEAD)

    def validate(m: torch.nn.Module, device: torch.device) -> dict[str, float]:
        return score(val.labels, predict_loader(m, val_loader, device, HEAD).argmax(1))

    return fit_loader(model, text_loader(train, cfg.batch_size, model.pad_id, HEAD), validate, cfg, metric,
                      checkpoint_dir, on_step, on_epoch, progress=False)


def split_from(rows: list[list[int]], labels: list[int]) -> EncodedSplit:
    return EncodedSplit.from_table(pa.table({
        "input_ids": pa.array(rows, pa.list_(pa.int32())), "label_id": pa.array(labels, pa.int32())}))


def synthetic(n: int, seed: int) -> EncodedSplit:
    """Label 1 iff token 5 occurs; lengths 3..12."""
    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for _ in range(n):
        length = int(rng.integers(3, 13))
        row = rng.integers(6, 30, size=length)
        label = int(rng.integers(0, 2))
        if label:
            row[rng.integers(0, length)] = 5
        rows.append([2, *row.tolist(), 3])
        labels.append(label)
    return split_from(rows, labels)


def test_encoded_split_from_sliced_table() -> None:
    table = pa.table({"input_ids": pa.array([[1, 2], [3], [4, 5, 6]], pa.list_(pa.int32())),
                      "label_id": pa.array([0, 1, 0], pa.int32())}).slice(1)
    split = EncodedSplit.from_table(table)
    assert split.lengths.tolist() == [1, 3]
    assert split.values.tolist() == [3, 4, 5, 6]


def test_collate_pads_to_longest_in_batch() -> None:
    split = split_from([[1, 2, 3], [4], [5, 6]], [0, 1, 0])
    ids, mask, labels = collate(split, np.array([1, 2]), pad_id=0)
    assert ids.tolist() == [[4, 0], [5, 6]]
    assert mask.tolist() == [[1, 0], [1, 1]]
    assert labels.tolist() == [1, 0]


def test_batches_cover_everything_once_and_bucket_by_length() -> None:
    lengths = np.random.default_rng(0).integers(1, 100, size=1000)
    batches = length_bucketed_batches(lengths, 16, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == list(range(1000))
    spread = np.mean([lengths[b].max() - lengths[b].min() for b in batches])
    assert spread < 10  # random batches would spread ~90 tokens
    again = length_bucketed_batches(lengths, 16, np.random.default_rng(1))
    assert all((a == b).all() for a, b in zip(batches, again))


def test_warmup_then_linear_decay() -> None:
    f = warmup_linear(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(55) == pytest.approx(0.5) and f(100) == 0.0


def test_no_weight_decay_on_biases_norms_embeddings() -> None:
    model = build_text_model(EncoderConfig(d_model=16, n_heads=2, d_ff=32), {HEAD: ("sequence", 2)},
                             vocab_size=30, max_length=8)
    decay, no_decay = param_groups(model, 1e-3, 0.1)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert any(p is model.encoder.tok_emb.weight for p in no_decay["params"])
    assert any(p is model.heads[HEAD].proj.weight for p in decay["params"])


def test_threads_are_set_for_training_and_restored() -> None:
    before = torch.get_num_threads()
    with torch_threads(1) as used:
        assert used == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def small_model(label_smoothing: float = 0.0) -> MultiTaskModel:
    torch.manual_seed(0)
    return build_text_model(EncoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.1),
                            {HEAD: ("sequence", 2)}, vocab_size=30, max_length=16, label_smoothing=label_smoothing)


def cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"epochs": 3, "batch_size": 32, "lr": 3e-3, "seed": 7, "device": "cpu", "patience": 5, **kw})


def test_loss_falls_and_learns() -> None:
    losses: list[float] = []
    result = fit(small_model(), synthetic(800, 0), synthetic(200, 1), cfg(), "accuracy",
                 on_step=lambda step, m: losses.append(m["train_loss"]))
    assert np.mean(losses[-10:]) < 0.5 * np.mean(losses[:10])
    assert result.best_score > 0.9


def test_rerun_is_identical() -> None:
    a = fit(small_model(), synthetic(300, 0), synthetic(100, 1), cfg(epochs=2), "accuracy")
    b = fit(small_model(), synthetic(300, 0), synthetic(100, 1), cfg(epochs=2), "accuracy")
    assert a.history == b.history


class Interrupt(Exception):
    pass


def interrupted_then_resumed(train: EncodedSplit, val: EncodedSplit, config: TrainConfig, ckpt: Path) -> FitResult:
    """Fit, interrupted at epoch 2, then fit again from ``ckpt``: the resumed run's result."""
    def stop_after_two(epoch: int, metrics: dict) -> None:
        if epoch == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        # the checkpoint of epoch 2 is written after on_epoch; interrupt at epoch 2 leaves epoch 1's
        fit(small_model(), train, val, config, "accuracy", ckpt, on_epoch=stop_after_two)
    assert (ckpt / "last.pt").exists()
    return fit(small_model(), train, val, config, "accuracy", ckpt)


def test_resume_from_checkpoint_matches_uninterrupted(tmp_path: Path) -> None:
    train, val = synthetic(300, 0), synthetic(100, 1)
    full = fit(small_model(), train, val, cfg(epochs=3), "accuracy")
    resumed = interrupted_then_resumed(train, val, cfg(epochs=3), tmp_path / "ckpt")
    assert resumed.resumed_from_epoch == 1
    assert resumed.history == full.history


def test_early_stopping() -> None:
    # lr 0 never improves after epoch 1, so patience 1 stops at epoch 2
    result = fit(small_model(), synthetic(100, 0), synthetic(50, 1), cfg(epochs=10, patience=1, lr=1e-12), "accuracy")
    assert len(result.history) == 2 and result.best_epoch == 1


def test_label_smoothing_changes_the_training_loss() -> None:
    """With smoothing the loss cannot fall towards 0: a confident model still pays for the smoothed mass."""
    def final_loss(smoothing: float) -> float:
        losses: list[float] = []
        fit(small_model(smoothing), synthetic(400, 0), synthetic(100, 1), cfg(epochs=6), "accuracy",
            on_step=lambda step, m: losses.append(m["train_loss"]))
        return float(np.mean(losses[-5:]))

    plain, smoothed = final_loss(0.0), final_loss(0.4)
    assert smoothed > plain + 0.1


def test_weight_average_is_the_bias_corrected_ema() -> None:
    """After n updates: sum_i (1-d) d^(n-i) w_i / (1 - d^n); integer buffers untouched, raw weights restored."""
    layer = torch.nn.Linear(2, 1)
    layer.register_buffer("ids", torch.arange(3))
    average = WeightAverage(layer, decay=0.5)
    assert "ids" not in average.shadow
    raw = layer.weight.detach().clone()
    with average.applied(layer):  # nothing averaged yet: the weights as they are
        torch.testing.assert_close(layer.weight.detach(), raw)
    seen = []
    for _ in range(3):
        with torch.no_grad():
            layer.weight.add_(1.0)
        seen.append(layer.weight.detach().clone())
        average.update(layer)
    expected = sum(0.5 * 0.5 ** (3 - i) * w for i, w in enumerate(seen, start=1)) / (1 - 0.5 ** 3)
    torch.testing.assert_close(average.averaged()["weight"], expected)
    raw = layer.weight.detach().clone()
    with average.applied(layer):
        torch.testing.assert_close(layer.weight.detach(), expected)
    torch.testing.assert_close(layer.weight.detach(), raw)  # training resumes on its own weights


def test_ema_is_what_gets_validated_and_kept() -> None:
    """With train.ema_decay the stored weights are the average of the weights after every step."""
    model = small_model()
    seen: list[dict[str, torch.Tensor]] = []

    def after_step(step: int, metrics: dict) -> None:
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items() if v.is_floating_point()})

    result = fit(model, synthetic(400, 0), synthetic(100, 1), cfg(epochs=1, ema_decay=0.9), "accuracy",
                 on_step=after_step)
    n = len(seen)
    for key in seen[0]:
        expected = sum(0.1 * 0.9 ** (n - i) * w[key] for i, w in enumerate(seen, start=1)) / (1 - 0.9 ** n)
        torch.testing.assert_close(model.state_dict()[key], expected)
    assert not torch.equal(model.state_dict()["heads.label.proj.weight"], seen[-1]["heads.label.proj.weight"])
    assert result.best_epoch == 1


def test_ema_learns_and_resumes_exactly(tmp_path: Path) -> None:
    train, val = synthetic(600, 0), synthetic(200, 1)
    full = fit(small_model(), train, val, cfg(epochs=3, ema_decay=0.95), "accuracy")
    assert full.best_score > 0.9
    resumed = interrupted_then_resumed(train, val, cfg(epochs=3, ema_decay=0.95), tmp_path / "ckpt")
    assert resumed.resumed_from_epoch == 1
    assert resumed.history == full.history  # the average's state travels with the checkpoint


def test_probe_schedule_holds_the_heads_at_peak_then_warms_up_again() -> None:
    f = lr_multiplier(110, cfg(probe_fraction=0.1, warmup_fraction=0.1))  # 11 probe steps
    assert [f(s) for s in (0, 10)] == [1.0, 1.0]
    assert f(11) == pytest.approx(1 / 9) and f(19) == pytest.approx(1.0)  # warmup over the 99 steps left
    assert f(11 + 9 + 45) == pytest.approx(0.5) and f(110) == 0.0


def test_probe_trains_the_heads_alone_then_everything() -> None:
    """train.probe_fraction: the encoder does not move (and logs lr 0) for the first N steps, the head does; then both."""
    model = small_model()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    after: list[tuple[dict[str, torch.Tensor], float]] = []

    def after_step(step: int, metrics: dict) -> None:
        after.append(({k: v.detach().clone() for k, v in model.state_dict().items()}, metrics["lr"]))

    result = fit(model, synthetic(600, 0), synthetic(200, 1), cfg(epochs=3, probe_fraction=0.2), "accuracy",
                 on_step=after_step)
    n = probe_steps(len(after), cfg(probe_fraction=0.2))
    encoder = [k for k in start if k.startswith("encoder.") and start[k].is_floating_point()]
    for state, lr in after[:n]:
        assert all(torch.equal(state[k], start[k]) for k in encoder) and lr == 0.0
    assert not torch.equal(after[n - 1][0]["heads.label.proj.weight"], start["heads.label.proj.weight"])
    state, lr = after[n]
    assert any(not torch.equal(state[k], start[k]) for k in encoder) and lr > 0
    assert all(p.requires_grad for p in model.parameters())
    assert result.best_score > 0.9


def test_probe_resumes_exactly_from_a_checkpoint_inside_it(tmp_path: Path) -> None:
    train, val = synthetic(300, 0), synthetic(100, 1)  # 10 steps an epoch: epoch 1's checkpoint is mid-probe
    full = fit(small_model(), train, val, cfg(epochs=3, probe_fraction=0.5), "accuracy")
    resumed = interrupted_then_resumed(train, val, cfg(epochs=3, probe_fraction=0.5), tmp_path / "ckpt")
    assert resumed.resumed_from_epoch == 1
    assert resumed.history == full.history


def test_probe_needs_an_encoder_to_freeze() -> None:
    with pytest.raises(ValueError, match="train.probe_fraction"):
        fit_loader(torch.nn.Linear(2, 2), text_loader(synthetic(100, 0), 32, 0, HEAD), lambda m, d: {"accuracy": 0.0},
                   cfg(epochs=1, probe_fraction=0.5), "accuracy", progress=False)
