"""What every recipe shares: the section base, the data source, validation thresholds, the split,
training, the gate and the registry; and how recipes are read (YAML, ``--set`` overrides, errors).

Each kind adds its own recipe class (``tasks/<kind>/config.py``) from these sections and its own;
``tasks.registry`` joins them into one union discriminated by ``task``. Unknown keys are an error
everywhere (``extra="forbid"``), so a typo in a recipe fails loudly instead of being ignored.

The same models are the Prefect run form (the UI renders their descriptions), so the
descriptions are user interface: keep them short and exact.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

Arch = Literal["scratch", "pretrained"]


class Section(BaseModel):
    """Base of every recipe section: unknown keys are an error, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class DataSource(Section):
    """Where the labelled data is: the keys every kind's ``data`` section has."""

    train_path: str = Field(description="Training file, directory or glob (relative to the recipe's working directory).")
    test_path: str | None = Field(
        default=None, description="Held-out test file; when omitted a seeded stratified test split is taken from train."
    )
    labels: list[str] | None = Field(
        default=None, description="Allowed label set; rows with other labels are rejected. Null accepts every label seen in train."
    )
    max_rows: int | None = Field(default=None, ge=1, description="Read at most this many rows per file (debug knob).")

    # file extension -> format, per kind; ``format_for`` reads it (first match wins, ``.gz`` ignored)
    EXTENSION_FORMATS: ClassVar[dict[str, str]] = {}

    def format_for(self, path: str) -> str:
        """The file format of ``path``: the configured ``format``, else inferred from its extension."""
        configured = getattr(self, "format", None)
        if configured is not None:
            return configured
        name = path.lower().removesuffix(".gz")
        for ext, fmt in self.EXTENSION_FORMATS.items():
            if name.endswith(ext):
                return fmt
        choices = ", ".join(dict.fromkeys(self.EXTENSION_FORMATS.values()))
        raise ValueError(f"cannot infer the format of {path!r} from its extension: set data.format ({choices})")


class ValidateConfig(Section):
    """Thresholds above which validation fails the run (below them it warns)."""

    max_reject_fraction: float = Field(default=0.05, ge=0, le=1, description="Fail when more than this fraction of input rows is malformed.")
    max_empty_fraction: float = Field(default=0.05, ge=0, le=1, description="Fail when more than this fraction of texts is empty or whitespace (images: blank, one grey level).")
    max_conflict_fraction: float = Field(default=0.05, ge=0, le=1, description="Fail when more than this fraction of rows share a text (images: identical pixels) with a different label.")
    max_leakage_fraction: float = Field(default=0.05, ge=0, le=1, description="Fail when more than this fraction of test texts (images: identical pixels) also appear (normalised) in train.")
    max_truncation_rate: float = Field(default=0.5, ge=0, le=1, description="Fail when more than this fraction of texts exceeds tokenizer.max_length tokens.")
    min_class_fraction: float = Field(default=0.0, ge=0, le=1, description="Fail when the rarest class holds less than this fraction of train.")


class SplitConfig(Section):
    """Seeded stratified split into train / validation (/ test when no test file is given)."""

    validation_fraction: float = Field(default=0.1, gt=0, lt=0.5, description="Fraction of train held out for validation and early stopping.")
    test_fraction: float = Field(default=0.1, gt=0, lt=0.5, description="Fraction held out as test when data.test_path is not set.")
    seed: int = Field(default=13, description="Seed of the split.")


class ArchTrainConfig(Section):
    """The train keys a recipe may tune per encoder (``train.scratch`` / ``train.pretrained``); unset keys
    fall back to the plain ``train.*`` value or the arch default."""

    epochs: int | None = Field(default=None, ge=1, le=1000, description="Maximum number of epochs.")
    batch_size: int | None = Field(default=None, ge=1, le=8192, description="Examples per batch.")
    lr: float | None = Field(default=None, gt=0, le=1, description="Peak learning rate of the encoder.")
    head_lr: float | None = Field(default=None, gt=0, le=1, description="Peak learning rate of the task heads.")
    layer_lr_decay: float | None = Field(default=None, gt=0, le=1, description="Layer-wise LR decay (1: off).")
    weight_decay: float | None = Field(default=None, ge=0, le=1, description="Weight decay.")
    warmup_fraction: float | None = Field(default=None, ge=0, lt=1, description="Fraction of steps of linear warmup.")
    patience: int | None = Field(default=None, ge=1, description="Epochs without validation improvement before stopping.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimiser steps in total.")


