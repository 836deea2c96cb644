"""Metrics and the release gate."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.config import EvaluateConfig
from tasks.core.gate import classification_report, confusion_png, gate


def test_report_matches_hand_counts() -> None:
    report = classification_report(["a", "a", "b", "b"], ["a", "b", "b", "b"], ["a", "b"])
    assert report["accuracy"] == 0.75
    assert report["per_class"]["a"] == {"precision": 1.0, "recall": 0.5, "f1": pytest.approx(2 / 3), "support": 2}
    assert report["per_class"]["b"]["precision"] == pytest.approx(2 / 3)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.8) / 2)


CFG = EvaluateConfig(primary_metric="accuracy", min_score=0.7, max_regression=0.02)


def test_gate_first_model_needs_min_score() -> None:
    assert gate(0.8, None, None, CFG).passed
    failed = gate(0.6, None, None, CFG)
    assert not failed.passed and "min_score" in failed.reason


def test_gate_against_champion() -> None:
    assert gate(0.79, 0.80, "3", CFG).passed  # within max_regression
    worse = gate(0.77, 0.80, "3", CFG)
    assert not worse.passed and "v3" in worse.reason and worse.champion == 0.80
    assert gate(0.85, 0.80, "3", CFG).passed


def test_confusion_png(tmp_path: Path) -> None:
    cm = confusion_png(["a", "b", "b"], ["a", "a", "b"], ["a", "b"], tmp_path / "cm.png")
    assert cm == [[1, 0], [1, 1]]
    assert (tmp_path / "cm.png").read_bytes()[:4] == b"\x89PNG"
