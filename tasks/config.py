"""Typed recipe: one pydantic model per concern, loaded from a YAML file in ``configs/``.

A recipe is ``name``, ``task`` and the ``data`` keys its files need; every other section has
defaults that suit a CPU run of a few minutes. Unknown keys are an error everywhere
(``extra="forbid"``), so a typo in a recipe fails loudly instead of being ignored.

The same models are the Prefect run form (the UI renders their descriptions), so the
descriptions are user interface: keep them short and exact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, model_validator

from models.mlp import MLPConfig
from models.transformer import TransformerConfig

TaskType = Literal["text-classification", "image-classification"]
DataFormat = Literal["csv", "tsv", "jsonl", "parquet", "conll", "idx"]

_EXTENSION_FORMATS: dict[str, DataFormat] = {
    ".csv": "csv",
    ".tsv": "tsv",
    ".txt": "tsv",
    ".label": "tsv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".conll": "conll",
    ".idx": "idx",
    ".ubyte": "idx",
}


class Section(BaseModel):
    """Base of every recipe section: unknown keys are an error, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataConfig(Section):
    """Where the labelled data is and how to read it."""

    train_path: str = Field(description="Training file, directory or glob (relative to the recipe's working directory).")
    test_path: str | None = Field(
        default=None, description="Held-out test file; when omitted a seeded stratified test split is taken from train."
    )
    format: DataFormat | None = Field(
        default=None, description="File format: csv, tsv, jsonl, parquet, conll or idx. Inferred from the extension when omitted."
    )
    has_header: bool = Field(default=True, description="Whether csv/tsv files start with a header line.")
    columns: list[str] | None = Field(
        default=None, description="Column names for a headerless csv/tsv file, in file order."
    )
    delimiter: str | None = Field(
        default=None,
        description="Field separator for tsv-style files (default tab). Splits at most len(columns)-1 times, so the last column may contain it.",
    )
    text_column: str = Field(default="text", description="Column holding the input text.")
    label_column: str = Field(default="label", description="Column holding the label (read as a string).")
    label_pattern: str | None = Field(
        default=None,
        description="Optional regex applied to the raw label; its first group becomes the label (e.g. '^([A-Z]+):' for TREC coarse classes). Non-matching rows are rejected.",
    )
    labels: list[str] | None = Field(
        default=None, description="Allowed label set; rows with other labels are rejected. Null accepts every label seen in train."
    )
    encoding: str = Field(default="utf-8", description="Text encoding; undecodable bytes are replaced and counted.")
    max_rows: int | None = Field(default=None, ge=1, description="Read at most this many rows per file (debug knob).")
    train_labels_path: str | None = Field(
        default=None,
        description="Image recipes: IDX labels file of train_path. Null derives it from the images file name "
        "('train-images-idx3-ubyte.gz' -> 'train-labels-idx1-ubyte.gz', in the same folder).",
    )
    test_labels_path: str | None = Field(
        default=None,
        description="Image recipes: IDX labels file of test_path. Null derives it from the images file name "
        "('t10k-images-idx3-ubyte.gz' -> 't10k-labels-idx1-ubyte.gz', in the same folder).",
    )

    @model_validator(mode="after")
    def _columns_for_headerless(self) -> DataConfig:
        if self.format in ("csv", "tsv") and not self.has_header and not self.columns:
            raise ValueError("data.columns is required when data.has_header is false")
        if self.columns is not None and len(set(self.columns)) != len(self.columns):
            raise ValueError(f"data.columns has duplicate names: {self.columns}")
        return self

    def format_for(self, path: str) -> DataFormat:
        """The file format of ``path``: the configured one, else inferred from its extension."""
        if self.format is not None:
            return self.format
        name = path.lower().removesuffix(".gz")
        for ext, fmt in _EXTENSION_FORMATS.items():
            if name.endswith(ext):
                return fmt
        raise ValueError(f"cannot infer the format of {path!r} from its extension: set data.format")


class ValidateConfig(Section):
    """Thresholds above which validation fails the run (below them it warns)."""

    max_reject_fraction: float = Field(default=0.05, ge=0, le=1, description="Fail when more than this fraction of input rows is malformed.")
    max_empty_fraction: float = Field(default=0.05, ge=0, le=1, description="Fail when more than this fraction of texts is empty or whitespace (images: blank, one grey level).")
    max_conflict_fraction: float = Field(default=0.05, ge=0, le=1, description="Fail when more than this fraction of rows share a text (images: identical pixels) with a different label.")
    max_leakage_fraction: float = Field(default=0.05, ge=0, le=1, description="Fail when more than this fraction of test texts (images: identical pixels) also appear (normalised) in train.")
    max_truncation_rate: float = Field(default=0.5, ge=0, le=1, description="Fail when more than this fraction of texts exceeds tokenizer.max_length tokens.")
    min_class_fraction: float = Field(default=0.0, ge=0, le=1, description="Fail when the rarest class holds less than this fraction of train.")


