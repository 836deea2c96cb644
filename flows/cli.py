"""The ``nightshift`` command line: run the pipeline, predict with a registered model, move aliases.

    nightshift run [--config configs/sst2.yaml] [--set key.sub=value ...] [--summary-json PATH] [--force]
    nightshift predict --model NAME [--alias champion] [--invert] TEXT_OR_IMAGE...
    nightshift promote --model NAME --version N
    nightshift rollback --model NAME

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

    return DataError, RecipeError


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
    test = ", ".join(f"{k}={v:.4f}" for k, v in summary["metrics"]["test"].items())
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
    names = result["label_name"] if "label_name" in result.columns else result["label"]
    for item, label, name, score in zip(args.texts, result["label"], names, result["score"]):
        print(json.dumps({key: item, "label": name, **({"class": label} if name != label else {}),
                          "score": round(float(score), 4)}))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from tasks.core import tracking
    from tasks.deploy import promote

    tracking.configure()
    before = promote(args.model, str(args.version))
    print(f"nightshift: {args.model} champion {before} -> {args.version}")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from tasks.core import tracking
    from tasks.deploy import rollback

    tracking.configure()
    before, after = rollback(args.model)
    print(f"nightshift: {args.model} champion {before} -> {after} (previous is now {before})")
    return 0


def _rest(args: argparse.Namespace) -> list[str]:
    return args.rest[1:] if args.rest[:1] == ["--"] else args.rest


def cmd_stack(args: argparse.Namespace) -> int:
    from infra.stack import main as stack_main

    return stack_main(_rest(args))


def cmd_schedule(args: argparse.Namespace) -> int:
    from flows.deployments import main as schedule_main

    return schedule_main(_rest(args))


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

    promote = sub.add_parser("promote", help="make a version the champion (the old one becomes 'previous')")
    promote.add_argument("--model", required=True)
    promote.add_argument("--version", required=True, type=int)
    promote.set_defaults(func=cmd_promote)

    rollback = sub.add_parser("rollback", help="swap 'champion' and 'previous'")
    rollback.add_argument("--model", required=True)
    rollback.set_defaults(func=cmd_rollback)

    # the service commands parse their own arguments (infra/stack.py, flows/deployments.py)
    stack = sub.add_parser("stack", add_help=False, help="PostgreSQL + Prefect server + MLflow server on loopback: "
                                                         "up | down | status | env (see `nightshift stack --help`)")
    stack.add_argument("rest", nargs=argparse.REMAINDER)
    stack.set_defaults(func=cmd_stack)
    schedule = sub.add_parser("schedule", add_help=False, help="serve one nightly deployment per recipe (blocks; "
                                                               "see `nightshift schedule --help`)")
    schedule.add_argument("rest", nargs=argparse.REMAINDER)
    schedule.set_defaults(func=cmd_schedule)
    return parser


SERVICE_COMMANDS = ("stack", "schedule")


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
    if not args.debug:
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