class TrainConfig(Section):
    """Optimisation: AdamW (or Adam) with linear warmup, then linear decay (or a constant rate); early stopping on validation.

    Defaults that depend on the encoder (epochs, batch size, learning rates) are chosen per ``model.arch``
    when the recipe leaves them out (:data:`ARCH_DEFAULTS`).
    """

    epochs: int = Field(default=4, ge=1, le=1000, description="Maximum number of epochs (default per model.arch: scratch 4, pretrained 3).")
    batch_size: int = Field(default=64, ge=1, le=8192, description="Examples per batch (default per model.arch: scratch 64, pretrained 32).")
    lr: float = Field(default=1e-3, gt=0, le=1, description="Peak learning rate of the encoder (default per model.arch: scratch 1e-3, pretrained 1e-4).")
    head_lr: float | None = Field(
        default=None, gt=0, le=1, description="Peak learning rate of the task heads; null: the same as lr (pretrained default 1e-3)."
    )
    layer_lr_decay: float = Field(
        default=1.0, gt=0, le=1,
        description="Pretrained encoders: layer-wise LR decay; layer l of L gets lr * decay**(L+1-l), embeddings the lowest (1: off).",
    )
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
    ema_decay: float | None = Field(
        default=None, gt=0, lt=1,
        description="Validate and keep an exponential moving average of the weights with this decay (e.g. 0.999: "
                    "about the last 1,000 steps); null: the weights themselves.",
    )
    probe_fraction: float = Field(
        default=0.0, ge=0, lt=1,
        description="Linear probing, then fine-tuning (LP-FT): this fraction of the steps first trains the heads alone at "
                    "their peak rate, the encoder frozen; warmup and decay then run over the steps left. 0: off.",
    )
    seed: int = Field(default=13, description="Seed of initialisation, shuffling and dropout.")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto uses CUDA (bf16 autocast) when present, else CPU.")
    patience: int = Field(default=2, ge=1, description="Stop after this many epochs without validation improvement.")
    max_steps: int | None = Field(default=None, ge=1, description="Stop after this many optimiser steps in total (debug knob).")
    threads: int | None = Field(
        default=None, ge=1, le=512,
        description="torch CPU threads while training; null: OMP_NUM_THREADS when set, else half the machine's cores "
                    "(all of them thrash under any other load). Restored afterwards.",
    )
    scratch: ArchTrainConfig | None = Field(
        default=None,
        description="train.* values that apply only when model.arch is scratch, e.g. {lr: 0.0005, epochs: 8}: a recipe "
                    "tuned for its scratch model keeps that tuning out of a pretrained run. Plain train.* keys win over them.",
    )
    pretrained: ArchTrainConfig | None = Field(
        default=None, description="train.* values that apply only when model.arch is pretrained (plain train.* keys win)."
    )

# Training defaults per encoder, used for every train key a recipe leaves out. A pretrained encoder is
# fine-tuned: a small learning rate for its weights, a larger one for the fresh head, fewer epochs.
ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "scratch": {"epochs": 4, "batch_size": 64, "lr": 1e-3},
    "pretrained": {"epochs": 3, "batch_size": 32, "lr": 1e-4, "head_lr": 1e-3},
}


def train_section_for(arch: Arch, raw: dict[str, Any] | None) -> dict[str, Any]:
    """The raw ``train`` section completed for ``arch``.

    Precedence, lowest first: :data:`ARCH_DEFAULTS`, the recipe's ``train.<arch>`` block (its tuning for
    that encoder), then plain ``train.*`` keys, which hold for every arch (``--set train.epochs=1``).
    """
    raw = dict(raw or {})
    scoped = raw.get(arch) or {}
    if not isinstance(scoped, dict):
        return raw  # let validation name the bad value
    return {**ARCH_DEFAULTS[arch], **{k: v for k, v in scoped.items() if v is not None}, **raw}


