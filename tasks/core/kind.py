"""The contract every task kind fulfils: one function per pipeline slot, and how its model is served.

A kind lives in its own package (``tasks/text``, ``tasks/vision``) and exposes ``KIND`` from its
``kind.py``; ``tasks.registry`` maps a recipe's ``task`` to it. Every slot function is store-level
and cached by fingerprint: ``(recipe, <input refs>, store, force) -> StageRef``, with
``extra["metrics"]`` and ``extra["log_files"]`` for MLflow, rows in = rows out + rows rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tasks.core.store import ArtifactStore, StageRef

StepCallback = Callable[[int, dict[str, float]], None]
# raw test inputs (texts, pixel rows) in, predicted label strings out: the champion loaded from the registry
ChampionScorer = Callable[[list[Any]], list[str]]


@dataclass(frozen=True)
class Kind:
    """One task kind: its stage functions and its served model."""

    name: str
    task: str  # the recipes' ``task`` value, recorded with every model of this kind
    ingest: Callable[[Any, ArtifactStore, bool], StageRef]
    validate: Callable[[Any, StageRef, ArtifactStore, bool], StageRef]
    clean: Callable[[Any, StageRef, ArtifactStore, bool], StageRef]
    split: Callable[[Any, StageRef, ArtifactStore, bool], StageRef]
    encode: Callable[[Any, StageRef, ArtifactStore, bool], StageRef]
    augment: Callable[[Any, StageRef, ArtifactStore, bool], StageRef]
    # (recipe, augmented, encoded, store, checkpoints_root, force, on_step, on_epoch)
    train: Callable[[Any, StageRef, StageRef, ArtifactStore, Path, bool, StepCallback | None, StepCallback | None], StageRef]
    # (recipe, trained, encoded, store, champion_version, champion_scorer, force)
    evaluate: Callable[[Any, StageRef, StageRef, ArtifactStore, str | None, ChampionScorer | None, bool], StageRef]
    input_column: str  # the served model's input column: "text", "pixels"
    predictor: str  # "module:Class" of the inference-only predictor (no Prefect, no pipeline config)
    bundle_files: tuple[str, ...]  # files of the trained stage that make up the served bundle
    serving: Callable[[Any, StageRef], dict[str, Any]]  # (recipe, trained) -> the bundle's serving.json
    examples: Callable[[StageRef, int], list[Any]]  # the first n raw test inputs of an encoded stage
