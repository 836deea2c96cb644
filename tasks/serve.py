"""``nightshift serve``: HTTP predictions from a registered model, following its alias without restarts.

    nightshift serve --model sst2                      # models:/sst2@champion on http://127.0.0.1:8080
    nightshift serve --model sst2 --alias challenger --port 8081
    nightshift serve --model sst2 --version 3          # pinned: never follows an alias
    python -m tasks.serve --model sst2                 # the same, without the rest of the CLI

    curl -s localhost:8080/predict -d '{"texts": ["a gripping, funny film"]}'

The registry is the one ``nightshift run`` writes to (``MLFLOW_TRACKING_URI``, else the embedded store
under ``NIGHTSHIFT_HOME``). Settings and limits: ``tasks.serving.config.ServeConfig`` (``--config FILE``
with a ``serve:`` section, ``NIGHTSHIFT_SERVE_*`` variables, these flags); ``NIGHTSHIFT_SERVE_TOKEN``
turns on the bearer token. Endpoints: ``tasks.serving.app``. Alias following: ``tasks.serving.holder``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from tasks.serving.config import ServeConfig, ServeConfigError, load_serve_config


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nightshift serve",
        description="Serve a registered model over HTTP (POST /predict, GET /health /ready /metrics, POST /reload); "
                    "it follows the alias in the registry and swaps new versions in without a restart.")
    parser.add_argument("--model", help="registered model name (the recipe's name), e.g. sst2")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alias", help="registry alias to follow (default: champion)")
    which.add_argument("--version", type=int, help="serve this version only; never follow an alias")
    parser.add_argument("--host", help="interface to bind (default: 127.0.0.1, loopback only)")
    parser.add_argument("--port", type=int, help="TCP port (default: 8080)")
    parser.add_argument("--poll-seconds", type=float, help="how often the alias is re-resolved (default: 10)")
    parser.add_argument("--threads", type=int, help="torch threads of the model calls (default: 1)")
    parser.add_argument("--inference-thread", action="store_true", default=None,
                        help="run model calls in their own thread (big models; default: in the event loop)")
    parser.add_argument("--max-batch", type=int, help="most inputs per model call when requests are batched (default: 64)")
    parser.add_argument("--max-inputs", type=int, help="most texts/images per request (default: 256)")
    parser.add_argument("--max-chars", type=int, help="most characters per text (default: 10000)")
    parser.add_argument("--max-body-bytes", type=int, help="most bytes per request body (default: 1000000)")
    parser.add_argument("--cache-dir", type=Path, help="downloaded versions (default: $NIGHTSHIFT_HOME/serving)")
    parser.add_argument("--access-log", action="store_true", default=None, help="log every request")
    parser.add_argument("--config", type=Path, help="YAML file whose `serve:` section holds these settings")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def config_from_args(args: argparse.Namespace) -> ServeConfig:
    flags = {key: getattr(args, key) for key in ("model", "alias", "version", "host", "port", "poll_seconds",
                                                  "threads", "inference_thread", "max_batch", "max_inputs", "max_chars", "max_body_bytes",
                                                  "cache_dir", "access_log")}
    return load_serve_config(flags, args.config)


def serve(config: ServeConfig, log_level: str = "info") -> None:
    """Configure MLflow and torch, build the app and run uvicorn until SIGINT/SIGTERM."""
    import torch
    import uvicorn

    from tasks.core import tracking
    from tasks.core.settings import get_settings
    from tasks.serving.app import create_app
    from tasks.serving.holder import ModelCache, ModelHolder

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a download is not a terminal session
    tracking.configure()
    torch.set_num_threads(config.threads)
    try:
        torch.set_num_interop_threads(1)  # inference runs no parallel ops of its own: one inter-op thread
    except RuntimeError:
        pass  # already fixed by an earlier parallel call in this process
    cache = ModelCache(config.cache_dir or get_settings().home / "serving")
    holder = ModelHolder(name=config.model, alias=None if config.version else config.alias,
                         version=str(config.version) if config.version else None, cache=cache,
                         poll_seconds=config.poll_seconds)
    app = create_app(config, holder)
    what = f"version {config.version}" if config.version else f"@{config.alias}"
    logging.getLogger("nightshift.serve").info("nightshift serve: %s %s on http://%s:%d (registry %s)", config.model,
                                               what, config.host, config.port, tracking.tracking_uri())
    uvicorn.run(app, host=config.host, port=config.port, log_level=log_level, access_log=config.access_log,
                lifespan="on", timeout_graceful_shutdown=10)


def main(argv: list[str] | None = None) -> int:
    from tasks.core.environment import apply_defaults

    args = build_parser().parse_args(argv)
    apply_defaults()
    try:
        config = config_from_args(args)
    except ServeConfigError as exc:
        print(f"nightshift serve: error: {exc}", file=sys.stderr)
        return 2
    serve(config, args.log_level)
    return 0


if __name__ == "__main__":
    sys.exit(main())
