"""The HTTP side of ``nightshift serve``: FastAPI endpoints, request limits, bearer token, metrics, batching.

Endpoints:

- ``GET /health``: 200 ``{"status": "ok"}`` while the process lives (no token needed);
- ``GET /ready``: 200 ``{"model", "version", "alias", ...}`` once a model is loaded, 503 before
  (no token needed: it tells a load balancer, a compose healthcheck or the deploy stage's canary
  check which version answers, and nothing else);
- ``POST /predict``: ``{"texts": [...]}`` (images ``{"pixels": [[...], ...]}``, token models also
  ``{"tokens": [[...], ...]}``) -> ``{"model", "version", "alias", "predictions": [one object per input]}``,
  each object one row of the bundle's output frame (``label``, ``label_name``, ``score``,
  ``probabilities`` for a classifier; whatever columns the kind's predictor answers otherwise);
- ``POST /reload``: re-resolve the alias now and swap in a new version; answers the served version;
- ``GET /metrics``: Prometheus text.

Bad requests get 4xx with ``{"detail": "<one line naming the limit or the field>"}``: 413 for a body
over ``max_body_bytes`` (checked before parsing), 422 for malformed JSON, a wrong shape or type, an
empty list, too many inputs or too long a text. Inputs are checked in full before any model runs, so
a model error on checked input is a server fault (500), never a client's.

Concurrent predictions are micro-batched: requests queue, and each model call takes everything
queued (up to ``max_batch`` inputs), so under load one forward pass answers many requests and an
idle server adds no waiting. Model calls run in the event loop's thread by default (no thread
hand-off per batch, which on two busy cores costs more than the forward pass of a small model);
``inference_thread`` moves them to a thread of their own, which keeps /health and request parsing
responsive during long forward passes.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from tasks.core.jsonable import fast_dumps
from tasks.serving.config import INPUT_KEYS, ServeConfig
from tasks.serving.holder import LoadedModel, ModelHolder, predict_records

log = logging.getLogger("nightshift.serve")

ENDPOINTS = ("/health", "/ready", "/predict", "/reload", "/metrics")
OPEN_ENDPOINTS = ("/health", "/ready")
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
                   2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class BadRequest(Exception):
    """A request the server refuses: an HTTP status and a one-line reason."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app, so tests can build many)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("nightshift_serve_requests", "HTTP requests by endpoint and status code.",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram("nightshift_serve_request_seconds", "Request latency by endpoint (seconds).",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=r)
        self.batch = Histogram("nightshift_serve_batch_size", "Inputs per model call (micro-batched requests).",
                               buckets=BATCH_BUCKETS, registry=r)
        self.inputs = Counter("nightshift_serve_predicted_inputs", "Inputs predicted.", registry=r)
        self.version = Gauge("nightshift_serve_model_version", "Registered version being served.",
                             ["model", "alias"], registry=r)
        self.info = Gauge("nightshift_serve_model_info", "1 for the served (model, version, alias).",
                          ["model", "version", "alias"], registry=r)
        self.loads = Counter("nightshift_serve_model_loads", "Model version loads by result.", ["result"], registry=r)
        self.load_failing = Gauge("nightshift_serve_load_failing",
                                  "1 while the last attempt to load the wanted version failed.", registry=r)
        self.load_seconds = Gauge("nightshift_serve_load_seconds", "Download + load + warm time of the served version.",
                                  registry=r)

    def swapped(self, before: LoadedModel | None, after: LoadedModel) -> None:
        if before is not None:
            self.info.remove(before.name, before.version, before.alias or "")
            self.version.remove(before.name, before.alias or "")
        self.info.labels(after.name, after.version, after.alias or "").set(1)
        self.version.labels(after.name, after.alias or "").set(int(after.version))
        self.loads.labels("ok").inc()
        self.load_failing.set(0)
        self.load_seconds.set(after.load_seconds)

    def failed(self, error: str) -> None:
        self.loads.labels("failed").inc()
        self.load_failing.set(1)


# ------------------------------------------------------------------------------------------ validation


def read_limits(config: ServeConfig, payload: Any) -> tuple[str, list[Any]]:
    """(request key, inputs) of a parsed body, every input checked; BadRequest(422) naming the problem."""
    if not isinstance(payload, dict):
        raise BadRequest(422, f"the body must be a JSON object like {{\"texts\": [...]}}, got {_kind(payload)}")
    keys = [k for k in payload if k in INPUT_KEYS]
    unknown = [k for k in payload if k not in INPUT_KEYS]
    if unknown:
        raise BadRequest(422, f"unknown field {unknown[0]!r}: give one of {', '.join(INPUT_KEYS)}")
    if len(keys) != 1:
        raise BadRequest(422, f"give exactly one of {', '.join(INPUT_KEYS)}" + (f" (got {', '.join(keys)})" if keys else ""))
    key = keys[0]
    inputs = payload[key]
    if not isinstance(inputs, list):
        raise BadRequest(422, f"{key} must be a list, got {_kind(inputs)}")
    if not inputs:
        raise BadRequest(422, f"{key} is empty: give at least one input")
    if len(inputs) > config.max_inputs:
        raise BadRequest(422, f"{key}: {len(inputs)} inputs, more than the limit of {config.max_inputs} per request "
                              "(max_inputs)")
    check = {"texts": _check_text, "pixels": _check_pixels, "tokens": _check_tokens}[key]
    for index, value in enumerate(inputs):
        check(config, key, index, value)
    return key, inputs


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _check_text(config: ServeConfig, key: str, index: int, value: Any) -> None:
    if not isinstance(value, str):
        raise BadRequest(422, f"{key}[{index}] must be a string, got {_kind(value)}")
    if len(value) > config.max_chars:
        raise BadRequest(422, f"{key}[{index}]: {len(value)} characters, more than the limit of {config.max_chars} "
                              "(max_chars)")


