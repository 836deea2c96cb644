"""Stage: deploy. Moves the ``champion`` alias when the gate passed, smoke-tests it, reverts on failure.

Promotion keeps the replaced version as alias ``previous`` so ``nightshift rollback`` is one command.
After the move, the model is loaded back from the registry by alias and must predict exactly what
the offline evaluation predicted on a sample of test texts; if it does not, ``champion`` goes back
to where it was and the run fails loudly.

Run alone: ``python -m flows.deploy_model --config configs/sst2.yaml`` (after evaluate_model).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tasks.core import tracking


class ReleaseError(RuntimeError):
    """The promoted model failed its smoke test; the champion alias was reverted."""


class Release(BaseModel):
    """What deploy did."""

    model_config = ConfigDict(frozen=True)

    promoted: bool = Field(description="True when champion moved to the challenger.")
    reason: str = Field(description="Why it moved or not.")
    champion_before: str | None = Field(description="Champion version before this run.")
    champion_after: str | None = Field(description="Champion version after this run.")
    smoke_seconds: float | None = Field(default=None, description="Time to load and predict through the registry alias.")


def promote(name: str, version: str) -> str | None:
    """Point ``champion`` at ``version``; keep the replaced one as ``previous``. Returns the replaced version."""
    before = tracking.alias_version(name, "champion")
    if before == version:
        return before
    tracking.set_alias(name, "champion", version)
    if before is not None:
        tracking.set_alias(name, "previous", before)
    return before


def restore_aliases(name: str, aliases: dict[str, str | None]) -> None:
    """Put aliases back to the given versions (None: remove the alias)."""
    for alias, version in aliases.items():
        if version is None:
            tracking.delete_alias(name, alias)
        else:
            tracking.set_alias(name, alias, version)


def rollback(name: str) -> tuple[str, str]:
    """Swap ``champion`` and ``previous``; returns (old champion, new champion)."""
    current, previous = tracking.alias_version(name, "champion"), tracking.alias_version(name, "previous")
    if previous is None:
        raise ReleaseError(f"model {name!r} has no 'previous' version to roll back to")
    tracking.set_alias(name, "champion", previous)
    if current is not None:
        tracking.set_alias(name, "previous", current)
    return current or "", previous


def smoke_test(model_uri: str, texts: list[Any], expected: list[str], column: str = "text") -> float:
    """Load ``model_uri`` through the registry and check it predicts ``expected``; return the seconds taken.

    ``texts`` are the inputs of the ``column`` column: texts, or pixel lists (``column="pixels"``) for images.
    """
    started = time.perf_counter()
    model = tracking.load_pyfunc(model_uri)
    import pandas as pd

    got = model.predict(pd.DataFrame({column: texts}))["label"].tolist()
    mismatches = [i for i, (g, e) in enumerate(zip(got, expected)) if g != e]
    if len(got) != len(expected) or mismatches:
        raise ReleaseError(f"{model_uri}: served predictions differ from offline ones at rows {mismatches[:10]}")
    return time.perf_counter() - started


def release(
    name: str, version: str, gate_passed: bool, gate_reason: str,
    smoke: Callable[[str], float] | None = None,
) -> Release:
    """Promote ``version`` when the gate passed, smoke-test through the alias, revert on failure."""
    before = tracking.alias_version(name, "champion")
    if not gate_passed:
        return Release(promoted=False, reason=f"gate failed: {gate_reason}", champion_before=before, champion_after=before)
    if before == version:
        return Release(promoted=False, reason=f"v{version} is already the champion", champion_before=before, champion_after=before)
    previous_before = tracking.alias_version(name, "previous")
    promote(name, version)
    seconds = None
    if smoke is not None:
        try:
            seconds = smoke(f"models:/{name}@champion")
        except Exception as exc:
            restore_aliases(name, {"champion": before, "previous": previous_before})
            raise ReleaseError(f"smoke test of {name} v{version} failed, champion reverted to {before}: {exc}") from exc
    return Release(promoted=True, reason=gate_reason, champion_before=before, champion_after=version, smoke_seconds=seconds)
