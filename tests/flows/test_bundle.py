"""The released bundle on its own: trained by the real pipeline, loaded where Prefect and pydantic-settings
cannot be imported, and served by ``mlflow models serve``.

One pipeline run (module scope: ~25 s on two cores, plus the session's Prefect harness) trains a tiny
scratch classifier on a keyword task: every text is filler words plus one keyword that decides its
label, so a working model beats chance by far after two epochs, while a broken bundle (wrong
tokenizer, label map or cleaning rules) does not.

The pretrained (MiniLM) variant is not run here: 20 optimiser steps alone take ~2 minutes on two
CPU cores, far beyond this module's budget.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow

FILLER = ("the a movie film story plot actor scene show book day night city team game music song food place "
          "time people thing way world house car road river tree cloud window table").split()
KEYWORDS = {"pos": ("wonderful", "excellent"), "neg": ("terrible", "awful")}
NAME = "kw-bundle"


def keyword_texts(n: int, seed: int) -> list[tuple[str, str]]:
    """``n`` (text, label) rows, alternating labels: 5-9 filler words and one keyword of the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "pos" if i % 2 == 0 else "neg"
        words = rng.choices(FILLER, k=rng.randint(5, 9))
        words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[label]))
        rows.append((" ".join(words), label))
    return rows


def _unset_mlflow_uris(mp: pytest.MonkeyPatch) -> None:
    """As the ``home`` fixture does, plus the registry URI; undone at the end (MLflow exports both)."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):
        mp.setenv(var, "placeholder")
        mp.delenv(var)


@pytest.fixture(scope="module")
def released(prefect_harness, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """One pipeline run of the keyword recipe in a fresh NIGHTSHIFT_HOME (the ``home`` fixture, module-wide)."""
    from flows.pipeline import pipeline
    from tasks.registry import recipe_from_dict

    base = tmp_path_factory.mktemp("bundle")
    home = base / "home"
    train = keyword_texts(200, seed=1)
    pd.DataFrame(train, columns=["text", "label"]).to_csv(base / "train.csv", index=False)
    recipe = recipe_from_dict({
        "name": NAME,
        "data": {"train_path": str(base / "train.csv"), "labels": ["neg", "pos"]},
        "tokenizer": {"vocab_size": 200, "min_frequency": 1},
        "model": {"arch": "scratch", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0,
                  "pooling": "max"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.005, "seed": 3, "threads": 2},
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIGHTSHIFT_HOME", str(home))
        _unset_mlflow_uris(mp)
        mp.chdir(base)
        started = time.perf_counter()
        summary = pipeline(recipe)
        seconds = time.perf_counter() - started
        seen = {text for text, _ in train}
        held_out = [row for row in keyword_texts(80, seed=2024) if row[0] not in seen]
        yield SimpleNamespace(home=home, summary=summary, tracking_uri=summary["mlflow"]["tracking_uri"],
                              held_out=held_out, seconds=seconds)


@pytest.fixture(scope="module")
def offline(released: SimpleNamespace) -> pd.DataFrame:
    """The champion's predictions for the held-out texts, loaded in this (Prefect-importing) process."""
    mlflow.set_tracking_uri(released.tracking_uri)
    mlflow.set_registry_uri(released.tracking_uri)
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    return model.predict(pd.DataFrame({"text": [text for text, _ in released.held_out]}))


def _subprocess_env(released: SimpleNamespace) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_REGISTRY_URI", "NIGHTSHIFT_HOME")}
    env["MLFLOW_TRACKING_URI"] = released.tracking_uri
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # `mlflow` serves via uvicorn
    return env


LOAD_WITHOUT_PIPELINE = r"""
import sys
sys.modules["prefect"] = None             # any `import prefect` now raises ImportError
sys.modules["pydantic_settings"] = None
import json
import mlflow
import pandas as pd

uri, inputs, output = sys.argv[1:4]
texts = json.load(open(inputs))
out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"text": texts}))
ours = sorted(m for m, mod in sys.modules.items() if m.split(".")[0] in ("tasks", "models", "flows") and mod is not None)
json.dump({"label": out["label"].tolist(), "probabilities": [list(map(float, p)) for p in out["probabilities"]],
           "modules": ours, "predictor_file": sys.modules["tasks.text.predict"].__file__}, open(output, "w"))
"""


def test_pipeline_released_the_keyword_model(released: SimpleNamespace) -> None:
    s = released.summary
    assert s["status"] == "completed"
    assert s["decision"]["promoted"] is True and s["decision"]["champion_after"] == s["model"]["version"]
    assert s["metrics"]["test"]["accuracy"] >= 0.7  # 20 test rows, chance 0.5
    assert released.tracking_uri == f"sqlite:///{released.home.resolve() / 'mlflow.db'}"


def test_champion_loads_and_predicts_without_prefect_or_settings(
        released: SimpleNamespace, offline: pd.DataFrame, tmp_path: Path) -> None:
    texts = [text for text, _ in released.held_out]
    (tmp_path / "inputs.json").write_text(json.dumps(texts))
    (tmp_path / "load.py").write_text(LOAD_WITHOUT_PIPELINE)
    proc = subprocess.run(
        [sys.executable, str(tmp_path / "load.py"), f"models:/{NAME}@champion", str(tmp_path / "inputs.json"),
         str(tmp_path / "out.json")],
        cwd=tmp_path, env=_subprocess_env(released), capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    served = json.loads((tmp_path / "out.json").read_text())

    assert served["label"] == offline["label"].tolist()
    for got, want in zip(served["probabilities"], offline["probabilities"]):
        assert got == pytest.approx(list(want), abs=1e-6)
    truth = [label for _, label in released.held_out]
    accuracy = sum(g == t for g, t in zip(served["label"], truth)) / len(truth)
    assert len(truth) >= 60 and accuracy >= 0.75, f"held-out keyword accuracy {accuracy:.2f} (chance 0.5)"

    # the predictor ran from the bundle's own code copy, and pulled in nothing of the pipeline
    assert Path(served["predictor_file"]).resolve().is_relative_to(released.home.resolve()), served["predictor_file"]
    assert "tasks.text.predict" in served["modules"] and "models.multitask" in served["modules"]
    pipeline_only = [m for m in served["modules"]
                     if m in ("tasks.core.settings", "tasks.core.tracking", "tasks.stages", "tasks.registry",
                              "tasks.core.lineage") or m.startswith("flows")]
    assert not pipeline_only, pipeline_only


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0) -> int:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status


def test_mlflow_models_serve(released: SimpleNamespace, offline: pd.DataFrame, tmp_path: Path) -> None:
    port = _free_port()
    log_path = tmp_path / "serve.log"
    texts = [text for text, _ in released.held_out][:20]
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{NAME}@champion",
             "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=tmp_path, env=_subprocess_env(released), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, f"server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}"
            try:
                if _get(f"http://127.0.0.1:{port}/ping") == 200:
                    break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            assert time.monotonic() < deadline, f"no /ping after 60 s:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[t] for t in texts]}}).encode()
        request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            predictions = json.loads(response.read())["predictions"]
        assert [row["label"] for row in predictions] == offline["label"].tolist()[:20]
        assert [row["score"] for row in predictions] == pytest.approx(offline["score"].tolist()[:20], abs=1e-6)
    finally:
        _kill_group(proc)


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever is left of it (uvicorn's workers)."""
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 15)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=wait)
        except subprocess.TimeoutExpired:
            continue