def _check_pixels(config: ServeConfig, key: str, index: int, value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise BadRequest(422, f"{key}[{index}] must be a non-empty list of integers 0-255, got {_kind(value)}")
    for j, v in enumerate(value):
        # bool is an int in Python; a whole float (3.0) is accepted as JSON writers produce them
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not v.is_integer()):
            raise BadRequest(422, f"{key}[{index}][{j}] must be an integer 0-255, got {_kind(v)} {v!r}"[:200])
        if not 0 <= v <= 255:
            raise BadRequest(422, f"{key}[{index}][{j}] = {v!r} is outside 0-255")


def _check_tokens(config: ServeConfig, key: str, index: int, value: Any) -> None:
    if not isinstance(value, list) or not value:
        raise BadRequest(422, f"{key}[{index}] must be a non-empty list of strings, got {_kind(value)}")
    chars = 0
    for j, token in enumerate(value):
        if not isinstance(token, str):
            raise BadRequest(422, f"{key}[{index}][{j}] must be a string, got {_kind(token)}")
        chars += len(token)
    if chars > config.max_chars:
        raise BadRequest(422, f"{key}[{index}]: {chars} characters, more than the limit of {config.max_chars} "
                              "(max_chars)")


def column_for(model: LoadedModel, key: str) -> str:
    """The predictor column a request key feeds; BadRequest(422) when this model takes other inputs."""
    column = INPUT_KEYS[key]
    if column not in model.input_columns:
        wanted = [k for k, c in INPUT_KEYS.items() if c in model.input_columns]
        raise BadRequest(422, f"model {model.name} takes {' or '.join(wanted) or model.input_column}, not {key}")
    return column


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            if int(declared) > limit:
                raise BadRequest(413, f"body of {int(declared)} bytes, more than the limit of {limit} (max_body_bytes)")
        except ValueError:
            raise BadRequest(422, f"bad Content-Length header {declared!r}") from None
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:  # a chunked body has no Content-Length: count while reading
            raise BadRequest(413, f"body over {limit} bytes, the limit (max_body_bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    if not body.strip():
        raise BadRequest(422, "empty body: send JSON like {\"texts\": [\"...\"]}")
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc).splitlines()[0][:200]
        raise BadRequest(422, f"malformed JSON: {reason}") from None


# ------------------------------------------------------------------------------------------ micro-batching


@dataclass
class Pending:
    column: str
    inputs: list[Any]
    future: asyncio.Future


class MicroBatcher:
    """One queue of requests; each model call takes every request queued meanwhile, up to ``max_batch`` inputs.

    Model calls run in the event loop's thread (the default), or with ``inference_thread`` in one
    thread of their own; either way one call at a time, with ``threads`` torch threads.
    """

    def __init__(self, holder: ModelHolder, metrics: Metrics, max_batch: int, threads: int,
                 inference_thread: bool = False):
        self.holder, self.metrics, self.max_batch, self.threads = holder, metrics, max_batch, threads
        self.inference_thread = inference_thread
        self.queue: asyncio.Queue[Pending] | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        self.queue = asyncio.Queue()
        if self.inference_thread:
            self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nightshift-infer",
                                               initializer=_torch_threads, initargs=(self.threads,))
        else:
            _torch_threads(self.threads)
        self.task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)

    async def predict(self, column: str, inputs: list[Any]) -> tuple[LoadedModel, list[dict[str, Any]]]:
        assert self.queue is not None, "the batcher was not started"
        future: asyncio.Future = asyncio.get_running_loop().create_future()
        await self.queue.put(Pending(column, inputs, future))
        return await future

    async def _loop(self) -> None:
        assert self.queue is not None
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            await asyncio.sleep(0)  # let the requests already read and parsed join this batch
            size = len(batch[0].inputs)
            while size < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
                size += len(batch[-1].inputs)
            model = self.holder.current  # read once: the whole batch runs on one version
            try:
                if self.executor is None:
                    # in the loop's own thread: no hand-off between threads per batch; requests that arrive
                    # meanwhile wait in the socket buffers and are parsed, then batched, right after
                    results = self._run(model, batch)
                else:
                    results = await loop.run_in_executor(self.executor, self._run, model, batch)
            except Exception as exc:  # noqa: BLE001  (the executor itself failed: answer every waiter)
                results = [exc] * len(batch)
            for pending, result in zip(batch, results):
                if pending.future.done():  # the client went away
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result((model, result))

    def _run(self, model: LoadedModel | None, batch: list[Pending]) -> list[Any]:
        """One model call per input column (in the loop's or the inference thread), split back per request."""
        if model is None:
            return [BadRequest(503, "no model loaded yet")] * len(batch)
        out: list[Any] = [None] * len(batch)
        by_column: dict[str, list[int]] = {}
        for i, pending in enumerate(batch):
            by_column.setdefault(pending.column, []).append(i)
        for column, members in by_column.items():
            inputs = [x for i in members for x in batch[i].inputs]
            try:
                records = predict_records(model.predictor, column, inputs)
                self.metrics.batch.observe(len(inputs))
            except ValueError:
                # the predictor's own input check failed: run each request alone, so only the bad one fails
                for i in members:
                    out[i] = self._one(model, column, batch[i].inputs)
                continue
            start = 0
            for i in members:
                n = len(batch[i].inputs)
                out[i], start = records[start:start + n], start + n
        return out

    def _one(self, model: LoadedModel, column: str, inputs: list[Any]) -> Any:
        try:
            records = predict_records(model.predictor, column, inputs)
        except ValueError as exc:  # the predictor's own input check (e.g. the wrong number of pixels)
            return BadRequest(422, str(exc).splitlines()[0][:300] if str(exc) else "input rejected by the model")
        except Exception as exc:  # noqa: BLE001
            return exc
        self.metrics.batch.observe(len(inputs))
        return records


