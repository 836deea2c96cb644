"""Alert messages and their delivery to a loopback webhook (http.server in a thread)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from tasks import alerts
from tasks.core.store import DataError, StageError


class Listener:
    """A loopback webhook that keeps every JSON body it receives and answers ``status``."""

    def __init__(self, status: int = 200):
        self.received: list[dict[str, Any]] = []
        self.status = status
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802  (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                owner.received.append(json.loads(body))
                self.send_response(owner.status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Listener:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def listener() -> Iterator[Listener]:
    with Listener() as hook:
        yield hook


SUMMARY = {
    "recipe": "sst2", "model": {"name": "sst2", "version": "4", "uri": "models:/sst2/4"},
    "decision": {"promoted": True, "reason": "accuracy 0.8200 ≥ min_score 0.6 and within 0.01 of champion v3 (0.8000)",
                 "champion_before": "3", "champion_after": "4"},
    "metrics": {"test": {"accuracy": 0.82, "macro_f1": 0.81}},
    "mlflow": {"parent_run_id": "abc"},
}
LINKS = {"mlflow_run": "http://127.0.0.1:5000/#/experiments/1/runs/abc",
         "prefect_flow_run": "http://127.0.0.1:4200/runs/flow-run/f-1"}


def test_metric_diff_flat_and_per_task() -> None:
    assert alerts.metric_diff({"accuracy": 0.82}, {"accuracy": 0.80}) == {
        "accuracy": {"challenger": 0.82, "champion": 0.8, "diff": 0.02}}
    assert alerts.metric_diff({"accuracy": 0.82}, None)["accuracy"]["diff"] is None  # no champion yet
    nested = alerts.metric_diff({"sentiment": {"accuracy": 0.9}, "ner": {"f1": 0.5}},
                                {"sentiment": {"accuracy": 0.85}, "ner": {"f1": 0.6}})
    assert nested["sentiment"]["accuracy"]["diff"] == pytest.approx(0.05)
    assert nested["ner"]["f1"]["diff"] == pytest.approx(-0.1)
    assert alerts.champion_metrics({"champion_test_accuracy": 0.8, "test_accuracy": 0.9,
                                    "champion_test_ner.f1": 0.6}) == {"accuracy": 0.8, "ner": {"f1": 0.6}}


def test_completed_alert_reaches_the_webhook_with_the_news(listener: Listener) -> None:
    validation = {"rows_in": 100, "rows_rejected": 3, "rejected_by_reason": {"duplicate": 2, "empty text": 1}}
    message = alerts.completed_message(SUMMARY, validation, {"accuracy": 0.80, "macro_f1": 0.83}, LINKS)
    assert alerts.send(listener.url, message) is True
    (got,) = listener.received
    assert got["event"] == "nightshift.run.completed" and got["decision"]["promoted"] is True
    assert got["metrics"]["accuracy"] == {"challenger": 0.82, "champion": 0.8, "diff": 0.02}
    assert got["metrics"]["macro_f1"]["diff"] == pytest.approx(-0.02)
    assert got["validation"]["rejected_by_reason"] == {"duplicate": 2, "empty text": 1}
    assert got["links"] == LINKS
    assert LINKS["mlflow_run"] in got["text"] and LINKS["prefect_flow_run"] in got["text"]
    assert "+0.0200 vs champion" in got["text"]


def test_failed_alert_names_the_stage_and_the_one_line_error(listener: Listener) -> None:
    try:
        try:
            raise ValueError("shape mismatch\nat line 2")
        except ValueError as inner:
            raise StageError("train", f"ValueError: {inner}") from inner
    except StageError as exc:
        error = exc
    message = alerts.failed_message("sst2", "sst2", error, LINKS)
    assert alerts.send(listener.url, message)
    (got,) = listener.received
    assert (got["event"], got["failed_stage"]) == ("nightshift.run.failed", "train")
    assert got["error"] == "train: ValueError: shape mismatch at line 2" and "\n" not in got["error"]
    assert got["links"]["prefect_flow_run"] == LINKS["prefect_flow_run"]
    assert alerts.failing_stage(DataError("validate failed: too many empty texts")) == "validate"
    assert alerts.failing_stage(RuntimeError("boom")) == "pipeline"


def test_delivery_failures_are_logged_never_raised(caplog: pytest.LogCaptureFixture) -> None:
    with Listener(status=500) as hook:
        assert alerts.send(hook.url, {"text": "x"}) is False
    dead = hook.url  # closed now: connection refused
    assert alerts.send(dead, {"text": "x"}, timeout_s=2) is False
    assert alerts.send(None, {"text": "x"}) is False  # no webhook configured: nothing sent
    assert alerts.send("not a url", {"text": "x"}) is False
    assert sum("alert to" in r.message for r in caplog.records) >= 3


def test_logs_name_the_webhook_host_never_its_secret_path(caplog: pytest.LogCaptureFixture) -> None:
    # a Slack incoming webhook's path is its credential: it must not reach a log
    secret = "/services/T0000/B0000/XXXXsecretXXXX"
    with Listener(status=403) as hook:
        refused = hook.url.replace("/hook", secret)
        assert alerts.send(refused, {"text": "x"}) is False
    assert alerts.send(refused, {"text": "x"}, timeout_s=2) is False  # closed now: connection refused
    assert alerts.send("ftp://hooks.example.com" + secret, {"text": "x"}) is False  # urllib quotes the URL back
    logged = [r.getMessage() for r in caplog.records if "alert to" in r.getMessage()]
    assert len(logged) == 3 and all("secret" not in m for m in logged)
    assert "alert to http://127.0.0.1 answered 403" in logged[0] and "ftp://hooks.example.com" in logged[2]


def _run_inputs(summary: dict[str, Any]) -> tuple[dict[str, Any], Any, Any]:
    """What the pipeline hands the alert task: the summary, the prep stages' refs, the evaluate ref."""
    def ref(rows: dict[str, int], extra: dict[str, Any] | None = None) -> SimpleNamespace:
        return SimpleNamespace(rows=rows, extra=extra or {})

    data = SimpleNamespace(stages={"ingest": ref({"input": 100}), "validate": ref({"rejected": 3}, {"status": "ok"})})
    evaluated = SimpleNamespace(stage=ref({}, {"metrics": {"champion_test_accuracy": 0.8}}))
    return summary, data, evaluated


