"""What the served multi-task bundle needs from the recipe: per task, its kind's predictor and serving facts."""

from __future__ import annotations

from typing import Any

from tasks.core.store import StageRef
from tasks.multi.config import MultiRecipe
from tasks.multi.train import view_refs
from tasks.registry import kind_of


def serving_facts(recipe: MultiRecipe, trained: StageRef) -> dict[str, Any]:
    """``serving.json`` of the bundle: per task its kind, its kind's predictor and that predictor's serving
    facts reading the task's head; ``metadata`` (the pyfunc's) lists the tasks and their kinds."""
    views = view_refs(trained)
    tasks = {}
    for name, sub in recipe.sub_recipes().items():
        kind = kind_of(sub)
        tasks[name] = {"task": kind.task, "predictor": kind.predictor,
                       "serving": {**kind.serving(sub, views[name]), "head": name}}
    return {"tasks": tasks, "encoder": trained.extra["encoder"],
            "metadata": {"tasks": {name: entry["task"] for name, entry in tasks.items()}}}
