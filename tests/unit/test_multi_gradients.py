"""PCGrad on hand-made gradients: projection only where tasks conflict, heads untouched, the step stats."""

from __future__ import annotations

import pytest
import torch

from tasks.multi.gradients import pcgrad


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


def test_conflicting_gradients_are_projected_off_each_other() -> None:
    g1, g2 = t(1.0, 0.0), t(-1.0, 1.0)  # dot -1: they conflict
    (merged,), stats = pcgrad([[g1.clone()], [g2.clone()]])  # the parts are consumed
    # g1 - (g1.g2 / |g2|^2) g2 = (0.5, 0.5); g2 - (g2.g1 / |g1|^2) g1 = (0, 1)
    assert torch.allclose(merged, t(0.5, 1.5))
    assert float(stats["grad_conflict"]) == 1.0
    assert float(stats["grad_cosine"]) == pytest.approx(-2 ** -0.5)
    # what each task contributes no longer opposes the other's own gradient
    assert float(t(0.5, 0.5) @ g2) == pytest.approx(0.0) and float(t(0.0, 1.0) @ g1) == pytest.approx(0.0)
    assert float(merged @ g1) > 0 and float(merged @ g2) > 0  # the plain sum (0, 1) is orthogonal to g1


def test_agreeing_gradients_are_just_summed() -> None:
    (merged,), stats = pcgrad([[t(1.0, 1.0)], [t(1.0, 0.0)]])
    assert torch.equal(merged, t(2.0, 1.0))
    assert float(stats["grad_conflict"]) == 0.0 and float(stats["grad_cosine"]) == pytest.approx(2 ** -0.5)


def test_the_dot_product_spans_every_shared_parameter() -> None:
    # per tensor the two conflict on the first and agree more on the second: overall they agree
    merged, stats = pcgrad([[t(1.0), t(2.0, 0.0)], [t(-1.0), t(2.0, 1.0)]])
    assert torch.equal(merged[0], t(0.0)) and torch.equal(merged[1], t(4.0, 1.0))
    assert float(stats["grad_conflict"]) == 0.0


def test_heads_keep_their_own_task_gradient() -> None:
    # [shared, head a, head b]: each task reaches the shared tensor and its own head only
    a = [t(1.0, 0.0), t(3.0), None]
    b = [t(-1.0, 1.0), None, t(-5.0)]
    merged, _ = pcgrad([a, b])
    assert torch.allclose(merged[0], t(0.5, 1.5))
    assert torch.equal(merged[1], t(3.0)) and torch.equal(merged[2], t(-5.0))


def test_a_parameter_no_part_reached_stays_without_a_gradient() -> None:
    merged, _ = pcgrad([[t(1.0), None], [t(-1.0), None]])
    assert merged[1] is None
    assert torch.equal(merged[0], t(0.0))  # exactly opposed: both projections vanish


def test_a_zero_gradient_conflicts_with_nothing() -> None:
    merged, stats = pcgrad([[t(0.0, 0.0)], [t(1.0, -2.0)]])
    assert torch.equal(merged[0], t(1.0, -2.0))
    assert torch.isfinite(stats["grad_cosine"]) and float(stats["grad_conflict"]) == 0.0


def test_three_tasks_each_projected_off_every_conflicting_other() -> None:
    g = [t(1.0, 0.0, 0.0), t(-1.0, 1.0, 0.0), t(0.0, 0.0, 1.0)]
    merged, stats = pcgrad([[x] for x in g])
    # the third is orthogonal to both and passes unchanged; the first two conflict with each other only
    assert torch.allclose(merged[0], t(0.5, 1.5, 1.0))
    assert float(stats["grad_conflict"]) == pytest.approx(2 / 6)


def test_one_part_is_returned_as_it_is() -> None:
    merged, stats = pcgrad([[t(1.0, -1.0)]])
    assert torch.equal(merged[0], t(1.0, -1.0)) and float(stats["grad_conflict"]) == 0.0


def test_misaligned_parts_are_refused() -> None:
    with pytest.raises(ValueError, match="same parameters"):
        pcgrad([[t(1.0)], [t(1.0), t(2.0)]])
    with pytest.raises(ValueError, match="no gradients"):
        pcgrad([])
