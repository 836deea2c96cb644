"""Resume after a crash: a real ``nightshift run`` killed with SIGKILL during training, then run again.

The rerun finds the prep stages in the store (cache hits), continues training from the last epoch
checkpoint and ends with exactly the test metrics of a run that was never killed (CPU, one thread:
deterministic). The summary and the MLflow train run say which epoch it resumed from. Beside it, the
two ways a crash can leave a half-written file behind: a truncated ``last.pt`` is detected and
training starts over, and a stage directory without its manifest is never a cache hit.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from tasks.core.store import MANIFEST, ArtifactStore, stage_key

ROOT = Path(__file__).resolve().parents[2]
NAME = "kw-resume"
EPOCHS = 6
PREP = ("ingest", "validate", "clean", "split", "encode", "augment")

FILLER = ("the a movie film story plot actor scene show book day night city team game music song food place "
          "time people thing way world house car road river tree cloud window table").split()
KEYWORDS = {"pos": ("wonderful", "excellent"), "neg": ("terrible", "awful")}


def keyword_rows(n: int, seed: int, noise: float = 0.15) -> list[tuple[str, str]]:
    """``n`` (text, label) rows: filler words and one keyword that decides the label, but for a ``noise``
    fraction of flipped labels (so the test metrics are not a saturated 1.0 that any run would reach)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(FILLER, k=rng.randint(5, 9))
        words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[label]))
        if rng.random() < noise:
            label = "neg" if label == "pos" else "pos"
        rows.append((" ".join(words), label))
    return rows


def write_recipe(base: Path) -> Path:
    """A keyword recipe of several short epochs: slow enough to be killed between two checkpoints."""
    import pandas as pd

    pd.DataFrame(keyword_rows(1500, seed=1), columns=["text", "label"]).to_csv(base / "train.csv", index=False)
    recipe = {
        "name": NAME,
        "data": {"train_path": str(base / "train.csv"), "labels": ["neg", "pos"]},
        "tokenizer": {"vocab_size": 200, "min_frequency": 1},
        "model": {"arch": "scratch", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.1},
        "train": {"epochs": EPOCHS, "batch_size": 8, "lr": 0.002, "seed": 3, "threads": 1, "patience": EPOCHS,
                  "device": "cpu"},
        "evaluate": {"min_score": 0.5},
    }
    path = base / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def environment(home: Path, api_url: str) -> dict[str, str]:
    """The child's environment: its own NIGHTSHIFT_HOME and embedded MLflow; the session's Prefect API.

    The test harness's Prefect server lives in pytest's process group, so killing the child leaves it
    up, and each child is spared starting an ephemeral server of its own.
    """
    drop = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "PREFECT_API_KEY", "PREFECT_API_AUTH_STRING")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(NIGHTSHIFT_HOME=str(home), PREFECT_API_URL=api_url, PYTHONUNBUFFERED="1")
    return env


def nightshift_run(recipe: Path, home: Path, api_url: str, summary: Path, log: Path) -> subprocess.Popen:
    with log.open("a") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "flows.cli", "run", "--config", str(recipe), "--summary-json", str(summary)],
            cwd=ROOT, env=environment(home, api_url), stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, killed as a whole
        )


def finish(proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, log.read_text()[-4000:]


def checkpoint_epoch(home: Path) -> int | None:
    """The epoch of the newest readable ``last.pt`` under ``home``, or None."""
    for path in (home / "checkpoints" / "train").glob("*/last.pt"):
        try:
            return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])
        except Exception:  # being replaced right now
            return None
    return None


def trained_stage(home: Path) -> Path | None:
    done = [p for p in (home / "artifacts" / "train").glob("*") if (p / MANIFEST).exists()]
    return done[0] if done else None