def test_an_alert_that_cannot_be_built_never_fails_a_completed_run(
        listener: Listener, monkeypatch: pytest.MonkeyPatch) -> None:
    from tasks import stages

    monkeypatch.setenv("NIGHTSHIFT_ALERT_WEBHOOK", listener.url)
    monkeypatch.setattr(stages, "_links", lambda run_id: LINKS)
    warnings: list[str] = []
    monkeypatch.setattr(stages, "_logger", lambda: SimpleNamespace(warning=lambda fmt, *a: warnings.append(fmt % a)))
    recipe = SimpleNamespace(name="sst2", model_name="sst2")
    with stages.alert_on_failure(recipe, "abc"):
        assert stages.alert.fn(*_run_inputs(SUMMARY)) is True  # the same inputs, intact, are sent
    (sent,) = listener.received
    assert sent["event"] == "nightshift.run.completed" and sent["validation"]["rows_rejected"] == 3
    broken = {**SUMMARY, "decision": {"promoted": True}}  # no reason, no champion_before: completed_message raises
    with stages.alert_on_failure(recipe, "abc"):  # nothing propagates: no failed run, no failed-run alert
        assert stages.alert.fn(*_run_inputs(broken)) is False
    assert len(listener.received) == 1
    assert len(warnings) == 1 and "could not send the completed-run alert: KeyError" in warnings[0]
