"""The registry of task kinds: ``task:`` -> the kind package that implements it, and the recipe union.

This is the one module that reads ``recipe.task``. Adding a kind is a package with a ``config.py``
(its recipe class) and a ``kind.py`` (``KIND``), plus one line in each table below.
"""

from __future__ import annotations

import functools
import importlib
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import Discriminator, Tag, TypeAdapter, ValidationError

from tasks.core.config import RecipeError, apply_overrides, error_message, read_yaml
from tasks.core.kind import Kind
from tasks.multi.config import MultiRecipe
from tasks.text.config import TextRecipe
from tasks.tokens.config import TokenRecipe
from tasks.vision.config import ImageRecipe

DEFAULT_TASK = "text-classification"
KINDS = {"text-classification": "tasks.text.kind", "image-classification": "tasks.vision.kind",
         "token-classification": "tasks.tokens.kind", "multi-task": "tasks.multi.kind"}


def _task_of(value: Any) -> str:
    """The discriminator: a mapping's ``task`` (text-classification when omitted), a recipe's own."""
    if isinstance(value, dict):
        return value.get("task", DEFAULT_TASK)
    return getattr(value, "task", DEFAULT_TASK)


Recipe = Annotated[
    Union[Annotated[TextRecipe, Tag("text-classification")], Annotated[ImageRecipe, Tag("image-classification")],
          Annotated[TokenRecipe, Tag("token-classification")], Annotated[MultiRecipe, Tag("multi-task")]],
    Discriminator(_task_of, custom_error_type="invalid_task",
                  custom_error_message=f"task must be one of: {', '.join(KINDS)}"),
]
AnyRecipe = TextRecipe | ImageRecipe | TokenRecipe | MultiRecipe


@functools.cache
def _adapter() -> TypeAdapter:
    return TypeAdapter(Recipe)


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> AnyRecipe:
    """Validate a raw mapping as the recipe of its ``task``; errors name the source and every bad key."""
    try:
        return _adapter().validate_python(raw)
    except ValidationError as exc:
        raise RecipeError(error_message(exc, source, tags=tuple(KINDS))) from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> AnyRecipe:
    """Load a YAML recipe and apply ``--set`` overrides."""
    return recipe_from_dict(apply_overrides(read_yaml(path), overrides or []), source=str(path))


def teacher_recipes(recipe: AnyRecipe) -> dict[str, AnyRecipe]:
    """The teacher recipe of every task of a multi-task recipe with ``tasks.<t>.distill``, loaded with its
    ``teacher_set`` overrides (none for other recipes); errors name ``tasks.<t>.distill.teacher``."""
    out: dict[str, AnyRecipe] = {}
    for name, spec in (recipe.tasks.items() if isinstance(recipe, MultiRecipe) else ()):
        distill = getattr(spec, "distill", None)
        if distill is None:
            continue
        try:  # the loader's errors name the file
            teacher = load_recipe(distill.teacher, distill.teacher_set)
        except ValueError as exc:
            raise RecipeError(f"tasks.{name}.distill.teacher: {exc}") from None
        if teacher.task != spec.task:
            raise RecipeError(f"tasks.{name}.distill.teacher: {distill.teacher} is a {teacher.task} recipe; "
                              f"task {name} is {spec.task}")
        out[name] = teacher
    return out


def kind_of(recipe: AnyRecipe) -> Kind:
    """The kind that implements ``recipe.task`` (its stage modules are imported now, not before)."""
    return importlib.import_module(KINDS[recipe.task]).KIND


def kind_named(task: str) -> Kind:
    """The kind of a task name (as recorded in a model bundle)."""
    if task not in KINDS:
        raise ValueError(f"unknown task {task!r}: one of {', '.join(KINDS)}")
    return importlib.import_module(KINDS[task]).KIND
