"""The command line: bad input ends with one clear line and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import main

ROOT = Path(__file__).resolve().parents[2]


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def test_missing_recipe_is_one_line(home: Path, capsys) -> None:
    code, _, err = run_cli(["run", "--config", "configs/nope.yaml"], capsys)
    assert code == 2
    assert err.strip() == "nightshift: error: configs/nope.yaml: recipe file not found"


def test_unknown_key_names_it(home: Path, project_cwd: Path, capsys) -> None:
    code, _, err = run_cli(["run", "--set", "train.epochz=1"], capsys)
    assert code == 2 and "train.epochz" in err and "Traceback" not in err


def run_process(args: list[str], home: Path) -> tuple[int, str, str]:
    """The CLI in its own process, as a user runs it (its own ephemeral Prefect API)."""
    env = {**os.environ, "NIGHTSHIFT_HOME": str(home)}
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    return done.returncode, done.stdout, done.stderr


@pytest.mark.slow
def test_missing_data_file_fails_the_run_cleanly(home: Path, tmp_path: Path) -> None:
    summary = tmp_path / "summary.json"
    code, _, err = run_process(["run", "--set", "data.train_path=data/sst2/missing.parquet",
                                "--summary-json", str(summary)], home)
    assert code == 2, err
    errors = [line for line in err.splitlines() if line.startswith("nightshift: error:")]
    assert len(errors) == 1 and "data/sst2/missing.parquet" in errors[0], err
    assert "Traceback" not in err
    assert json.loads(summary.read_text())["status"] == "failed"


@pytest.mark.slow
def test_missing_column_names_file_and_columns(home: Path, tmp_path: Path) -> None:
    data = tmp_path / "reviews.csv"
    data.write_text("review,stars\ngreat,5\nawful,1\n")
    code, _, err = run_process(["run", "--set", f"data.train_path={data}", "--set", "data.test_path=null",
                                "--set", "data.text_column=text", "--set", "data.labels=null"], home)
    assert code == 2, err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("nightshift: error:")]
    assert len(errors) == 1 and "reviews.csv" in errors[0] and "review" in errors[0], err
