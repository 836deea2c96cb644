"""Shared fixtures: an isolated NIGHTSHIFT_HOME per test, one Prefect test harness per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh NIGHTSHIFT_HOME (artifacts, checkpoints, embedded MLflow) for one test."""
    path = tmp_path / "home"
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(path))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # set then deleted: undone after the test
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """One ephemeral Prefect API for the whole session (~5 s to start, so never per test)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture
def project_cwd(monkeypatch: pytest.MonkeyPatch) -> Path:
    """Run from the project root so recipes' relative data paths resolve."""
    monkeypatch.chdir(ROOT)
    return ROOT
