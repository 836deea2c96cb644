"""Stage: deploy. Infra-validates the challenger in a real server, then moves ``champion``; reverts on failure.

When the gate passed, and the champion is still the one the gate compared against:

1. infra validation (:mod:`tasks.canary`): the challenger version is served by a fresh ``nightshift
   serve`` process on a free loopback port and must answer exactly the offline predictions, within
   ``deploy.max_p99_ms`` and ``deploy.max_rss_mb`` (``deploy.canary: false`` falls back to loading
   the version in this process); nothing has moved yet, so a failure leaves the aliases as they were;
2. ``champion`` moves to the challenger and the replaced version becomes ``previous``;
3. with ``deploy.server_url``, the live server is told to reload and must report the new version
   within ``deploy.switch_timeout_s``; if not, both aliases go back and the run fails.

Every alias move (here, ``nightshift promote``, ``rollback`` and reverts) is recorded in the registry
(:mod:`tasks.core.history`), and all of them happen under the model's release lock
(:mod:`tasks.core.lock`), so two runs of one recipe never interleave their moves.

Run alone: ``python -m flows.deploy_model --config configs/sst2.yaml`` (after evaluate_model).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.core import history, tracking
from tasks.core.config import DeployConfig
from tasks.core.history import Action, MoveContext  # noqa: F401  (MoveContext: re-exported for stages and the CLI)

GATE_TAG, GATE_REASON_TAG = "nightshift.gate", "nightshift.gate_reason"
_UNSET: Any = object()


class ReleaseError(RuntimeError):
    """A release that failed or was refused; the aliases are where they were before it."""


class PromotionRefused(ReleaseError):
    """``nightshift promote`` of a version whose recorded gate failed, without ``--force``."""


class Release(BaseModel):
    """What deploy did."""

    model_config = ConfigDict(frozen=True)

    promoted: bool = Field(description="True when champion moved to the challenger.")
    reason: str = Field(description="Why it moved or not.")
    champion_before: str | None = Field(description="Champion version before this run.")
    champion_after: str | None = Field(description="Champion version after this run.")
    canary: dict[str, Any] | None = Field(default=None, description="Infra validation's report (tasks.canary.CanaryReport).")
    smoke_seconds: float | None = Field(default=None, description="Seconds infra validation (or the in-process smoke test) took.")
    switch_seconds: float | None = Field(default=None, description="Seconds the live server took to serve the new champion.")


# ---------------------------------------------------------------------------------------------- alias moves


def _move(name: str, alias: str, version: str | None, action: Action, reason: str, context: MoveContext | None) -> None:
    """Point ``alias`` at ``version`` (None: remove it) and record the move when it changed anything."""
    before = tracking.alias_version(name, alias)
    if before == version:
        return
    if version is None:
        tracking.delete_alias(name, alias)
    else:
        tracking.set_alias(name, alias, version)
    history.record(name, alias, before, version, action, reason, context)


def promote(name: str, version: str, action: Action = "promote", reason: str = "", context: MoveContext | None = None
            ) -> str | None:
    """Point ``champion`` at ``version``; keep the replaced one as ``previous``; record both moves.

    No checks: callers validate first (:func:`release`, :func:`promote_checked`). Returns the replaced version.
    """
    before = tracking.alias_version(name, "champion")
    if before == version:
        return before
    _move(name, "champion", version, action, reason or f"{action}: v{version}", context)
    if before is not None:
        _move(name, "previous", before, action, f"replaced by v{version}", context)
    return before


def restore_aliases(name: str, aliases: dict[str, str | None], reason: str = "release reverted",
                    context: MoveContext | None = None) -> None:
    """Put aliases back to the given versions (None: remove the alias); recorded as ``revert`` moves."""
    for alias, version in aliases.items():
        _move(name, alias, version, "revert", reason, context)


def rollback_target(name: str) -> str:
    """Where ``rollback`` without ``--to`` goes: the version champion held before the current one, by the history.

    Two rollbacks walk two versions back. A model without history (or whose champion was moved outside
    Nightshift) falls back to the ``previous`` alias.
    """
    current = tracking.alias_version(name, "champion")
    lineage = history.champion_lineage(history.moves(name, "champion"))
    if current is not None and lineage and lineage[-1] == current:
        if len(lineage) >= 2:
            return lineage[-2]
        raise ReleaseError(f"model {name!r}: champion v{current} is the first version in its alias history; "
                           f"there is nothing to roll back to (use --to VERSION)")
    previous = tracking.alias_version(name, "previous")
    if previous is None or previous == current:
        raise ReleaseError(f"model {name!r} has no 'previous' version to roll back to")
    return previous


def rollback(name: str, to: str | None = None, reason: str = "", context: MoveContext | None = None) -> tuple[str, str]:
    """Move ``champion`` one step back in its history (or to ``to``); returns (old champion, new champion)."""
    current = tracking.alias_version(name, "champion")
    target = str(to) if to is not None else rollback_target(name)
    if to is not None:
        tracking.version_info(name, target)  # fails loudly when the version does not exist
    if target == current:
        raise ReleaseError(f"model {name!r}: v{target} is already the champion")
    _move(name, "champion", target, "rollback", reason or (f"rollback to v{target}" if to else "rollback one step"),
          context)
    if current is not None:
        _move(name, "previous", current, "rollback", f"rolled back from v{current}", context)
    return current or "", target


# ---------------------------------------------------------------------------------------------- gate of a version


def recorded_gate(name: str, version: str) -> tuple[str | None, str | None]:
    """The gate decision register recorded on the version: (``pass`` | ``fail`` | None, reason)."""
    tags = tracking.version_info(name, version)["tags"]
    return tags.get(GATE_TAG), tags.get(GATE_REASON_TAG)


def promotion_reason(name: str, version: str, force: bool, reason: str | None) -> str:
    """The history's reason for a manual promotion; refuses a version whose gate failed unless ``force``."""
    gate, gate_reason = recorded_gate(name, version)
    if gate == "fail":
        if not force:
            raise PromotionRefused(f"model {name!r} v{version} failed its release gate ({gate_reason}); "
                                   f"pass --force --reason TEXT to promote it anyway")
        return f"forced past failed gate ({gate_reason}): {reason or 'no reason given'}"
    return reason or f"manual promotion (gate {gate or 'not recorded'}: {gate_reason or '-'})"


