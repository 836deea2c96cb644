"""Flow parameters and the command-line glue that turns a recipe path into them.

The recipe models themselves live in the kind packages, joined by ``tasks.registry`` (tasks must not import flows); Prefect renders
``Recipe`` as the typed run form in its UI, with each field's description as help text.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from tasks.core.environment import apply_defaults
from tasks.registry import AnyRecipe, load_recipe

DEFAULT_RECIPE = Path("configs/sst2.yaml")


def add_recipe_arguments(parser: argparse.ArgumentParser) -> None:
    """--config, --set and --force, shared by every command that runs a flow."""
    parser.add_argument("--config", type=Path, default=DEFAULT_RECIPE, help="recipe YAML (default: %(default)s)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.SUB=VALUE",
                        help="override a recipe key; the value is parsed as YAML (repeatable)")
    parser.add_argument("--force", action="store_true", help="ignore the fingerprint cache and recompute every stage")


def recipe_from_args(args: argparse.Namespace) -> AnyRecipe:
    return load_recipe(args.config, args.overrides)


def standalone(description: str) -> tuple[AnyRecipe, bool]:
    """Set up ``python -m flows.<flow>`` as ``nightshift`` is; parse its arguments: the recipe and --force.

    The quiet, offline defaults of every entry point (:func:`tasks.core.environment.apply_defaults`)
    come first. Prefect read its settings when the flow module imported it, so they are read again.
    """
    apply_defaults()
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()
    parser = argparse.ArgumentParser(description=description)
    add_recipe_arguments(parser)
    args = parser.parse_args()
    return recipe_from_args(args), args.force
