"""Alias history: every move of a registry alias, kept in the registry itself.

MLflow keeps only where an alias points now. Nightshift records each move as one tag on the
registered model: key ``nightshift.alias_move.<ns since epoch, 19 digits>.<pid>-<random>``, value a
compact JSON :class:`AliasMove`. One tag per move, because a registered-model tag value is at most
5000 characters on a SQL store (``registered_model_tags.value`` is ``VARCHAR(5000)``; MLflow's own
check allows 100,000, PostgreSQL enforces the column): a single growing history tag would hit that
within weeks of nightly runs. Keys sort by time (fixed-width nanoseconds first, strictly increasing
within a process, so two moves of one release sort in the order they were made even when the clock
has not advanced between them; pid and random part keep keys of different writers apart); writers
never read-modify-write, so two writers cannot lose each other's move. The history therefore lives and
dies with the registered model, whatever happens to ``$NIGHTSHIFT_HOME``.

``champion_lineage`` replays the champion's moves as a stack (a forward move pushes, a rollback
step or a revert pops), which is what ``nightshift rollback`` walks back along.
"""

from __future__ import annotations

import getpass
import json
import os
import secrets
import socket
import sys
import threading
import time
from datetime import datetime, timezone
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from tasks.core import tracking
from tasks.core.store import bounded

TAG_PREFIX = "nightshift.alias_move."
# a SQL store's registered_model_tags.value column is VARCHAR(5000); leave room for the JSON around the texts
MAX_VALUE_CHARS = 5000
MAX_TEXT_CHARS = 1000

Action = Literal["pipeline", "promote", "rollback", "revert"]
BACK_ACTIONS = ("rollback", "revert")


class MoveContext(BaseModel):
    """Who moves an alias and from which run: recorded with every move."""

    model_config = ConfigDict(frozen=True)

    command: str = Field(default_factory=lambda: " ".join(os.path.basename(a) if i == 0 else a
                                                          for i, a in enumerate(sys.argv)),
                         description="The command line that moved it.")
    user: str = Field(default_factory=lambda: _user(), description="The user name of the moving process.")
    host: str = Field(default_factory=socket.gethostname, description="The host of the moving process.")
    pid: int = Field(default_factory=os.getpid, description="The moving process.")
    mlflow_run_id: str | None = Field(default=None, description="The pipeline's MLflow parent run, when a pipeline moved it.")
    prefect_flow_run_id: str | None = Field(default=None, description="The Prefect flow run, when a flow moved it.")


class AliasMove(BaseModel):
    """One alias move, as stored in one registered-model tag."""

    model_config = ConfigDict(frozen=True)

    time: str = Field(description="UTC time of the move, ISO 8601 with milliseconds.")
    alias: str = Field(description="The alias moved: champion, previous.")
    from_version: str | None = Field(description="The version it held before (None: it did not exist).")
    to_version: str | None = Field(description="The version it holds now (None: removed).")
    action: Action = Field(description="pipeline, promote, rollback or revert (a failed release undone).")
    reason: str = Field(description="Why: the gate's sentence, --reason, the failed check.")
    context: MoveContext = Field(description="Who and which run.")
    key: str = Field(default="", description="The tag key it is stored under (filled when read back).")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no user name in a bare container
        return str(os.getuid())


_stamp_lock = threading.Lock()
_last_stamp = 0


def _stamp() -> int:
    """Nanoseconds since the epoch, strictly increasing within this process (the clock's resolution may
    be coarser than two moves apart, or it may step back)."""
    global _last_stamp
    with _stamp_lock:
        _last_stamp = max(time.time_ns(), _last_stamp + 1)
        return _last_stamp


def encode(move: AliasMove) -> str:
    """The tag value: compact JSON, texts bounded so the value stays within :data:`MAX_VALUE_CHARS`."""
    ctx = move.context.model_copy(update={"command": bounded(move.context.command, MAX_TEXT_CHARS)})
    data = move.model_copy(update={"reason": bounded(move.reason, MAX_TEXT_CHARS), "context": ctx}
                           ).model_dump(exclude={"key"})
    value = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    if len(value) > MAX_VALUE_CHARS:  # only long host/user names left: cut the texts further
        data["reason"], data["context"]["command"] = bounded(move.reason, 200), bounded(move.context.command, 200)
        value = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return value


def record(name: str, alias: str, from_version: str | None, to_version: str | None, action: Action, reason: str,
           context: MoveContext | None = None) -> AliasMove:
    """Write one move to the registry (a new tag on registered model ``name``) and return it."""
    now = _stamp()
    move = AliasMove(time=datetime.fromtimestamp(now / 1e9, timezone.utc).isoformat(timespec="milliseconds"), alias=alias,
                     from_version=from_version, to_version=to_version, action=action, reason=reason,
                     context=context or MoveContext())
    key = f"{TAG_PREFIX}{now:019d}.{os.getpid()}-{secrets.token_hex(3)}"
    tracking.set_model_tag(name, key, encode(move))
    return move.model_copy(update={"key": key})


def moves(name: str, alias: str | None = None) -> list[AliasMove]:
    """Every recorded move of model ``name`` (of one ``alias`` when given), oldest first."""
    found = []
    for key, value in tracking.model_tags(name).items():
        if not key.startswith(TAG_PREFIX):
            continue
        try:
            move = AliasMove.model_validate({**json.loads(value), "key": key})
        except (ValueError, TypeError):
            continue  # a tag someone else wrote by hand: not ours to interpret
        if alias is None or move.alias == alias:
            found.append(move)
    # keys written before nanosecond stamps hold 13-digit milliseconds: they still sort by time against
    # 19-digit ones (same leading digits; within one millisecond "." sorts before any digit)
    return sorted(found, key=lambda m: m.key)


def champion_lineage(history: list[AliasMove], alias: str = "champion") -> list[str]:
    """The versions ``alias`` held, as a stack: the last one is the current holder, the one before it is
    where a rollback goes. A forward move pushes; a rollback step or revert that returns to the entry
    below the top pops (so two rollbacks walk two versions back); removing the alias empties it."""
    stack: list[str] = []
    for move in history:
        if move.alias != alias:
            continue
        below = stack[-2] if len(stack) >= 2 else None
        if move.action in BACK_ACTIONS and stack and stack[-1] == move.from_version and below == move.to_version:
            stack.pop()
        elif move.to_version is None:
            stack.clear()
        elif not stack or stack[-1] != move.to_version:
            stack.append(move.to_version)
    return stack


def table(history: list[AliasMove]) -> str:
    """The moves as a plain-text table, oldest first (``nightshift history``)."""
    header = ("time (UTC)", "alias", "from", "to", "action", "who", "run", "reason")
    rows = [header]
    for m in history:
        run = m.context.mlflow_run_id or m.context.prefect_flow_run_id or "-"
        rows.append((m.time.replace("+00:00", "Z"), m.alias, m.from_version or "-", m.to_version or "-", m.action,
                     f"{m.context.user}@{m.context.host}: {bounded(m.context.command, 60)}", run[:12],
                     bounded(m.reason, 100)))
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r[:-1], widths)) + "  " + str(r[-1]) for r in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths) + "  " + "-" * 6, *lines[1:]])
