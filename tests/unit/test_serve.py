"""``nightshift serve`` in-process: real tiny bundles (a scratch text classifier, an image classifier) behind
FastAPI's TestClient, and a real uvicorn on a free port for concurrent load.

- predictions equal the bundle's own offline ``predict``, for texts and for pixels;
- every bad request class gets its 4xx with a message naming the limit or the field, and the server
  keeps answering afterwards;
- the bearer token is enforced everywhere but /health and /ready; /metrics carries the counters;
- the settings load in order (file < environment < flags) and refuse bad values by name;
- (slow) against a real SQLite registry: the alias moves while threads hammer /predict and /reload
  is called: no request fails, and afterwards every answer comes from the new version with its
  predictions; a version that cannot load keeps the old one serving; a dead process's partial
  download is swept and never served.
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import SecretStr

from models.multitask import build_text_model
from tasks.core import packaging
from tasks.serving.app import create_app
from tasks.serving.config import ServeConfig, ServeConfigError, load_serve_config
from tasks.serving.holder import LoadedModel, ModelCache, ModelHolder, load_version

FILLER = "the a movie film story plot actor scene show book day night city team game music song food".split()
KEYWORDS = {"pos": ("wonderful", "excellent"), "neg": ("terrible", "awful")}
LABELS = ["neg", "pos"]


def keyword_texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.choices(FILLER, k=rng.randint(4, 8))
        words.insert(rng.randrange(len(words) + 1), rng.choice(KEYWORDS[LABELS[i % 2]]))
        out.append(" ".join(words))
    return out


def tiny_text_bundle(path: Path, seed: int) -> Path:
    """A real text bundle (trained tokenizer, scratch encoder with seeded random weights, serving rules)."""
    from tasks.text.config import CleanConfig, TokenizerConfig
    from tasks.text.encode import train_tokenizer

    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(keyword_texts(200, seed=1), TokenizerConfig(vocab_size=120, min_frequency=1,
                                                                             max_length=32))
    tokenizer.save(str(path / "tokenizer.json"))
    from models.encoders import EncoderConfig

    torch.manual_seed(seed)
    cfg = EncoderConfig(arch="scratch", d_model=16, n_layers=1, n_heads=2, d_ff=32, dropout=0.0, pooling="mean")
    model = build_text_model(cfg, {"label": ("sequence", 2)}, vocab_size=tokenizer.get_vocab_size(), max_length=32,
                             pad_id=0)
    torch.save(model.checkpoint(labels=LABELS), path / "model.pt")
    (path / "labels.json").write_text(json.dumps(LABELS))
    (path / "serving.json").write_text(json.dumps({"clean": CleanConfig().model_dump(mode="json"), "label_names": {},
                                                   "head": "label", "max_length": 32}))
    (path / "bundle.json").write_text(json.dumps({"task": "text-classification",
                                                  "predictor": "tasks.text.predict:TextPredictor", "recipe": "tiny"}))
    return path


def tiny_image_bundle(path: Path) -> Path:
    from models.vision import ImageModelConfig
    from tasks.vision.train import build_model

    path.mkdir(parents=True, exist_ok=True)
    labels = [str(d) for d in range(10)]
    norm = {"mean": 0.1307, "std": 0.3081, "scale": 255.0, "image_shape": [28, 28]}
    model = build_model(ImageModelConfig(kind="variant", hidden=[16]), (28, 28), 10, seed=0).eval()
    torch.save(model.checkpoint(labels=labels, normalization=norm), path / "model.pt")
    (path / "labels.json").write_text(json.dumps(labels))
    (path / "normalization.json").write_text(json.dumps(norm))
    (path / "bundle.json").write_text(json.dumps({"task": "image-classification",
                                                  "predictor": "tasks.vision.predict:ImagePredictor"}))
    return path


def loaded(bundle: Path, version: str = "1", name: str = "tiny") -> LoadedModel:
    predictor = packaging.load_predictor(bundle)
    return LoadedModel(name=name, version=version, alias="champion", predictor=predictor,
                       input_column=predictor.input_column, input_columns=(predictor.input_column,),
                       loaded_at=time.time(), load_seconds=0.0)


def holder_serving(model: LoadedModel | None, tmp_path: Path) -> ModelHolder:
    """A holder already serving ``model`` (no registry: the app is built with follow=False)."""
    return ModelHolder(name=model.name if model else "tiny", alias="champion", version=None,
                       cache=ModelCache(tmp_path / "cache"), poll_seconds=60, current=model)


def client_for(model: LoadedModel | None, tmp_path: Path, **settings: Any) -> TestClient:
    config = ServeConfig(model="tiny", **settings)
    holder = holder_serving(model, tmp_path)
    app = create_app(config, holder, follow=False)
    if model is not None:
        app.metrics.swapped(None, model)
    return TestClient(app)


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_text_bundle(tmp_path_factory.mktemp("serve") / "bundle-1", seed=1)


@pytest.fixture
def client(text_bundle: Path, tmp_path: Path):
    with client_for(loaded(text_bundle), tmp_path, max_inputs=8, max_chars=200, max_body_bytes=4096) as c:
        yield c


def offline(bundle: Path, texts: list[str]) -> pd.DataFrame:
    return packaging.load_predictor(bundle).predict(pd.DataFrame({"text": texts}))


# ------------------------------------------------------------------------------------------ happy path


def test_predict_equals_the_bundles_offline_predictions(client: TestClient, text_bundle: Path) -> None:
    texts = keyword_texts(6, seed=7) + [""]
    r = client.post("/predict", json={"texts": texts})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["alias"]) == ("tiny", "1", "champion")
    expected = offline(text_bundle, texts)
    got = pd.DataFrame(body["predictions"])
    assert list(got.columns) == list(expected.columns) == ["label", "label_name", "score", "probabilities"]
    assert got["label"].tolist() == expected["label"].tolist()
    assert np.allclose(np.array(got["probabilities"].tolist()), np.array(expected["probabilities"].tolist()), atol=1e-6)
    assert np.allclose(got["score"], expected["score"], atol=1e-6)


def test_health_and_ready(client: TestClient, text_bundle: Path, tmp_path: Path) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    ready = client.get("/ready")
    assert ready.status_code == 200
    assert {k: ready.json()[k] for k in ("model", "version", "alias")} == {"model": "tiny", "version": "1",
                                                                          "alias": "champion"}
    with client_for(None, tmp_path) as empty:
        assert empty.get("/health").status_code == 200
        assert empty.get("/ready").status_code == 503
        r = empty.post("/predict", json={"texts": ["x"]})
        assert r.status_code == 503 and "no model loaded" in r.json()["detail"]


def test_image_model_takes_pixels_and_its_own_checks_give_422(tmp_path: Path) -> None:
    bundle = tiny_image_bundle(tmp_path / "img")
    pixels = np.random.default_rng(0).integers(0, 256, (3, 784)).tolist()
    with client_for(loaded(bundle), tmp_path, max_body_bytes=100_000) as c:
        r = c.post("/predict", json={"pixels": pixels})
        assert r.status_code == 200, r.text
        expected = packaging.load_predictor(bundle).predict(pd.DataFrame({"pixels": pixels}))
        assert [p["label"] for p in r.json()["predictions"]] == expected["label"].tolist()
        bad = {"pixels": [[0] * 783]}
        assert c.post("/predict", json=bad).status_code == 422
        assert "783 values, expected 784" in c.post("/predict", json=bad).json()["detail"]
        assert "outside 0-255" in c.post("/predict", json={"pixels": [[0] * 783 + [256]]}).json()["detail"]
        assert "integer 0-255" in c.post("/predict", json={"pixels": [[True] * 784]}).json()["detail"]
        assert "takes pixels, not texts" in c.post("/predict", json={"texts": ["seven"]}).json()["detail"]
        assert c.post("/predict", json={"pixels": pixels[:1]}).status_code == 200


# ------------------------------------------------------------------------------------------ bad requests


BAD_REQUESTS = [  # (name, raw body, status, words the message must contain)
    ("malformed JSON", b'{"texts": ["unterminated', 422, "malformed JSON"),
    ("not UTF-8", b'{"texts": ["\xff\xfe"]}', 422, "malformed JSON"),
    ("empty body", b"", 422, "empty body"),
    ("nested too deeply", b"[" * 3000 + b"]" * 3000, 413, "max_body_bytes"),
    ("deep but small", b'{"texts": ' + b"[" * 1500 + b"]" * 1500 + b"}", 422, "malformed JSON"),
    ("a list, not an object", b'["a", "b"]', 422, "JSON object"),
    ("texts not a list", b'{"texts": "one text"}', 422, "texts must be a list"),
    ("empty list", b'{"texts": []}', 422, "texts is empty"),
    ("a number in texts", b'{"texts": ["ok", 3]}', 422, "texts[1] must be a string, got a number"),
    ("null in texts", b'{"texts": [null]}', 422, "texts[0] must be a string, got null"),
    ("unknown field", b'{"text": ["a"]}', 422, "unknown field 'text'"),
    ("two inputs", b'{"texts": ["a"], "pixels": [[1]]}', 422, "exactly one of"),
    ("no inputs", b"{}", 422, "exactly one of"),
    ("too many texts", json.dumps({"texts": ["a"] * 9}).encode(), 422, "limit of 8 per request (max_inputs)"),
    ("text too long", json.dumps({"texts": ["x" * 201]}).encode(), 422, "limit of 200 (max_chars)"),
    ("body too big", json.dumps({"texts": ["x" * 5000]}).encode(), 413, "limit of 4096 (max_body_bytes)"),
    ("tokens on a text model", b'{"tokens": [["a", "b"]]}', 422, "takes texts, not tokens"),
    ("tokens of wrong type", b'{"tokens": [["a", 1]]}', 422, "tokens[0][1] must be a string"),
]


@pytest.mark.parametrize(("name", "body", "status", "words"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_bad_requests_get_4xx_naming_the_problem_and_the_server_stays_up(
        client: TestClient, name: str, body: bytes, status: int, words: str) -> None:
    r = client.post("/predict", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == status, (name, r.status_code, r.text)
    assert words in r.json()["detail"], r.json()
    assert client.get("/health").status_code == 200
    assert client.post("/predict", json={"texts": ["a wonderful film"]}).status_code == 200


def test_a_chunked_body_over_the_limit_is_cut_off_with_413(client: TestClient) -> None:
    def chunks():
        yield b'{"texts": ["'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"]}'

    r = client.post("/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
    assert client.post("/predict", json={"texts": ["still up"]}).status_code == 200


def test_a_one_megabyte_text_is_refused_under_default_and_raised_body_limits(text_bundle: Path, tmp_path: Path) -> None:
    huge = {"texts": ["word " * 200_000]}  # 1 MB of text
    with client_for(loaded(text_bundle), tmp_path) as c:  # the defaults
        r = c.post("/predict", json=huge)
        assert r.status_code == 413 and "max_body_bytes" in r.json()["detail"]
        assert c.post("/predict", json={"texts": ["fine"]}).status_code == 200
    with client_for(loaded(text_bundle), tmp_path, max_body_bytes=5_000_000) as c:
        r = c.post("/predict", json=huge)
        assert r.status_code == 422 and "(max_chars)" in r.json()["detail"]


def test_wrong_method_and_unknown_path_are_4xx(client: TestClient) -> None:
    assert client.get("/predict").status_code == 405
    assert client.get("/nothing-here").status_code == 404


# ------------------------------------------------------------------------------------------ token, metrics


def test_bearer_token_is_required_except_on_health_and_ready(text_bundle: Path, tmp_path: Path) -> None:
    with client_for(loaded(text_bundle), tmp_path, token=SecretStr("s3cret-token")) as c:
        assert c.get("/health").status_code == 200
        assert c.get("/ready").status_code == 200
        for method, path in (("POST", "/predict"), ("POST", "/reload"), ("GET", "/metrics")):
            assert c.request(method, path, json={"texts": ["a"]}).status_code == 401
            wrong = c.request(method, path, json={"texts": ["a"]}, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401 and wrong.headers["WWW-Authenticate"] == "Bearer"
        ok = c.post("/predict", json={"texts": ["a"]}, headers={"Authorization": "Bearer s3cret-token"})
        assert ok.status_code == 200
        assert c.get("/metrics", headers={"Authorization": "Bearer s3cret-token"}).status_code == 200


def test_metrics_count_requests_by_status_latency_batches_and_version(client: TestClient) -> None:
    client.post("/predict", json={"texts": ["a", "b", "c"]})
    client.post("/predict", json={"texts": []})
    text = client.get("/metrics").text
    assert 'nightshift_serve_requests_total{endpoint="/predict",status="200"} 1.0' in text
    assert 'nightshift_serve_requests_total{endpoint="/predict",status="422"} 1.0' in text
    assert 'nightshift_serve_request_seconds_bucket{endpoint="/predict",le="+Inf"} 2.0' in text
    assert "nightshift_serve_batch_size_count 1.0" in text and "nightshift_serve_batch_size_sum 3.0" in text
    assert 'nightshift_serve_model_info{alias="champion",model="tiny",version="1"} 1.0' in text
    assert 'nightshift_serve_model_version{alias="champion",model="tiny"} 1.0' in text


# ------------------------------------------------------------------------------------------ settings


def test_settings_file_then_environment_then_flags(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "serve.yaml"
    path.write_text("serve:\n  port: 9000\n  max_inputs: 10\n  poll_seconds: 5\n")
    monkeypatch.setenv("NIGHTSHIFT_SERVE_MAX_INPUTS", "20")
    monkeypatch.setenv("NIGHTSHIFT_SERVE_TOKEN", "t0ken")
    config = load_serve_config({"model": "sst2", "poll_seconds": 2.5, "port": None}, path)
    assert (config.port, config.max_inputs, config.poll_seconds) == (9000, 20, 2.5)
    assert config.host == "127.0.0.1" and config.token.get_secret_value() == "t0ken"
    monkeypatch.setenv("NIGHTSHIFT_SERVE_TOKEN", "")
    assert load_serve_config({"model": "sst2"}).token is None


@pytest.mark.parametrize(("flags", "text", "match"), [
    ({"model": "m", "port": 70000}, None, r"serve\.port: .*65535"),
    ({"model": "m", "threads": 0}, None, r"serve\.threads"),
    ({}, None, r"serve\.model: Field required"),
    ({"model": "m"}, "serve:\n  max_input: 3\n", r"serve\.max_input: Extra inputs are not permitted"),
    ({"model": "m"}, "serve:\n  token: abc\n", r"NIGHTSHIFT_SERVE_TOKEN"),
    ({"model": "m"}, "serve: [1, 2]\n", r"must be a mapping"),
])
def test_bad_settings_are_named(tmp_path: Path, flags: dict, text: str | None, match: str) -> None:
    path = None
    if text is not None:
        path = tmp_path / "serve.yaml"
        path.write_text(text)
    with pytest.raises(ServeConfigError, match=match):
        load_serve_config(flags, path)


def test_command_line_pins_a_version_or_follows_an_alias() -> None:
    from tasks.serve import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(["--model", "sst2", "--version", "3", "--port", "8099"]))
    assert (config.version, config.port, config.host) == (3, 8099, "127.0.0.1")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--model", "sst2", "--version", "3", "--alias", "challenger"])


# ------------------------------------------------------------------------------------------ registry (slow)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class InProcessServer:
    """A real uvicorn serving ``app`` on a free loopback port, in a thread of this process."""

    def __init__(self, app: Any):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> InProcessServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def request(self, method: str, path: str, body: dict | None = None, timeout: float = 30) -> tuple[int, Any]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            conn.request(method, path, json.dumps(body) if body is not None else None,
                         {"Content-Type": "application/json"})
            response = conn.getresponse()
            raw = response.read()
            if response.getheader("Content-Type", "").startswith("application/json"):
                return response.status, json.loads(raw)
            return response.status, raw.decode()
        finally:
            conn.close()


def make_registry(base: Path) -> dict[str, Path]:
    """In the configured MLflow store: ``tiny`` versions 1 and 2 (different weights) and a broken version 3
    (its bundle names a predictor class that does not exist). Returns the bundles of 1 and 2."""
    from tasks.core import tracking

    experiment = tracking.ensure_experiment("tiny")
    bundles = {"1": tiny_text_bundle(base / "b1", seed=1), "2": tiny_text_bundle(base / "b2", seed=2)}
    broken = base / "b3"
    shutil.copytree(bundles["1"], broken)
    (broken / "bundle.json").write_text(json.dumps({"task": "text-classification",
                                                    "predictor": "tasks.text.predict:NoSuchPredictor"}))
    for version, bundle in (*bundles.items(), ("3", broken)):
        run = tracking.start_run(experiment, f"v{version}")
        uri = packaging.log_model(run, bundle, "text", keyword_texts(3, seed=0), LABELS, "text-classification")
        assert tracking.register_version(uri, "tiny", run, {}) == version
        tracking.end_run(run)
    return bundles


@contextmanager
def registry_home(base: Path):
    """A NIGHTSHIFT_HOME under ``base`` with the embedded store configured and :func:`make_registry` run."""
    from tasks.core import tracking

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIGHTSHIFT_HOME", str(base / "home"))
        for var in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI"):  # MLflow exports them: undone at the end
            mp.setenv(var, "placeholder")
            mp.delenv(var)
        mp.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mp.chdir(base)
        tracking.configure()
        yield make_registry(base)


@pytest.fixture(scope="module")
def registry_versions(tmp_path_factory: pytest.TempPathFactory):
    """:func:`registry_home` for the module."""
    with registry_home(tmp_path_factory.mktemp("serve-registry")) as bundles:
        yield bundles


@pytest.fixture
def registry(registry_versions: dict[str, Path]) -> dict[str, Path]:
    """The module's registry with champion -> 1 again."""
    from tasks.core import tracking

    tracking.configure()
    tracking.set_alias("tiny", "champion", "1")
    return registry_versions