# ---------------------------------------------------------------------------------------------- validation


def predict_labels(model: Any, inputs: list[Any], column: str = "text") -> list[str]:
    """The labels a loaded pyfunc ``model`` predicts for ``inputs`` (the values of its ``column`` input
    column: texts, or pixel lists for images), as strings: how the champion is re-scored, the in-process
    smoke test checks a version and ``nightshift promote`` derives a canary's expected answers."""
    import pandas as pd

    return [str(label) for label in model.predict(pd.DataFrame({column: list(inputs)}))["label"].tolist()]


def smoke_test(model_uri: str, texts: list[Any], expected: list[str], column: str = "text") -> float:
    """Load ``model_uri`` through the registry in this process and check it predicts ``expected``; return seconds.

    The fallback of infra validation when ``deploy.canary`` is false. ``texts`` are the inputs of the
    ``column`` column: texts, or pixel lists (``column="pixels"``) for images.
    """
    started = time.perf_counter()
    got = predict_labels(tracking.load_pyfunc(model_uri), texts, column)
    mismatches = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    if len(got) != len(expected) or mismatches:
        raise ReleaseError(f"{model_uri}: served predictions differ from offline ones at rows {mismatches[:10]}")
    return time.perf_counter() - started


def validator(name: str, inputs: list[Any], expected: list[str], column: str, cfg: DeployConfig
              ) -> Callable[[str], dict[str, Any]]:
    """The infra validation deploy runs on a version before moving champion: returns its report as a dict."""

    def check(version: str) -> dict[str, Any]:
        if not cfg.canary:
            return {"version": version, "in_process_s": round(smoke_test(f"models:/{name}/{version}", inputs,
                                                                         expected, column), 3)}
        from tasks import canary

        return canary.validate(name, version, inputs, expected, column, cfg).model_dump()

    return check


def registry_expectations(name: str, version: str, column: str | None = None) -> tuple[list[Any], list[str], str]:
    """Canary inputs and expected labels for a version outside the pipeline (``nightshift promote``).

    The inputs are the version's logged input example; the expected labels are what the registry
    artifact predicts for them loaded in this process, so the canary checks that a fresh server
    answers what the artifact itself does.
    """
    uri = f"models:/{name}/{version}"
    model = tracking.load_pyfunc(uri)
    meta = getattr(model.metadata, "metadata", None) or {}
    column = column or ("pixels" if meta.get("task") == "image-classification" else "text")
    inputs = tracking.input_example(uri)
    if not inputs:
        raise ReleaseError(f"{uri} has no input example to validate it with")
    expected = predict_labels(model, inputs, column)
    return inputs, expected, column


