"""The model server's settings: what to serve, where to bind, request limits, polling and threads.

Read, lowest first, from defaults, a YAML file's ``serve:`` section (``--config``), the environment
(``NIGHTSHIFT_SERVE_<FIELD>``, e.g. ``NIGHTSHIFT_SERVE_MAX_INPUTS=64``) and command-line flags. The
bearer token comes only from the environment (``NIGHTSHIFT_SERVE_TOKEN``), never from a flag or a file,
so it shows up in no process list and no checked-in config.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

ENV_PREFIX = "NIGHTSHIFT_SERVE_"
# POST /predict's request keys and the predictor input column each feeds; the canary and the benchmark
# build their requests from the same map
INPUT_KEYS = {"texts": "text", "pixels": "pixels", "tokens": "tokens"}
REQUEST_KEYS = {column: key for key, column in INPUT_KEYS.items()}


class ServeConfigError(ValueError):
    """A bad server setting: one line naming the setting and the problem."""


class ServeConfig(BaseSettings):
    """Settings of one ``nightshift serve`` process."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, extra="forbid")

    model: str = Field(min_length=1, description="Registered model name to serve (the recipe's name).")
    alias: str = Field(default="champion", min_length=1,
                       description="Registry alias to follow; ignored when `version` pins a version.")
    version: int | None = Field(default=None, ge=1,
                                description="Serve this registered version and never follow an alias.")
    host: str = Field(default="127.0.0.1", description="Interface to bind; loopback unless you mean to expose it.")
    port: int = Field(default=8080, ge=1, le=65535, description="TCP port to listen on.")
    poll_seconds: float = Field(default=10.0, ge=0.2, le=3600.0,
                                description="How often the alias is re-resolved in the registry; a moved alias is "
                                            "loaded, warmed and swapped in without a restart.")
    threads: int = Field(default=1, ge=1, le=256,
                         description="torch intra-op threads of the model calls (run in the event loop's thread, "
                                     "or in the inference thread with `inference_thread`). 1 on a 2-core host: the "
                                     "other core parses HTTP and JSON, and a second OpenMP thread stalls whenever "
                                     "that work (or anything else) takes its core; raise it on bigger hosts.")
    inference_thread: bool = Field(default=False,
                                   description="Run model calls in a thread of their own instead of the event loop's: "
                                               "/health and parsing stay responsive during long forward passes (big "
                                               "models), at one thread hand-off per batch.")
    max_batch: int = Field(default=64, ge=1, le=4096,
                           description="Most inputs one model call takes when concurrent requests are batched "
                                       "together (a single request larger than this still runs as one call).")
    max_inputs: int = Field(default=256, ge=1, le=100_000,
                            description="Most texts (images, token lists) in one request; more gets 422.")
    max_chars: int = Field(default=10_000, ge=1, le=10_000_000,
                           description="Most characters in one text (or in one token list, summed); more gets 422.")
    max_body_bytes: int = Field(default=1_000_000, ge=1024, le=1_000_000_000,
                                description="Most bytes in one request body; more gets 413 before it is parsed.")
    cache_dir: Path | None = Field(default=None,
                                   description="Where downloaded model versions are kept; default "
                                               "$NIGHTSHIFT_HOME/serving.")
    access_log: bool = Field(default=False, description="Log every request (uvicorn's access log).")
    token: SecretStr | None = Field(default=None,
                                    description="Bearer token every endpoint but /health and /ready requires; "
                                                "from NIGHTSHIFT_SERVE_TOKEN only.")

    @model_validator(mode="after")
    def _no_empty_token(self) -> ServeConfig:
        if self.token is not None and not self.token.get_secret_value().strip():
            self.token = None  # NIGHTSHIFT_SERVE_TOKEN="" means no token, not a token nobody can send
        return self


def _file_section(path: Path) -> dict[str, Any]:
    """The ``serve:`` section of a YAML file (or the whole file when it has no such key)."""
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ServeConfigError(f"{path}: cannot read the server config: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise ServeConfigError(f"{path}: not valid YAML: {str(exc).splitlines()[0]}") from None
    section = data.get("serve", data) if isinstance(data, dict) else None
    if not isinstance(section, dict):
        raise ServeConfigError(f"{path}: the `serve:` section must be a mapping of settings")
    if "token" in section:
        raise ServeConfigError(f"{path}: serve.token: set the token in the environment (NIGHTSHIFT_SERVE_TOKEN), "
                               "not in a file")
    return section


def load_serve_config(flags: dict[str, Any], path: Path | None = None) -> ServeConfig:
    """Defaults < the file's ``serve:`` section < ``NIGHTSHIFT_SERVE_*`` < ``flags`` (None values are unset).

    Raises ServeConfigError with one line naming the first bad setting.
    """
    values = {k: v for k, v in flags.items() if v is not None}
    if path is not None:
        for key, value in _file_section(path).items():
            if f"{ENV_PREFIX}{key.upper()}" not in os.environ:  # the environment beats the file, flags beat both
                values.setdefault(key, value)
    try:
        return ServeConfig(**values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "serve"
        source = f"{path}: " if path is not None else ""
        raise ServeConfigError(f"{source}serve.{where}: {first['msg']}") from None