def _hammer(server: InProcessServer, texts: list[str], stop: threading.Event, seen: list, errors: list) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    body = json.dumps({"texts": texts})
    while not stop.is_set():
        try:
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            payload = response.read()
            if response.status != 200:
                errors.append((response.status, payload[:200]))
            else:
                seen.append(json.loads(payload))
        except Exception as exc:  # noqa: BLE001  (a dropped connection is a failed request too)
            errors.append(repr(exc))
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)


@pytest.mark.slow
def test_alias_switch_under_concurrent_load_fails_no_request(registry: dict[str, Path], tmp_path: Path) -> None:
    from tasks.core import tracking

    texts = keyword_texts(3, seed=11)
    expected = {v: offline(b, texts)["probabilities"].tolist() for v, b in registry.items()}
    assert not np.allclose(expected["1"], expected["2"])  # the versions are told apart by their answers
    config = ServeConfig(model="tiny", poll_seconds=0.3)
    holder = ModelHolder(name="tiny", alias="champion", version=None, cache=ModelCache(tmp_path / "serving"),
                         poll_seconds=config.poll_seconds)
    with InProcessServer(create_app(config, holder)) as server:
        deadline = time.monotonic() + 30
        while server.request("GET", "/ready")[0] != 200:
            assert time.monotonic() < deadline, "never ready"
            time.sleep(0.1)
        stop, seen, errors = threading.Event(), [], []
        workers = [threading.Thread(target=_hammer, args=(server, texts[: 1 + i % 3], stop, seen, errors))
                   for i in range(4)]
        for w in workers:
            w.start()
        time.sleep(0.5)
        tracking.set_alias("tiny", "champion", "2")
        status, body = server.request("POST", "/reload")  # waits for a load the poller may have begun already
        assert status == 200 and body["version"] == "2"
        assert server.request("POST", "/reload")[1]["changed"] is False
        time.sleep(0.5)
        # the poller alone follows a move too (no /reload): back to 1, then forward to 2 again
        tracking.set_alias("tiny", "champion", "1")
        deadline = time.monotonic() + 20
        while server.request("GET", "/ready")[1]["version"] != "1":
            assert time.monotonic() < deadline, "the poller did not follow the alias"
            time.sleep(0.05)
        tracking.set_alias("tiny", "champion", "2")
        server.request("POST", "/reload")
        marker = len(seen)
        time.sleep(0.5)
        stop.set()
        for w in workers:
            w.join(timeout=30)
        assert errors == []
        versions = {answer["version"] for answer in seen}
        assert versions == {"1", "2"}, versions
        for answer in seen:  # every answer is whole: the version it names is the one that computed it
            n = len(answer["predictions"])
            assert np.allclose([p["probabilities"] for p in answer["predictions"]], expected[answer["version"]][:n],
                               atol=1e-5)
        assert seen[marker:] and all(answer["version"] == "2" for answer in seen[marker + 4:])
        status, text = server.request("GET", "/metrics")
        assert status == 200 and 'nightshift_serve_model_version{alias="champion",model="tiny"} 2.0' in text
        assert 'nightshift_serve_model_loads_total{result="ok"} 4.0' in text  # 1, 2, 1, 2


