"""The per-task release gate of multi-task challengers: every task by its own rule, none may regress."""

from __future__ import annotations

import pytest

from tasks.core.config import EvaluateConfig
from tasks.core.gate import TasksGateDecision, gate, gate_tasks, tasks_gate_markdown

SST2 = EvaluateConfig(primary_metric="accuracy", min_score=0.80, max_regression=0.01)
TREC = EvaluateConfig(primary_metric="accuracy", min_score=0.85, max_regression=0.02)


def decide(scores: dict[str, tuple[float, float | None]]) -> TasksGateDecision:
    cfgs = {"sst2": SST2, "trec": TREC}
    return gate_tasks({name: gate(challenger, champion, "3" if champion is not None else None, cfgs[name])
                       for name, (challenger, champion) in scores.items()})


def test_refuses_when_one_task_regresses_although_the_other_improves() -> None:
    # sst2 improves by 4 points, trec falls 3 points below the champion: beyond its 0.02 bound
    d = decide({"sst2": (0.91, 0.87), "trec": (0.90, 0.93)})
    assert d.passed is False
    assert d.failed == ["trec"]
    assert d.tasks["sst2"].passed is True and d.tasks["trec"].passed is False
    assert "trec" in d.reason and "regresses more than 0.02" in d.reason
    assert "sst2: " not in d.reason.split("failed the gate")[1]  # only the failed task is named as failing
    # the mean over tasks improved (0.905 vs 0.90): a mean-of-metrics gate would have promoted it
    assert (0.91 + 0.90) / 2 > (0.87 + 0.93) / 2


def test_passes_when_no_task_regresses_beyond_its_bound() -> None:
    # trec falls 0.015, inside its own 0.02 bound (it would fail sst2's 0.01): each task has its own bound
    d = decide({"sst2": (0.91, 0.87), "trec": (0.915, 0.93)})
    assert d.passed is True and d.failed == []
    assert d.challenger == 1.0
    assert d.champion_version == "3"


def test_refuses_below_a_tasks_own_min_score_without_champion() -> None:
    d = decide({"sst2": (0.95, None), "trec": (0.84, None)})
    assert d.passed is False and d.failed == ["trec"]
    assert "below min_score 0.85" in d.tasks["trec"].reason
    assert d.challenger == 0.5


def test_every_failure_is_named() -> None:
    d = decide({"sst2": (0.70, 0.87), "trec": (0.50, 0.93)})
    assert d.failed == ["sst2", "trec"]
    assert d.reason.startswith("2 of 2 tasks failed the gate")


def test_markdown_states_the_rule_and_each_task() -> None:
    d = decide({"sst2": (0.91, 0.87), "trec": (0.90, 0.93)})
    text = tasks_gate_markdown(d)
    assert "no task may fall more than its own max_regression" in text
    assert "| trec | accuracy | 0.9000 | 0.9300 (v3) | **no** |" in text
    assert "| sst2 | accuracy | 0.9100 | 0.8700 (v3) | yes |" in text


def test_decision_round_trips_as_plain_data() -> None:
    d = decide({"sst2": (0.91, 0.87), "trec": (0.90, 0.93)})
    again = TasksGateDecision.model_validate(d.model_dump())
    assert again == d and again.tasks["trec"].champion == 0.93


def test_tasks_judged_against_different_champions_cannot_be_combined() -> None:
    # "10" < "9" as strings: a min(key=str) pick would silently name v10; mixing champions is itself the error
    ten = gate(0.91, 0.87, "10", SST2)
    nine = gate(0.90, 0.89, "9", TREC)
    with pytest.raises(ValueError, match=r"different champion versions \(sst2: v10, trec: v9\)"):
        gate_tasks({"sst2": ten, "trec": nine})
    # a task without a champion score (a task the champion lacks) does not conflict with the others
    assert gate_tasks({"sst2": ten, "trec": gate(0.90, None, None, TREC)}).champion_version == "10"