class CleanConfig(Section):
    """Text normalisation and row filters; every dropped row goes to rejects with its reason.

    Image recipes use ``dedupe`` and ``drop_conflicts`` (identical pixels) and always drop blank images.
    """

    lowercase: bool = Field(default=False, description="Lower-case every text.")
    strip_html: bool = Field(default=True, description="Remove HTML tags and unescape entities.")
    min_chars: int = Field(default=1, ge=0, description="Reject texts shorter than this after cleaning.")
    max_chars: int = Field(default=5000, ge=1, description="Reject texts longer than this after cleaning.")
    dedupe: bool = Field(default=True, description="Drop exact duplicates (same normalised text and label), keeping the first.")
    drop_conflicts: bool = Field(default=True, description="Drop every row whose normalised text appears with more than one label.")


class SplitConfig(Section):
    """Seeded stratified split into train / validation (/ test when no test file is given)."""

    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5, description="Fraction of train held out for validation and early stopping.")
    test_fraction: float = Field(default=0.1, gt=0, lt=0.5, description="Fraction held out as test when data.test_path is not set.")
    seed: int = Field(default=13, description="Seed of the split.")


class TokenizerConfig(Section):
    """Tokenizer trained on the train split only: WordPiece (default) or whole words."""

    model: Literal["wordpiece", "wordlevel"] = Field(
        default="wordpiece",
        description="wordpiece: unseen words are split into known pieces; wordlevel: whole words, and any word "
                    "seen fewer than min_frequency times in train (or never) becomes [UNK].",
    )
    vocab_size: int = Field(default=16000, ge=100, le=200_000, description="Vocabulary size (at most; special tokens included).")
    min_frequency: int = Field(default=2, ge=1, description="Minimum train count for a word piece (or word) to enter the vocabulary.")
    lowercase: bool = Field(default=True, description="Lower-case inside the tokenizer (BERT-uncased style).")
    max_length: int = Field(default=64, ge=8, le=4096, description="Sequences are truncated to this many tokens, [CLS] and [SEP] included.")


class AugmentConfig(Section):
    """Seeded augmentation of the train split: EDA-style for text (swap, delete, insert); random
    shifts and small rotations for images."""

    enabled: bool = Field(default=False, description="Add augmented copies of train rows.")
    copies: int = Field(default=1, ge=1, le=16, description="Augmented copies per original row.")
    p: float = Field(default=0.1, gt=0, le=0.5, description="Text: fraction of words touched by each operation.")
    operations: list[Literal["swap", "delete", "insert"]] = Field(
        default=["swap", "delete", "insert"], min_length=1, description="Text: operations to draw from, one per copy."
    )
    shift_px: int = Field(default=2, ge=0, le=8, description="Images: largest random shift in whole pixels, along each axis.")
    rotate_deg: float = Field(default=10.0, ge=0, le=45, description="Images: largest random rotation in degrees, either way.")
    seed: int = Field(default=13, description="Seed of the augmentation.")


class TrainConfig(Section):
    """Optimisation: AdamW (or Adam) with linear warmup, then linear decay (or a constant rate); early stopping on validation."""

    epochs: int = Field(default=4, ge=1, le=1000, description="Maximum number of epochs.")
    batch_size: int = Field(default=64, ge=1, le=8192, description="Examples per batch.")
    lr: float = Field(default=1e-3, gt=0, le=1, description="Peak learning rate.")
    optimizer: Literal["adamw", "adam"] = Field(
        default="adamw",
        description="adamw: decoupled weight decay, betas (0.9, 0.98); adam: torch's Adam defaults, weight_decay as an L2 penalty.",
    )
    weight_decay: float = Field(default=0.01, ge=0, le=1, description="Weight decay (not applied to biases, norms and embeddings).")
    schedule: Literal["linear", "constant"] = Field(
        default="linear", description="Learning rate after warmup: linear decay to 0, or constant."
    )
    warmup_fraction: float = Field(default=0.1, ge=0, lt=1, description="Fraction of steps spent warming the learning rate up linearly.")
    label_smoothing: float = Field(default=0.0, ge=0, lt=1, description="Cross-entropy label smoothing (0: plain cross-entropy).")
    grad_clip: float | None = Field(default=1.0, gt=0, description="Clip the gradient norm to this value; null: no clipping.")
    seed: int = Field(default=13, description="Seed of initialisation, shuffling and dropout.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto uses CUDA (bf16 autocast) when present, else CPU.")
    patience: int = Field(default=2, ge=1, description="Stop after this many epochs without validation improvement.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimiser steps in total (debug knob).")
    num_threads: int | None = Field(default=None, ge=1, description="torch CPU threads; null keeps torch's default.")