def with_arch_defaults(raw: Any, default_arch: Arch, max_length: dict[str, int] | None = None) -> Any:
    """A raw recipe with its encoder-dependent defaults filled: ``model.arch`` (``default_arch`` when
    left out), the ``train`` section (:func:`train_section_for`) and, given ``max_length`` (per arch),
    ``tokenizer.max_length``. A section of the wrong type or an unknown arch is left for validation to name.
    """
    if not isinstance(raw, dict):
        return raw
    # a section given as an object (Python callers) counts with the keys it was given
    sections = [v.model_dump(exclude_unset=True, by_alias=True) if isinstance(v, BaseModel) else v
                for v in (raw.get(k) for k in ("model", "train", "tokenizer"))]
    if any(v is not None and not isinstance(v, dict) for v in sections):
        return raw
    model, train, tokenizer = sections
    model = {"arch": default_arch, **(model or {})}
    if model["arch"] not in ARCH_DEFAULTS:
        return {**raw, "model": model}
    out = {**raw, "model": model, "train": train_section_for(model["arch"], train)}
    if max_length is not None:
        out["tokenizer"] = {"max_length": max_length[model["arch"]], **(tokenizer or {})}
    return out


class EvaluateConfig(Section):
    """The release gate."""

    primary_metric: Literal["accuracy", "macro_f1"] = Field(default="accuracy", description="Metric the gate compares.")
    min_score: float = Field(default=0.5, ge=0, le=1, description="The challenger must reach this primary-metric score on test.")
    max_regression: float = Field(
        default=0.01, ge=0, le=1, description="The challenger may fall at most this far below the re-scored champion."
    )


class DeployConfig(Section):
    """Registry settings and the release checks: infra validation (a canary server), the live server, the lock."""

    model_name: str | None = Field(default=None, description="Registered model name; defaults to the recipe's name.")
    canary: bool = Field(
        default=True, description="Infra validation: serve the challenger in a real `nightshift serve` process on a free "
                                  "loopback port before champion moves; it must answer exactly the offline predictions.")
    canary_size: int = Field(default=32, ge=1, le=1000, description="Test inputs sent to the canary server (one request each, then one batch).")
    canary_start_timeout_s: float = Field(default=180.0, gt=0, le=3600, description="Seconds the canary server may take to load the model and answer /ready.")
    max_p99_ms: float = Field(default=5000.0, gt=0, le=600_000, description="Fail infra validation when the canary's p99 latency of single-input requests exceeds this (ms). Generous by default: on two shared cores a healthy scratch model has shown p99 ≈ 1.7 s.")
    max_rss_mb: float = Field(default=4096.0, gt=0, le=1_048_576, description="Fail infra validation when the canary server process uses more resident memory than this (MiB).")
    server_url: str | None = Field(
        default=None, pattern=r"^https?://[^\s/]+(/\S*)?$",
        description="A live `nightshift serve` for this model: after champion moves it is told to /reload and must "
                    "report the new version within switch_timeout_s, else the aliases go back.")
    switch_timeout_s: float = Field(default=60.0, gt=0, le=3600, description="Seconds the live server (server_url) may take to serve the new champion.")
    lock_timeout_s: float = Field(
        default=900.0, ge=0, le=86_400,
        description="Seconds a run waits for another run's release lock on the same model (0: refuse at once).")

class RecipeBase(Section):
    """What every kind's recipe has besides its own sections."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="Recipe name: the MLflow experiment and default model name.")
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate", description="Validation thresholds.")
    split: SplitConfig = Field(default_factory=SplitConfig, description="Split fractions and seed.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Training settings.")
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig, description="Release gate.")
    deploy: DeployConfig = Field(default_factory=DeployConfig, description="Registry settings.")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

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

def error_message(exc: ValidationError, source: str, tags: tuple[str, ...] = ()) -> str:
    """A pydantic error as one line naming the source and every bad key (``model.hidden: ...``).

    A union's tag (``tags``: the ``task`` values) leads pydantic's location, and follows a multi-task
    recipe's ``tasks.<name>``, but is no key a user wrote.
    """
    problems = []
    for err in exc.errors():
        loc = [str(p) for p in err["loc"]]
        if loc and loc[0] in tags:
            loc = loc[1:]
        if len(loc) > 2 and loc[0] == "tasks" and loc[2] in tags:
            del loc[2]
        problems.append(f"{'.'.join(loc) or '<root>'}: {err['msg']}")
    return f"{source}: invalid recipe: {'; '.join(problems)}"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The raw mapping of a YAML recipe file; RecipeError naming the file when it is missing or not a mapping."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise RecipeError(f"{path}: recipe file not found") from None
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping with at least name, task and data")
    return raw


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts to ``a.b.c`` keys (for MLflow params)."""
    if not isinstance(value, dict):
        return {prefix: value}
    out: dict[str, Any] = {}
    for key, item in value.items():
        out.update(flatten(item, f"{prefix}.{key}" if prefix else str(key)))
    return out
