"""Quiet, offline defaults shared by every entry point: ``nightshift``, ``python -m flows.<flow>``, ``prefect server``.

Without them Prefect's server sends analytics, MLflow logs telemetry errors offline, Hugging Face
tries the network, and a slow first start of Prefect's ephemeral server (SQLite migrations on two
cores) gives up early with a long "database is locked" traceback. Each default is set only when the
variable is unset, so the user's environment always wins. Nothing is set on import: entry points
call :func:`apply_defaults` first thing.

For a Prefect server started by hand, export the same defaults first::

    eval "$(python -m tasks.core.environment)"   # prints `export NAME=value` for each unset default
    prefect server start
"""

from __future__ import annotations

import os
import shlex
from collections.abc import MutableMapping

DEFAULTS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set every unset default in ``environ`` (``os.environ``); return the ones this call set."""
    env = os.environ if environ is None else environ
    applied = {key: value for key, value in DEFAULTS.items() if key not in env}
    env.update(applied)
    return applied


def exports(environ: MutableMapping[str, str] | None = None) -> str:
    """``export NAME=value`` lines for the defaults ``environ`` lacks (for ``eval`` in a shell)."""
    env = os.environ if environ is None else environ
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in DEFAULTS.items() if key not in env)


if __name__ == "__main__":
    print(exports(), end="")