class EvaluateConfig(Section):
    """The release gate."""

    primary_metric: Literal["accuracy", "macro_f1"] = Field(default="accuracy", description="Metric the gate compares.")
    min_score: float = Field(default=0.5, ge=0, le=1, description="The challenger must reach this primary-metric score on test.")
    max_regression: float = Field(
        default=0.01, ge=0, le=1, description="The challenger may fall at most this far below the re-scored champion."
    )


class DeployConfig(Section):
    """Registry settings."""

    model_name: str | None = Field(default=None, description="Registered model name; defaults to the recipe's name.")


DEFAULT_IMAGE_MODEL = "variant"
_MODEL_TAGS = ("transformer", "image")


def _model_tag(value: Any) -> str:
    """Which model config a ``model`` section is: the image one when it names a ``kind``
    (document, variant or cnn; an unknown kind is left to the image config to name the allowed ones)."""
    if isinstance(value, MLPConfig) or (isinstance(value, dict) and "kind" in value):
        return "image"
    return "transformer"


ModelConfig = Annotated[
    Annotated[TransformerConfig, Tag("transformer")] | Annotated[MLPConfig, Tag("image")],
    Discriminator(_model_tag),
]


class Recipe(Section):
    """A whole Nightshift recipe: what to train on, how, and how to release it."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Recipe name: the MLflow experiment and default model name.")
    task: TaskType = Field(default="text-classification", description="What the model predicts.")
    data: DataConfig
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate", description="Validation thresholds.")
    clean: CleanConfig = Field(default_factory=CleanConfig, description="Cleaning rules.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Split fractions and seed.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer settings.")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Augmentation settings.")
    model: ModelConfig = Field(
        default_factory=TransformerConfig,
        description="Model architecture: the transformer for text; for images model.kind picks document, variant or cnn.",
    )
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Release gate.")
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="Registry settings.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _image_model_by_default(cls, raw: Any) -> Any:
        """An image recipe's model section is an image model even when it names no ``kind``."""
        if isinstance(raw, dict) and raw.get("task") == "image-classification":
            model = raw.get("model")
            if model is None:
                raw = {**raw, "model": {"kind": DEFAULT_IMAGE_MODEL}}
            elif isinstance(model, dict) and "kind" not in model:
                raw = {**raw, "model": {"kind": DEFAULT_IMAGE_MODEL, **model}}
        return raw

    @model_validator(mode="after")
    def _task_fits_model_and_data(self) -> Recipe:
        image = self.task == "image-classification"
        if image and not isinstance(self.model, MLPConfig):
            raise ValueError("model: image-classification needs an image model (model.kind: document, variant or cnn)")
        if not image and isinstance(self.model, MLPConfig):
            raise ValueError(f"model.kind: {self.model.kind!r} is an image model; {self.task} uses the transformer "
                             "(remove model.kind)")
        if image and self.data.format not in (None, "idx"):
            raise ValueError(f"data.format: image-classification reads IDX files (idx), not {self.data.format}")
        if not image and (self.data.train_labels_path or self.data.test_labels_path):
            raise ValueError("data.train_labels_path / data.test_labels_path: only image-classification recipes have "
                             "separate labels files")
        return self

    @property
    def model_name(self) -> str:
        """Registered model name."""
        return self.deploy.model_name or self.name

    def as_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict with the YAML key names."""
        return self.model_dump(mode="json", by_alias=True)

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of the whole recipe."""
        return hashlib.sha256(canonical_json(self.as_dict()).encode()).hexdigest()


class RecipeError(ValueError):
    """A recipe that cannot be loaded; the message names the file and the key."""


def canonical_json(value: Any) -> str:
    """Deterministic JSON: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def parse_override(item: str) -> tuple[list[str], Any]:
    """Split ``key.sub=value`` into a key path and a YAML-parsed value."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected key.sub=value")
    key, raw = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError(f"--set {item!r}: empty key")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``raw`` with every ``key.sub=value`` override applied."""
    result = json.loads(json.dumps(raw))
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[path[-1]] = value
    return result


def recipe_from_dict(raw: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a raw mapping as a Recipe; errors name the source and every bad key."""
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(f"{_error_location(err['loc'])}: {err['msg']}" for err in exc.errors())
        raise RecipeError(f"{source}: invalid recipe: {problems}") from None


def _error_location(loc: tuple[Any, ...]) -> str:
    """``model.image.hidden`` -> ``model.hidden``: the union's tag is no key a user wrote."""
    parts = [str(p) for p in loc]
    if len(parts) >= 2 and parts[0] == "model" and parts[1] in _MODEL_TAGS:
        del parts[1]
    return ".".join(parts) or "<root>"


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe and apply ``--set`` overrides."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping with at least name, task and data")
    return recipe_from_dict(apply_overrides(raw, overrides or []), source=str(path))


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to ``a.b.c`` keys (for MLflow params)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out
