"""Two `nightshift run` processes of one recipe started at the same moment never interleave alias moves.

Both run the tiny keyword recipe (different seeds, so two versions) against one NIGHTSHIFT_HOME; the
release lock makes one wait while the other registers, infra-validates and promotes. The alias
history in the registry then shows each process's moves as one block, and the champion chain unbroken.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from tests.flows.test_bundle import keyword_texts

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow
NAME = "kw-concurrent"


def test_two_runs_at_once_never_interleave_their_moves(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pd.DataFrame(keyword_texts(200, seed=1), columns=["text", "label"]).to_csv(tmp_path / "train.csv", index=False)
    recipe = {
        "name": NAME, "task": "text-classification",
        "data": {"train_path": str(tmp_path / "train.csv"), "labels": ["neg", "pos"]},
        "tokenizer": {"vocab_size": 200, "min_frequency": 1},
        "model": {"arch": "scratch", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.005, "threads": 1},
        "evaluate": {"min_score": 0.6, "max_regression": 0.5},
        "deploy": {"canary_size": 4, "canary_start_timeout_s": 300, "lock_timeout_s": 900},
    }
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI",
                                                           "PREFECT_API_URL", "NIGHTSHIFT_ALERT_WEBHOOK")}
    procs = []
    for seed in (1, 2):
        # each process its own ephemeral Prefect API (its own PREFECT_HOME), as two shells would have
        run_env = {**env, "NIGHTSHIFT_HOME": str(home), "PREFECT_HOME": str(tmp_path / f"prefect-{seed}")}
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "--config", str(tmp_path / "recipe.yaml"), "--set",
             f"train.seed={seed}", "--summary-json", str(tmp_path / f"summary-{seed}.json")],
            cwd=ROOT, env=run_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for proc in procs:
        out, _ = proc.communicate(timeout=1500)
        outputs.append(out)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]

    monkeypatch.setenv("NIGHTSHIFT_HOME", str(home))
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    from tasks.core import history, tracking

    tracking.configure()
    moves = history.moves(NAME)
    summaries = [json.loads((tmp_path / f"summary-{seed}.json").read_text()) for seed in (1, 2)]
    assert moves, "no alias moved"
    # each process's moves form one contiguous block: no A, B, A
    blocks = [m.context.pid for i, m in enumerate(moves) if i == 0 or m.context.pid != moves[i - 1].context.pid]
    assert len(blocks) == len(set(blocks)), [(m.context.pid, m.alias, m.from_version, m.to_version) for m in moves]
    # the champion chain is unbroken: every move starts where the one before it ended
    champion = [m for m in moves if m.alias == "champion"]
    assert champion[0].from_version is None
    assert all(b.from_version == a.to_version for a, b in zip(champion, champion[1:]))
    promoted = [s for s in summaries if s["decision"]["promoted"]]
    assert len(promoted) == len(champion) >= 1
    for s in summaries:  # the loser either waited and compared against the winner, or found its gate stale
        if not s["decision"]["promoted"]:
            assert "stale" in s["decision"]["reason"] or "already the champion" in s["decision"]["reason"] or \
                "gate failed" in s["decision"]["reason"], s["decision"]
    assert tracking.alias_version(NAME, "champion") == champion[-1].to_version