def _torch_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


# ------------------------------------------------------------------------------------------ the app


class Guard:
    """ASGI middleware: the bearer token, and request counts and latency by endpoint and status."""

    def __init__(self, app: Any, config: ServeConfig, metrics: Metrics):
        self.app, self.metrics = app, metrics
        token = config.token.get_secret_value() if config.token is not None else None
        self.expected = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in ENDPOINTS else "other"
        started = time.perf_counter()
        status = [500]

        async def send_and_see(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            if self.expected is not None and path not in OPEN_ENDPOINTS and not self._authorized(scope):
                response = JSONResponse({"detail": "missing or wrong bearer token (Authorization: Bearer <token>)"},
                                        status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send_and_see)
            else:
                await self.app(scope, receive, send_and_see)
        finally:
            self.metrics.requests.labels(endpoint, str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    def _authorized(self, scope: dict) -> bool:
        for name, value in scope.get("headers", ()):
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected)
        return False


def _ready_body(holder: ModelHolder) -> dict[str, Any]:
    model = holder.current
    return {"model": holder.name, "version": model.version if model else None,
            "alias": model.alias if model else holder.alias if holder.version is None else None,
            "ready": model is not None, "loaded_at": model.loaded_at if model else None,
            "load_error": holder.last_error}


def create_app(config: ServeConfig, holder: ModelHolder, follow: bool = True) -> Guard:
    """The server app for ``holder``; starting it (lifespan) starts the batcher and, with ``follow``, the poller."""
    metrics = Metrics()
    holder.on_change = metrics.swapped
    holder.on_failure = metrics.failed
    batcher = MicroBatcher(holder, metrics, config.max_batch, config.threads, config.inference_thread)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        if follow:
            holder.start()
        try:
            yield
        finally:
            holder.stop()
            await batcher.stop()

    app = FastAPI(title="nightshift serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.holder, app.state.metrics, app.state.batcher = holder, metrics, batcher

    @app.exception_handler(BadRequest)
    async def _bad_request(request: Request, exc: BadRequest) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _server_fault(request: Request, exc: Exception) -> JSONResponse:
        log.exception("nightshift serve: %s %s failed", request.method, request.url.path)
        return JSONResponse({"detail": f"server error: {type(exc).__name__}: {exc}".splitlines()[0][:300]},
                            status_code=500)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        body = _ready_body(holder)
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.post("/predict")
    async def predict(request: Request) -> Response:
        payload = parse_json(await read_body(request, config.max_body_bytes))
        key, inputs = read_limits(config, payload)
        model = holder.current
        if model is None:
            raise BadRequest(503, "no model loaded yet: see GET /ready")
        served, records = await batcher.predict(column_for(model, key), inputs)
        metrics.inputs.inc(len(inputs))
        body = {"model": served.name, "version": served.version, "alias": served.alias, "predictions": records}
        # strict JSON: a NaN score is null, never the invalid token NaN nor a 500
        return Response(fast_dumps(body), media_type="application/json")

    @app.post("/reload")
    async def reload() -> JSONResponse:
        before = holder.current.version if holder.current else None
        outcome = await run_in_threadpool(holder.reload)
        body = {**_ready_body(holder), "previous_version": before, "changed": outcome.changed,
                "error": outcome.error}
        return JSONResponse(body, status_code=200 if outcome.version is not None else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Guard(app, config, metrics)