@pytest.mark.slow
def test_a_version_that_cannot_load_keeps_the_old_one_serving(registry: dict[str, Path], tmp_path: Path) -> None:
    from tasks.core import tracking

    config = ServeConfig(model="tiny", poll_seconds=60)
    holder = ModelHolder(name="tiny", alias="champion", version=None, cache=ModelCache(tmp_path / "serving"),
                         poll_seconds=config.poll_seconds)
    app = create_app(config, holder)
    with TestClient(app) as c:
        deadline = time.monotonic() + 30
        while c.get("/ready").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        tracking.set_alias("tiny", "champion", "3")
        r = c.post("/reload")
        assert r.status_code == 200 and r.json()["version"] == "1" and not r.json()["changed"]
        assert "NoSuchPredictor" in r.json()["error"]
        ready = c.get("/ready").json()
        assert ready["version"] == "1" and "NoSuchPredictor" in ready["load_error"]
        assert c.post("/predict", json={"texts": ["a wonderful film"]}).json()["version"] == "1"
        text = c.get("/metrics").text
        assert "nightshift_serve_load_failing 1.0" in text
        assert 'nightshift_serve_model_loads_total{result="failed"} 1.0' in text
        tracking.set_alias("tiny", "champion", "2")
        r = c.post("/reload").json()
        assert (r["version"], r["changed"], r["previous_version"], r["error"]) == ("2", True, "1", None)
        assert "nightshift_serve_load_failing 0.0" in c.get("/metrics").text
        assert c.get("/ready").json()["load_error"] is None


