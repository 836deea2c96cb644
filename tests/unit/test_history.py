"""Alias history in the registry: one tag per move, bounded values, oldest first, the rollback lineage."""

from __future__ import annotations

import json
import time
from types import SimpleNamespace

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import PERMISSION_DENIED, RESOURCE_DOES_NOT_EXIST
from mlflow.tracking import MlflowClient

from tasks import deploy
from tasks.core import history, tracking
from tasks.core.history import AliasMove, MoveContext
from tests.unit.test_release import NAME, empty_db, registry, versions  # noqa: F401  (fixtures)


def _move(alias: str, frm: str | None, to: str | None, action: str = "pipeline") -> AliasMove:
    return AliasMove(time="2026-01-01T00:00:00.000+00:00", alias=alias, from_version=frm, to_version=to,
                     action=action, reason="r", context=MoveContext(command="test", user="u", host="h", pid=1))


def test_lineage_is_a_stack_of_forward_moves_popped_by_rollbacks() -> None:
    moves = [_move("champion", None, "1"), _move("previous", None, "1"), _move("champion", "1", "2"),
             _move("champion", "2", "3", "promote"), _move("champion", "3", "2", "rollback")]
    assert history.champion_lineage(moves) == ["1", "2"]
    assert history.champion_lineage(moves + [_move("champion", "2", "1", "rollback")]) == ["1"]
    # a rollback --to jumps (pushes); a revert of a first release empties the stack
    assert history.champion_lineage(moves + [_move("champion", "2", "1", "revert"),
                                             _move("champion", "1", "3", "rollback")]) == ["1", "3"]
    assert history.champion_lineage([_move("champion", None, "1"), _move("champion", "1", None, "revert")]) == []


def test_every_move_is_one_registered_model_tag_and_reads_back_in_order(registry: MlflowClient) -> None:
    versions(registry, 3)
    ctx = MoveContext(mlflow_run_id="run-abc", prefect_flow_run_id="flow-xyz")
    deploy.promote(NAME, "1", "pipeline", "accuracy 0.8 >= 0.5", ctx)
    deploy.promote(NAME, "2", "pipeline", "accuracy 0.9 within 0.01", ctx)
    deploy.rollback(NAME, reason="bad answers in prod")
    tags = tracking.model_tags(NAME)
    keys = sorted(k for k in tags if k.startswith(history.TAG_PREFIX))
    assert len(keys) == 5  # champion 1; champion 2 + previous 1; champion 1 + previous 2
    moves = history.moves(NAME)
    assert [(m.alias, m.from_version, m.to_version, m.action) for m in moves] == [
        ("champion", None, "1", "pipeline"), ("champion", "1", "2", "pipeline"), ("previous", None, "1", "pipeline"),
        ("champion", "2", "1", "rollback"), ("previous", "1", "2", "rollback")]
    assert moves[1].reason == "accuracy 0.9 within 0.01" and moves[1].context.mlflow_run_id == "run-abc"
    assert moves[1].context.prefect_flow_run_id == "flow-xyz"
    assert moves[3].reason == "bad answers in prod" and moves[3].context.pid > 0 and moves[3].context.user
    assert [m.time for m in moves] == sorted(m.time for m in moves)
    text = history.table(moves)
    assert text.splitlines()[0].startswith("time (UTC)") and len(text.splitlines()) == 2 + 5
    assert "bad answers in prod" in text and "run-abc" in text


def test_a_huge_reason_or_command_is_bounded_to_fit_a_sql_tag_value(registry: MlflowClient) -> None:
    versions(registry, 1)
    ctx = MoveContext(command="nightshift promote " + "x" * 20_000)
    deploy.promote(NAME, "1", "promote", "why " * 10_000, ctx)
    (value,) = [v for k, v in tracking.model_tags(NAME).items() if k.startswith(history.TAG_PREFIX)]
    assert len(value) <= history.MAX_VALUE_CHARS
    stored = json.loads(value)
    assert stored["reason"].startswith("why why") and stored["reason"].endswith(" more characters)")
    assert len(stored["reason"]) <= history.MAX_TEXT_CHARS
    assert history.moves(NAME)[0].to_version == "1"