@pytest.fixture(scope="module")
def crash(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """An uninterrupted run in one home; in another, a run killed during training and its rerun."""
    from prefect.settings import PREFECT_API_URL

    base = tmp_path_factory.mktemp("resume")
    recipe = write_recipe(base)
    api_url = PREFECT_API_URL.value()
    reference_home, crash_home = base / "reference", base / "crashed"

    log = base / "reference.log"
    started = time.monotonic()
    finish(nightshift_run(recipe, reference_home, api_url, base / "reference.json", log), log)
    reference_seconds = time.monotonic() - started

    log = base / "killed.log"
    proc = nightshift_run(recipe, crash_home, api_url, base / "killed.json", log)
    killed_at = None
    try:
        deadline = time.monotonic() + 240
        while killed_at is None:
            assert proc.poll() is None, f"the run ended before it could be killed:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no checkpoint of epoch 1 after 240 s:\n{log.read_text()[-4000:]}"
            if any((crash_home / "checkpoints" / "train").glob("*/last.pt")):  # epoch 1 is done and saved
                os.killpg(proc.pid, signal.SIGKILL)
                killed_at = time.monotonic()
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    left = {"checkpoint_epoch": checkpoint_epoch(crash_home), "trained_stage": trained_stage(crash_home),
            "summary_written": (base / "killed.json").exists(), "returncode": proc.returncode}

    log = base / "rerun.log"
    finish(nightshift_run(recipe, crash_home, api_url, base / "rerun.json", log), log)
    return {"killed_at": killed_at, "left": left, "reference_seconds": reference_seconds, "recipe": recipe, "api_url": api_url,
            "reference": json.loads((base / "reference.json").read_text()),
            "rerun": json.loads((base / "rerun.json").read_text()),
            "reference_home": reference_home, "crash_home": crash_home, "rerun_log": (base / "rerun.log").read_text()}


@pytest.mark.slow
def test_the_kill_came_during_training(crash: dict) -> None:
    left = crash["left"]
    assert left["returncode"] == -signal.SIGKILL
    assert left["checkpoint_epoch"] is not None and 1 <= left["checkpoint_epoch"] < EPOCHS
    assert left["trained_stage"] is None, "training had finished before the kill"
    assert not left["summary_written"]


@pytest.mark.slow
def test_rerun_hits_prep_and_resumes_training(crash: dict) -> None:
    rerun = crash["rerun"]
    assert rerun["status"] == "completed"
    assert {stage: rerun["cache"][stage] for stage in PREP} == dict.fromkeys(PREP, "hit")
    assert rerun["cache"]["train"] == "miss"
    resumed = rerun["train"]["resumed_from_epoch"]
    assert resumed is not None and resumed == crash["left"]["checkpoint_epoch"] >= 1
    assert crash["reference"]["train"]["resumed_from_epoch"] is None
    assert not list((crash["crash_home"] / "checkpoints" / "train").glob("*/last.pt"))  # superseded by the model


@pytest.mark.slow
def test_resumed_run_ends_as_the_uninterrupted_one(crash: dict) -> None:
    rerun, reference = crash["rerun"], crash["reference"]
    assert rerun["metrics"]["test"] == reference["metrics"]["test"]  # exactly: CPU, one thread, seeded
    assert 0.6 < reference["metrics"]["test"]["accuracy"] < 1.0  # learnt, and not saturated by easy data
    assert rerun["train"]["best_epoch"] == reference["train"]["best_epoch"]
    assert rerun["train"]["steps"] == reference["train"]["steps"]
    history = [json.loads((trained_stage(home) / "history.json").read_text())
               for home in (crash["crash_home"], crash["reference_home"])]
    assert history[0] == history[1] and len(history[0]) == EPOCHS


@pytest.mark.slow
def test_summary_and_mlflow_say_it_resumed(crash: dict) -> None:
    import mlflow
    from mlflow.tracking import MlflowClient

    rerun = crash["rerun"]
    epoch = rerun["train"]["resumed_from_epoch"]
    mlflow.set_tracking_uri(rerun["mlflow"]["tracking_uri"])
    client = MlflowClient()
    train = client.get_run(rerun["mlflow"]["stage_runs"]["train"])
    assert train.data.tags["nightshift.resumed_from_epoch"] == str(epoch)
    assert f"resumed from epoch {epoch}" in train.data.tags["mlflow.note.content"]
    parent = rerun["mlflow"]["parent_run_id"]
    summary_md = Path(mlflow.artifacts.download_artifacts(run_id=parent, artifact_path="summary.md",
                                                          tracking_uri=rerun["mlflow"]["tracking_uri"]))
    assert f"resumed from epoch {epoch}" in summary_md.read_text()


@pytest.mark.slow
def test_sub_flow_entry_point_prints_a_short_summary(crash: dict) -> None:
    """``python -m flows.prepare_data`` (every stage a cache hit now): a few lines, and the quiet defaults."""
    env = environment(crash["crash_home"], crash["api_url"])
    for var in ("PREFECT_SERVER_ANALYTICS_ENABLED", "MLFLOW_DISABLE_TELEMETRY", "HF_HUB_OFFLINE",
                "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "TOKENIZERS_PARALLELISM"):
        env.pop(var, None)  # as a user's shell has them: unset
    done = subprocess.run([sys.executable, "-m", "flows.prepare_data", "--config", str(crash["recipe"])],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) <= 10, done.stdout
    assert lines[0] == "prepare-data:" and all(f"{stage} " in done.stdout for stage in PREP)
    assert done.stdout.count("cache hit") == len(PREP)
    assert "Traceback" not in done.stderr and "telemetry" not in done.stderr.lower(), done.stderr[-4000:]


# ---------------------------------------------------------------------------------------------- torn files


def _synthetic(n: int, seed: int):
    from tasks.text.loader import EncodedSplit

    rng = np.random.default_rng(seed)
    rows, labels = [], []
    for _ in range(n):
        row = rng.integers(6, 30, size=int(rng.integers(3, 13)))
        label = int(rng.integers(0, 2))
        if label:
            row[rng.integers(0, len(row))] = 5
        rows.append([2, *row.tolist(), 3])
        labels.append(label)
    return EncodedSplit.from_table(pa.table({"input_ids": pa.array(rows, pa.list_(pa.int32())),
                                             "label_id": pa.array(labels, pa.int32())}))


def _fit(checkpoint_dir: Path | None, on_epoch=None):
    from models.encoders import EncoderConfig
    from models.multitask import build_text_model
    from tasks.core.batching import predict_loader
    from tasks.core.config import TrainConfig
    from tasks.core.fit import fit_loader, score
    from tasks.text.loader import text_loader

    torch.manual_seed(0)
    model = build_text_model(EncoderConfig(d_model=32, n_layers=1, n_heads=2, d_ff=64, dropout=0.1),
                             {"label": ("sequence", 2)}, vocab_size=30, max_length=16)
    train, val = _synthetic(200, 0), _synthetic(60, 1)
    val_loader = text_loader(val, 64, model.pad_id, "label")
    cfg = TrainConfig(epochs=3, batch_size=32, lr=3e-3, seed=7, device="cpu", patience=5, threads=1)
    return fit_loader(model, text_loader(train, cfg.batch_size, model.pad_id, "label"),
                      lambda m, d: score(val.labels, predict_loader(m, val_loader, d, "label").argmax(1)),
                      cfg, "accuracy", checkpoint_dir, on_epoch=on_epoch, progress=False)


def test_truncated_checkpoint_is_detected_and_training_starts_over(tmp_path: Path, caplog) -> None:
    full = _fit(None)

    class Crash(Exception):
        pass

    def crash_at_two(epoch: int, metrics: dict) -> None:
        if epoch == 2:
            raise Crash

    with pytest.raises(Crash):
        _fit(tmp_path, on_epoch=crash_at_two)
    last = tmp_path / "last.pt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])  # torn: what a full disk or a partial copy leaves

    with caplog.at_level("WARNING", logger="tasks.core.fit"):
        again = _fit(tmp_path)
    assert again.resumed_from_epoch is None  # not taken as valid
    assert "unreadable checkpoint" in caplog.text
    assert again.history == full.history  # started over: exactly the uninterrupted run


def test_checkpoint_that_is_not_one_is_ignored(tmp_path: Path) -> None:
    from tasks.core.fit import read_checkpoint

    torch.save({"model": {}}, tmp_path / "last.pt")
    assert read_checkpoint(tmp_path / "last.pt") is None and not (tmp_path / "last.pt").exists()
    assert read_checkpoint(tmp_path / "missing.pt") is None


def test_torn_stage_directory_is_never_a_cache_hit(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path / "artifacts")
    key = stage_key("clean", {"rule": 1}, ["upstream"], "tasks.core.store")
    torn = store.path("clean", key.fingerprint)
    torn.mkdir(parents=True)
    (torn / "train.parquet").write_bytes(b"PAR1 half a file")  # files, but no manifest: never finished
    (torn.parent / f".tmp-{key.fingerprint[:12]}-deadbeef").mkdir()  # a writer killed mid-stage
    assert store.cached(key) is None

    with store.writer(key) as w:
        (w.path / "train.parquet").write_text("whole")
        w.write_manifest(rows={"train": 1})
    hit = store.cached(key)
    assert hit is not None and hit.cache_hit and (torn / "train.parquet").read_text() == "whole"