def switcher(cfg: DeployConfig) -> Callable[[str], float] | None:
    """The live-server check after the move (``deploy.server_url``), or None without a server."""
    if cfg.server_url is None:
        return None
    from tasks import canary

    return lambda version: canary.wait_for_version(cfg.server_url, version, cfg.switch_timeout_s)


# ---------------------------------------------------------------------------------------------- release


def release(
    name: str, version: str, gate_passed: bool, gate_reason: str, *,
    gate_champion: str | None = _UNSET,
    validate: Callable[[str], dict[str, Any]] | None = None,
    switch: Callable[[str], float] | None = None,
    action: Action = "pipeline",
    context: MoveContext | None = None,
) -> Release:
    """Promote ``version`` when the gate passed: validate first, move the aliases, check the live server.

    ``gate_champion`` is the champion version the gate compared against; when the champion has moved
    since (another run promoted in between), the decision is stale and nothing moves. ``validate``
    (infra validation) runs before any alias moves; ``switch`` (the live server) after, and its
    failure puts both aliases back. Call it under the model's release lock (:func:`model_lock`).
    """
    before = tracking.alias_version(name, "champion")
    if not gate_passed:
        return Release(promoted=False, reason=f"gate failed: {gate_reason}", champion_before=before, champion_after=before)
    if before == version:
        return Release(promoted=False, reason=f"v{version} is already the champion", champion_before=before,
                       champion_after=before)
    if gate_champion is not _UNSET and gate_champion != before:
        return Release(promoted=False, champion_before=before, champion_after=before,
                       reason=f"champion moved from {_v(gate_champion)} to {_v(before)} after this run's gate compared "
                              f"against {_v(gate_champion)}: the decision is stale, not promoted (rerun to compare "
                              f"against the new champion)")
    report, seconds = None, None
    if validate is not None:
        started = time.perf_counter()
        try:
            report = validate(version)
        except Exception as exc:
            raise ReleaseError(f"deploy: {name} v{version} not promoted, aliases unchanged (champion {_v(before)}): "
                               f"{exc}") from exc
        seconds = round(time.perf_counter() - started, 3)
    previous_before = tracking.alias_version(name, "previous")
    promote(name, version, action, gate_reason, context)
    switch_seconds = None
    if switch is not None:
        try:
            switch_seconds = switch(version)
        except Exception as exc:
            restore_aliases(name, {"champion": before, "previous": previous_before},
                            f"live server check failed: {exc}", context)
            raise ReleaseError(f"deploy: {name} v{version} reverted, champion back to {_v(before)}: {exc}") from exc
    return Release(promoted=True, reason=gate_reason, champion_before=before, champion_after=version, canary=report,
                   smoke_seconds=seconds, switch_seconds=switch_seconds)


def _v(version: str | None) -> str:
    return "none" if version is None else f"v{version}"


@contextlib.contextmanager
def model_lock(name: str, timeout_s: float, context: MoveContext | None = None) -> Iterator[None]:
    """Hold model ``name``'s release lock (``$NIGHTSHIFT_HOME/locks/<name>.lock``) for the body."""
    from tasks.core.lock import release_lock
    from tasks.core.settings import get_settings

    ctx = context or MoveContext()
    with release_lock(get_settings().locks_root, name, timeout_s, ctx.model_dump()):
        yield


# ---------------------------------------------------------------------------------------------- by hand


def promote_checked(name: str, version: str, cfg: DeployConfig, force: bool = False, reason: str | None = None,
                    context: MoveContext | None = None) -> Release:
    """``nightshift promote``: refuse a failed gate unless ``force``, infra-validate, then move champion.

    Under the release lock, with the same infra validation as the pipeline: the canary inputs are the
    version's logged input example and the expected labels what the artifact predicts in this process.
    """
    version = str(version)
    tracking.version_info(name, version)  # a missing version fails here, naming it
    why = promotion_reason(name, version, force, reason)
    check = None
    if cfg.canary:
        inputs, expected, column = registry_expectations(name, version)
        check = validator(name, inputs, expected, column, cfg)
    with model_lock(name, cfg.lock_timeout_s, context):
        return release(name, version, True, why, validate=check, switch=switcher(cfg), action="promote",
                       context=context)


def rollback_locked(name: str, to: str | None, cfg: DeployConfig, reason: str = "",
                    context: MoveContext | None = None) -> tuple[str, str]:
    """``nightshift rollback``: one step back in the champion's history (or to ``to``), under the release lock."""
    with model_lock(name, cfg.lock_timeout_s, context):
        return rollback(name, to, reason, context)
