"""The ``nightshift`` command line: run the pipeline, predict with a registered model, move aliases.

    nightshift run [--config configs/sst2.yaml] [--set key.sub=value ...] [--summary-json PATH] [--force]
    nightshift predict --model NAME [--alias champion] [--invert] TEXT_OR_IMAGE...
    nightshift promote --model NAME --version N [--force --reason TEXT]
    nightshift rollback --model NAME [--to VERSION]
    nightshift history --model NAME [--json]
    nightshift score --model NAME [--alias champion] --input FILE --output OUT.parquet
    nightshift serve --model NAME [--alias champion | --version N] [--host 127.0.0.1] [--port 8080]

Errors a user can cause (a bad recipe, a missing file or column, a failed validation threshold)
print one line naming the file and the problem and exit 2; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from flows.params import add_recipe_arguments, recipe_from_args
from tasks.core.environment import DEFAULTS as _ENV_DEFAULTS  # noqa: F401  (quiet, offline defaults: one list for every entry point)


def _environment() -> None:
    """Set the unset quiet, offline defaults (the user's environment wins): ``tasks.core.environment``."""
    from tasks.core.environment import apply_defaults

    apply_defaults()


class _NoTracebacks(logging.Filter):
    """Drop the traceback from Prefect's run logs: the failure is reported in one line at the end."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def _quiet_tracebacks() -> None:
    import prefect  # noqa: F401  (configures Prefect's loggers first, so the filter is not replaced)

    for name in ("prefect.task_runs", "prefect.flow_runs", "prefect.flow_engine", "prefect.task_engine"):
        logging.getLogger(name).addFilter(_NoTracebacks())


def _user_errors() -> tuple[type[BaseException], ...]:
    from tasks.core.config import RecipeError
    from tasks.core.store import DataError
    from tasks.deploy import PromotionRefused

    return DataError, RecipeError, PromotionRefused


def _write_json(path: Path | None, value: dict[str, Any]) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value, indent=2, default=str))


def cmd_run(args: argparse.Namespace) -> int:
    from tasks.core.settings import get_settings

    started = time.time()
    recipe = recipe_from_args(args)
    settings = get_settings()
    print(f"nightshift: recipe {recipe.name} ({args.config}); NIGHTSHIFT_HOME={settings.home}", flush=True)
    from flows.pipeline import pipeline

    try:
        summary = pipeline(recipe, args.force)
    except BaseException as exc:
        _write_json(args.summary_json, {"status": "failed", "recipe": recipe.name, "error": f"{type(exc).__name__}: {exc}",
                                        "timings_s": {"total": round(time.time() - started, 3)}})
        raise
    _write_json(args.summary_json, summary)
    uri = summary["mlflow"]["tracking_uri"]
    from tasks.core.config import flatten  # multi-task summaries nest metrics per task

    test = ", ".join(f"{k}={v:.4f}" for k, v in flatten(summary["metrics"]["test"]).items())
    decision = summary["decision"]
    print(f"\nnightshift: {recipe.name} test {test}")
    print(f"nightshift: model {summary['model']['uri']}: {'PROMOTED to champion' if decision['promoted'] else 'not promoted'}"
          f" ({decision['reason']})")
    print(f"nightshift: MLflow store {uri} (experiment {summary['mlflow']['experiment_id']}, "
          f"run {summary['mlflow']['parent_run_id']})")
    if uri.startswith("sqlite"):
        print(f"nightshift: browse it with: mlflow ui --backend-store-uri {uri}")
    return 0


IMAGE_SUFFIXES = (".png", ".pgm", ".pnm", ".ppm", ".pbm", ".bmp", ".gif", ".jpg", ".jpeg", ".tif", ".tiff", ".webp")
DEFAULT_IMAGE_SHAPE = (28, 28)


def _is_image_file(path: Path) -> bool:
    """An existing file with an image suffix, or any file Pillow recognises as an image."""
    if not path.is_file():
        return False
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return True
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path):
            return True
    except (UnidentifiedImageError, OSError):
        return False


def image_pixels(path: Path, shape: tuple[int, int] = DEFAULT_IMAGE_SHAPE, invert: bool = False) -> list[int]:
    """An image file as 8-bit greyscale pixels, resized to ``shape`` (H, W) when it differs, row-major."""
    from PIL import Image, UnidentifiedImageError

    from tasks.core.store import DataError

    try:
        with Image.open(path) as image:
            grey = image.convert("L")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"{path}: not an image Pillow can read: {exc}") from None
    height, width = shape
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.Resampling.BILINEAR)
    pixels = [int(v) for v in grey.tobytes()]
    return [255 - v for v in pixels] if invert else pixels


def cmd_predict(args: argparse.Namespace) -> int:
    import pandas as pd

    from tasks.core import tracking
    from tasks.core.store import DataError

    tracking.configure()
    missing = [item for item in args.texts if Path(item).suffix.lower() in IMAGE_SUFFIXES and not Path(item).exists()]
    if missing:
        raise DataError(f"{missing[0]}: image file not found")
    model = tracking.load_pyfunc(f"models:/{args.model}@{args.alias}")
    images = [_is_image_file(Path(item)) for item in args.texts]
    if any(images):
        if not all(images):
            texts = [item for item, image in zip(args.texts, images) if not image]
            raise DataError(f"predict: give image files or texts, not both (not image files: {texts[:3]})")
        meta = getattr(model.metadata, "metadata", None) or {}
        if meta.get("task", "image-classification") != "image-classification":
            raise DataError(f"predict: {args.model} is a {meta['task']} model: pass texts, not image files")
        shape = tuple(meta.get("image_shape") or DEFAULT_IMAGE_SHAPE)
        pixels = [image_pixels(Path(item), shape, args.invert) for item in args.texts]
        result = model.predict(pd.DataFrame({"pixels": pixels}))
        key = "image"
    else:
        result = model.predict(pd.DataFrame({"text": args.texts}))
        key = "text"
    if "entities" in result.columns:  # a token model: the entities with their character offsets
        for item, entities in zip(args.texts, result["entities"]):
            print(json.dumps({key: item, "entities": list(entities)}, default=str, ensure_ascii=False))
        return 0
    if "score" not in result.columns:  # a model of several heads (multi-task): every column, per task
        for item, row in zip(args.texts, result.to_dict("records")):
            print(json.dumps({key: item, **row}, default=str, ensure_ascii=False))
        return 0
    names = result["label_name"] if "label_name" in result.columns else result["label"]
    for item, label, name, score in zip(args.texts, result["label"], names, result["score"]):
        print(json.dumps({key: item, "label": name, **({"class": label} if name != label else {}),
                          "score": round(float(score), 4)}))
    return 0


def _deploy_config(args: argparse.Namespace) -> Any:
    from tasks.core.config import DeployConfig

    return DeployConfig(canary=not getattr(args, "no_canary", False), server_url=getattr(args, "server_url", None),
                        **({"lock_timeout_s": args.lock_timeout} if getattr(args, "lock_timeout", None) is not None
                           else {}))


def cmd_promote(args: argparse.Namespace) -> int:
    from tasks.core import tracking
    from tasks.deploy import promote_checked

    tracking.configure()
    outcome = promote_checked(args.model, str(args.version), _deploy_config(args), args.force, args.reason)
    if not outcome.promoted:
        print(f"nightshift: {args.model}: {outcome.reason}")
        return 0
    canary = outcome.canary or {}
    checked = (f"; canary p99 {canary['p99_ms']:.1f} ms, {canary['rss_mb']:.0f} MiB" if canary.get("p99_ms") is not None
               else "")
    print(f"nightshift: {args.model} champion {outcome.champion_before} -> {outcome.champion_after}{checked}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from tasks.core import tracking
    from tasks.deploy import rollback_locked

    tracking.configure()
    before, after = rollback_locked(args.model, None if args.to is None else str(args.to), _deploy_config(args),
                                    args.reason or "")
    print(f"nightshift: {args.model} champion {before} -> {after} (previous is now {before})")
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    from tasks.core import history, tracking

    tracking.configure()
    if not tracking.model_exists(args.model):
        from tasks.core.store import DataError

        raise DataError(f"history: no registered model {args.model!r} in {tracking.tracking_uri()}")
    moves = history.moves(args.model)
    if args.json:
        print(json.dumps([m.model_dump(exclude={"key"}) for m in moves], indent=2))
    elif not moves:
        print(f"nightshift: {args.model}: no alias moves recorded")
    else:
        print(history.table(moves))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from flows.score import score

    result = score(args.model, str(args.input), str(args.output), args.alias, args.batch_size, args.id_column,
                   args.input_column)
    print(f"nightshift: scored {result['rows_scored']} of {result['rows_in']} rows with {args.model} "
          f"v{result['model_version']} -> {result['output']} ({result['rows_rejected']} rejected"
          + (f" -> {result['rejects']}" if result["rows_rejected"] else "") + ")")
    return 0


def _rest(args: argparse.Namespace) -> list[str]:
    return args.rest[1:] if args.rest[:1] == ["--"] else args.rest


def cmd_stack(args: argparse.Namespace) -> int:
    from infra.stack import main as stack_main

    return stack_main(_rest(args))


def cmd_schedule(args: argparse.Namespace) -> int:
    from flows.deployments import main as schedule_main

    return schedule_main(_rest(args))


def cmd_serve(args: argparse.Namespace) -> int:
    from tasks.serve import main as serve_main

    return serve_main(_rest(args))


def _use_running_stack() -> None:
    """A healthy stack under NIGHTSHIFT_HOME supplies the server variables the environment leaves unset,
    so a user who only runs `nightshift ...` needs no exports."""
    from infra.stack import stack_env

    for key, value in stack_env().items():
        os.environ.setdefault(key, value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nightshift", description="Nightly, reproducible text-model retraining.")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run the whole pipeline once")
    add_recipe_arguments(run)
    run.add_argument("--summary-json", type=Path, help="write the run summary (status, recipe, mlflow, data, metrics, model, decision, cache, timings_s) to this file")
    run.set_defaults(func=cmd_run)

    predict = sub.add_parser("predict", help="predict with a registered model")
    predict.add_argument("--model", required=True, help="registered model name (the recipe's name by default)")
    predict.add_argument("--alias", default="champion", help="registry alias (default: %(default)s)")
    predict.add_argument("--invert", action="store_true",
                         help="image files hold dark digits on a light background: invert them (MNIST digits are "
                              "white on black)")
    predict.add_argument("texts", nargs="+", metavar="TEXT_OR_IMAGE",
                         help="texts, or image files (PNG, PGM, ... read as 8-bit greyscale, resized to the model's "
                              "image size) for an image model")
    predict.set_defaults(func=cmd_predict)

    promote = sub.add_parser("promote", help="make a version the champion after infra validation (the old one "
                                             "becomes 'previous'); refuses a version whose gate failed")
    promote.add_argument("--model", required=True)
    promote.add_argument("--version", required=True, type=int)
    promote.add_argument("--force", action="store_true", help="promote even though the version's release gate failed")
    promote.add_argument("--reason", help="why (recorded in the alias history; say it when forcing)")
    promote.add_argument("--no-canary", action="store_true",
                         help="skip infra validation in a fresh `nightshift serve` process (load it here instead)")
    promote.add_argument("--server-url", help="a live `nightshift serve` that must switch to the version (else reverted)")
    promote.add_argument("--lock-timeout", type=float, help="seconds to wait for the model's release lock (default 900)")
    promote.set_defaults(func=cmd_promote)

    rollback = sub.add_parser("rollback", help="move 'champion' one step back in its alias history (twice: two steps)")
    rollback.add_argument("--model", required=True)
    rollback.add_argument("--to", type=int, help="roll back to this version instead")
    rollback.add_argument("--reason", help="why (recorded in the alias history)")
    rollback.add_argument("--lock-timeout", type=float, help="seconds to wait for the model's release lock (default 900)")
    rollback.set_defaults(func=cmd_rollback)

    history = sub.add_parser("history", help="every alias move of a model, oldest first (from the registry)")
    history.add_argument("--model", required=True)
    history.add_argument("--json", action="store_true", help="print JSON instead of a table")
    history.set_defaults(func=cmd_history)

    score = sub.add_parser("score", help="batch-score a file with a registered model (a Prefect flow)")
    score.add_argument("--model", required=True)
    score.add_argument("--alias", default="champion", help="registry alias (default: %(default)s)")
    score.add_argument("--input", required=True, type=Path, help="csv, tsv, jsonl or parquet file (optionally .gz "
                                                                  "for csv/tsv/jsonl)")
    score.add_argument("--output", required=True, type=Path, help="Parquet file to write; rejects go next to it "
                                                                   "(<name>.rejects.parquet)")
    score.add_argument("--batch-size", type=int, default=1024, help="rows per batch (default: %(default)s)")
    score.add_argument("--id-column", default="id", help="column holding row ids (default: %(default)s; missing: "
                                                         "'<file name>:<row>')")
    score.add_argument("--input-column", help="column holding the inputs (default: the model's: text or pixels)")
    score.set_defaults(func=cmd_score)

    # the service commands parse their own arguments (infra/stack.py, flows/deployments.py, tasks/serve.py)
    stack = sub.add_parser("stack", add_help=False, help="PostgreSQL + Prefect server + MLflow server on loopback: "
                                                         "up | down | status | env (see `nightshift stack --help`)")
    stack.add_argument("rest", nargs=argparse.REMAINDER)
    stack.set_defaults(func=cmd_stack)
    schedule = sub.add_parser("schedule", add_help=False, help="serve one nightly deployment per recipe (blocks; "
                                                               "see `nightshift schedule --help`)")
    schedule.add_argument("rest", nargs=argparse.REMAINDER)
    schedule.set_defaults(func=cmd_schedule)
    serve = sub.add_parser("serve", add_help=False, help="HTTP predictions from a registered model, following its "
                                                         "alias (see `nightshift serve --help`)")
    serve.add_argument("rest", nargs=argparse.REMAINDER)
    serve.set_defaults(func=cmd_serve)
    return parser


SERVICE_COMMANDS = ("stack", "schedule", "serve")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    first = next((i for i, a in enumerate(argv) if a != "--debug"), None)
    if first is not None and argv[first] in SERVICE_COMMANDS:
        # argparse's REMAINDER drops a leading option (`stack --help`): hand the rest over untouched
        argv = [*argv[:first + 1], "--", *argv[first + 1:]]
    args = build_parser().parse_args(argv)
    _environment()
    if args.command != "stack":
        _use_running_stack()
    if not args.debug and args.command != "serve":  # the server never imports Prefect (start-up time, memory)
        _quiet_tracebacks()
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("nightshift: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if args.debug:
            traceback.print_exc()
        kind = "error" if isinstance(exc, _user_errors()) else f"failed ({type(exc).__name__})"
        print(f"nightshift: {kind}: {exc}", file=sys.stderr)
        return 2 if kind == "error" else 1


if __name__ == "__main__":
    sys.exit(main())