def test_foreign_tags_are_ignored(registry: MlflowClient) -> None:
    versions(registry, 1)
    tracking.set_model_tag(NAME, history.TAG_PREFIX + "0000000000000.hand-written", "not json")
    tracking.set_model_tag(NAME, "team", "search")
    deploy.promote(NAME, "1")
    assert [m.to_version for m in history.moves(NAME)] == ["1"]


def test_history_of_a_missing_model_is_empty(registry: MlflowClient) -> None:
    assert history.moves("no-such-model") == []
    with pytest.raises(Exception):
        deploy.rollback("no-such-model", to="1")


def test_moves_in_the_same_clock_tick_read_back_in_write_order(monkeypatch: pytest.MonkeyPatch) -> None:
    # a release writes champion then previous within microseconds; a coarse or stuck clock must not let
    # the random part of the key decide their order (here it would: descending random parts)
    tags: dict[str, str] = {}
    monkeypatch.setattr(tracking, "set_model_tag", lambda name, key, value: tags.__setitem__(key, value))
    monkeypatch.setattr(tracking, "model_tags", lambda name: dict(tags))
    monkeypatch.setattr(time, "time", lambda: 1_764_640_000.123)
    monkeypatch.setattr(time, "time_ns", lambda: 1_764_640_000_123_000_000)
    monkeypatch.setattr(history, "_last_stamp", 0)  # earlier moves of this process stamped the real clock
    randoms = iter(["ffffff", "aaaaaa", "000000"])
    monkeypatch.setattr(history.secrets, "token_hex", lambda n: next(randoms))
    written = [history.record(NAME, alias, frm, to, "pipeline", "r")
               for alias, frm, to in (("champion", "1", "2"), ("previous", "0", "1"), ("champion", "2", "3"))]
    assert [m.key for m in history.moves(NAME)] == [m.key for m in written]
    assert len({m.key for m in written}) == 3
    stamps = [m.key.removeprefix(history.TAG_PREFIX).split(".")[0] for m in written]
    assert all(len(s) == 19 for s in stamps) and stamps == sorted(stamps)  # fixed width: text order is time order
    assert written[0].time == "2025-12-02T01:46:40.123+00:00"


def test_keys_of_millisecond_stamps_still_sort_by_time_against_nanosecond_ones() -> None:
    old = history.TAG_PREFIX + "1764640000123.42-abcdef"  # written before nanosecond stamps
    same_ms = history.TAG_PREFIX + "1764640000123000001.42-000000"
    earlier = history.TAG_PREFIX + "1764640000122999999.42-ffffff"
    assert sorted([same_ms, old, earlier]) == [earlier, old, same_ms]


class _Registry:
    """An MLflow client whose get_registered_model fails with ``code``."""

    def __init__(self, code: int):
        self.code, self.calls = code, 0

    def get_registered_model(self, name: str) -> SimpleNamespace:
        self.calls += 1
        raise MlflowException(f"registered model {name}: refused", self.code)


def test_only_a_missing_model_reads_as_no_tags_other_registry_errors_propagate(
        monkeypatch: pytest.MonkeyPatch) -> None:
    missing = _Registry(RESOURCE_DOES_NOT_EXIST)
    monkeypatch.setattr(tracking, "client", lambda: missing)
    assert tracking.model_tags(NAME) == {} and tracking.model_exists(NAME) is False
    denied = _Registry(PERMISSION_DENIED)
    monkeypatch.setattr(tracking, "client", lambda: denied)
    with pytest.raises(MlflowException, match="refused"):
        tracking.model_tags(NAME)
    with pytest.raises(MlflowException, match="refused"):
        tracking.model_exists(NAME)
    # a rollback must not mistake an unreadable history for an empty one and fall back to 'previous'
    monkeypatch.setattr(tracking, "alias_version", lambda name, alias: {"champion": "3", "previous": "2"}[alias])
    with pytest.raises(MlflowException, match="refused"):
        deploy.rollback_target(NAME)
    assert denied.calls == 3  # not transient: no retries