@pytest.mark.slow
def test_partial_downloads_of_dead_processes_are_swept_and_never_served(registry: dict[str, Path], tmp_path: Path) -> None:
    cache = ModelCache(tmp_path / "serving")
    folder = cache.path("tiny", "2").parent
    folder.mkdir(parents=True)
    dead = folder / ".partial-2-999999-x"  # pid 999999: no such process
    (dead / "model").mkdir(parents=True)
    (dead / "model" / "half-written").write_text("")
    model = load_version(cache, "tiny", "2", "champion")
    assert not dead.exists() and (cache.path("tiny", "2") / "MLmodel").exists()
    assert list(folder.glob(".partial-*")) == []
    texts = keyword_texts(2, seed=5)
    got = model.predictor.predict(pd.DataFrame({"text": texts}))["probabilities"].tolist()
    assert np.allclose(got, offline(registry["2"], texts)["probabilities"].tolist(), atol=1e-6)
    # pinned: a holder with a version never asks for the alias
    pinned = ModelHolder(name="tiny", alias=None, version="2", cache=cache, poll_seconds=60)
    assert pinned.reload().version == "2" and pinned.current.alias is None


def test_nightshift_serve_hands_its_arguments_to_tasks_serve(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "nightshift serve" in out and "--poll-seconds" in out and "--version" in out


def test_a_tagger_also_takes_pre_split_tokens() -> None:
    from types import SimpleNamespace

    from tasks.serving.holder import input_columns

    assert input_columns(SimpleNamespace(input_column="text"), "token-classification") == ("text", "tokens")
    assert input_columns(SimpleNamespace(input_column="text"), "text-classification") == ("text",)
    assert input_columns(SimpleNamespace(input_column="pixels", input_columns=("pixels",)), None) == ("pixels",)


class NanModel:
    """A stand-in predictor that answers a NaN score (numpy and Python) and numpy entity records."""

    input_column = "text"

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        n = len(frame)
        return pd.DataFrame({"label": ["x"] * n, "score": [float("nan")] * n,
                             "probabilities": [np.array([np.nan, 1.0], dtype=np.float32)] * n,
                             "entities": [[{"text": "Ada", "score": np.float32(np.inf)}] if i % 2 else []
                                          for i in range(n)]})


def test_a_nan_score_is_null_in_strict_json_not_a_500(tmp_path: Path) -> None:
    model = LoadedModel(name="tiny", version="1", alias="champion", predictor=NanModel(), input_column="text",
                        input_columns=("text",), loaded_at=time.time(), load_seconds=0.0)
    with client_for(model, tmp_path) as c:
        response = c.post("/predict", json={"texts": ["a", "b"]})
        assert response.status_code == 200, response.text
        assert "NaN" not in response.text and "Infinity" not in response.text
        body = json.loads(response.text, parse_constant=lambda name: pytest.fail(f"invalid JSON constant {name}"))
        assert [p["score"] for p in body["predictions"]] == [None, None]
        assert body["predictions"][0]["probabilities"] == [None, 1.0]
        assert body["predictions"][0]["entities"] == [] and body["predictions"][1]["entities"][0]["score"] is None
