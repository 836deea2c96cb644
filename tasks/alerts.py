"""Alerts: after every pipeline run, one JSON POST to the webhook in ``NIGHTSHIFT_ALERT_WEBHOOK``.

The message carries the news a person acts on: the decision (promoted or not, and why), the
challenger-vs-champion metric diff (per task for a multi-task model), the validation summary (rows
rejected, by reason), the MLflow run URL and the Prefect flow-run URL. A failed run alerts too, with
the failing stage and its one-line error. ``text`` holds the same as one short paragraph, so a Slack
or Mattermost incoming webhook shows it as is.

Delivery is best effort: no webhook configured means nothing is sent, and a webhook that is down
or answers an error is logged, never a failed pipeline (nor is a message that could not be built:
``tasks.stages.alert`` logs that too). Logs name the webhook's host only: its path is its secret.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlsplit

from tasks.core.store import bounded, one_line

log = logging.getLogger("nightshift.alerts")
STAGES = ("ingest", "validate", "clean", "split", "encode", "augment", "train", "evaluate", "package", "register",
          "deploy", "summarize")
ERROR_LIMIT = 500  # characters of the failing stage's error in a failed-run alert


def webhook_host(url: str) -> str:
    """Where an alert goes, fit for a log: scheme and host only. A Slack or Mattermost webhook's path
    is its secret (anyone holding it can post), so the full URL never reaches a log."""
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError:
        host = None
    return f"{parts.scheme}://{host}" if host else "the configured webhook (not a URL)"


def metric_diff(challenger: dict[str, Any], champion: dict[str, Any] | None) -> dict[str, Any]:
    """``{metric: {challenger, champion, diff}}``; nested per task where the metrics are (``{task: {metric: ...}}``)."""
    out: dict[str, Any] = {}
    for key, value in challenger.items():
        theirs = (champion or {}).get(key)
        if isinstance(value, dict):
            out[key] = metric_diff(value, theirs if isinstance(theirs, dict) else None)
        elif isinstance(value, (int, float)):
            diff = None if not isinstance(theirs, (int, float)) else round(float(value) - float(theirs), 6)
            out[key] = {"challenger": round(float(value), 6),
                        "champion": None if theirs is None else round(float(theirs), 6), "diff": diff}
    return out


def champion_metrics(metrics: dict[str, Any]) -> dict[str, Any] | None:
    """The re-scored champion's test metrics from the evaluate stage's metrics (``champion_test_<name>``)."""
    found: dict[str, Any] = {}
    for key, value in metrics.items():
        if not key.startswith("champion_test_"):
            continue
        path = key.removeprefix("champion_test_").split(".")
        node = found
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return found or None


def failing_stage(exc: BaseException) -> str:
    """The stage an error came from: ``StageError.stage``, else the stage name its message starts with."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        stage = getattr(exc, "stage", None)
        if isinstance(stage, str):
            return stage
        words = str(exc).split(":", 1)[0].split()
        head = words[0] if words else ""
        if head in STAGES:  # "validate: ...", "validate failed: ..."
            return head
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return "pipeline"


def completed_message(summary: dict[str, Any], validation: dict[str, Any], champion: dict[str, Any] | None,
                      links: dict[str, str | None]) -> dict[str, Any]:
    """The alert of a completed run."""
    decision = summary["decision"]
    diff = metric_diff(summary["metrics"]["test"], champion)
    model = summary["model"]
    verdict = (f"promoted v{model['version']} to champion (was {decision['champion_before'] or 'none'})"
               if decision["promoted"] else f"kept champion {decision['champion_after'] or 'none'}; v{model['version']} "
                                            f"not promoted")
    figures = ", ".join(f"{k} {v['challenger']:.4f}" + (f" ({v['diff']:+.4f} vs champion)" if v.get("diff") is not None
                                                         else "")
                        for k, v in diff.items() if "challenger" in v)
    rejected = validation.get("rows_rejected", 0)
    text = (f"Nightshift {summary['recipe']}: {verdict}: {decision['reason']}. Test: {figures or 'see MLflow'}. "
            f"Rows rejected: {rejected}. MLflow: {links.get('mlflow_run')} Prefect: {links.get('prefect_flow_run')}")
    return {"event": "nightshift.run.completed", "status": "completed", "recipe": summary["recipe"],
            "model": model, "decision": decision, "metrics": diff, "validation": validation, "links": links,
            "text": text}


def failed_message(recipe: str, model: str, exc: BaseException, links: dict[str, str | None]) -> dict[str, Any]:
    """The alert of a failed run: the failing stage and its one-line error."""
    stage, error = failing_stage(exc), one_line(exc, ERROR_LIMIT)
    return {"event": "nightshift.run.failed", "status": "failed", "recipe": recipe, "model": {"name": model},
            "failed_stage": stage, "error": error, "links": links,
            "text": f"Nightshift {recipe}: FAILED in {stage}: {error}. MLflow: {links.get('mlflow_run')} "
                    f"Prefect: {links.get('prefect_flow_run')}"}


def send(url: str | None, message: dict[str, Any], timeout_s: float = 5.0) -> bool:
    """POST ``message`` as JSON to ``url``; True when it was accepted (2xx). Never raises: failures are logged
    (naming the webhook's host only, see :func:`webhook_host`)."""
    if not url:
        return False
    where = webhook_host(url)
    try:
        request = urllib.request.Request(url, data=json.dumps(message, default=str).encode(), method="POST",
                                         headers={"Content-Type": "application/json", "User-Agent": "nightshift-alerts"})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            if 200 <= response.status < 300:
                return True
            log.warning("alert to %s answered %s", where, response.status)
    except urllib.error.HTTPError as exc:
        log.warning("alert to %s answered %s: %s", where, exc.code, bounded(exc.read()[:200].decode(errors="replace")))
    except Exception as exc:  # a webhook that is down must not fail the pipeline
        # the exception's text may quote the URL (urllib's do for a bad scheme): replaced before it is cut
        log.warning("alert to %s failed: %s: %s", where, type(exc).__name__,
                    bounded(" ".join(str(exc).replace(url, where).split())))
    return False
