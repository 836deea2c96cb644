"""Stage: train (multi-task). One shared encoder (scratch or pretrained) with one head per task, trained on
batches drawn across the tasks (``multitask.sampling``) with loss ``sum_t w_t * L_t`` (``tasks.<t>.loss_weight``).
A task's batches have its own ``tasks.<t>.train.batch_size`` and its head learns at its own
``tasks.<t>.train.head_lr``; the schedule is shared. One AdamW takes every step, or, with
``multitask.optimizer: per_task``, each task's own AdamW over the encoder and its head takes the steps of
that task's batches, with the encoder at ``tasks.<t>.train.lr``: a task's moments then hold its own
gradients only, so the update a step makes is scaled as in that task's single-task training.

Per step the fit loop's ``train_loss`` / ``lr`` / ``grad_norm`` are logged with ``<task>.train_loss`` (the
task of that step's batch); per epoch every task's train loss and validation metrics as
``<task>.train_loss`` and ``<task>.val_<metric>``. Early stopping and the best epoch use
``selection_score``: the mean (or ``multitask.selection_weights``-weighted mean) of the tasks'
validation primary metrics.

Besides the shared model (``model.pt``: heads named by task), the stage writes for every task
``views/<task>/``: the same weights restricted to that task's head under the name its kind's single-task
model uses, with the kind's bundle files, so that the kind's own evaluate stage scores it unchanged; and
``heads/<task>/``: those files without the weights, which the served bundle carries.

Run alone: ``python -m flows.train_model --config configs/multitask.yaml`` (after prepare_data).
"""

from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.encoders import (
    PretrainedEncoder,
    ScratchEncoder,
    checkpoint_digest,
    resolve_pretrained,
)
from models.multitask import MultiTaskModel, param_groups
from tasks.core.batching import Loader
from tasks.core.config import TrainConfig
from tasks.core.fit import MODEL_FILE, STAGE, StepCallback, fit_loader, store_trained
from tasks.core.store import ArtifactStore, StageRef, stage_key
from tasks.multi.adapters import adapter_for
from tasks.multi.config import MultiRecipe
from tasks.multi.prep import task_refs
from tasks.multi.sampling import multitask_loader
from tasks.registry import kind_of

SELECTION = "selection_score"  # the validation number early stopping and the best epoch use
VIEWS_DIR = "views"
HEADS_DIR = "heads"
SPECIAL_IDS = ("pad_id", "unk_id", "cls_id", "sep_id", "mask_id")


def train_config(recipe: MultiRecipe) -> dict[str, Any]:
    """What decides the weights besides the data: encoder, training, sampling, loss weights, selection, and
    each task's primary metric and per-task settings its head depends on."""
    train = recipe.train.model_dump(mode="json", exclude={"threads", "scratch", "pretrained"})
    model = recipe.model.model_dump(mode="json")
    if recipe.model.arch == "pretrained":
        model["checkpoint_sha256"] = checkpoint_digest(resolve_pretrained(recipe.model.pretrained))
    tasks = {name: {"task": spec.task, "loss_weight": spec.loss_weight,
                    "head": spec.head.model_dump(mode="json", exclude_unset=True) if getattr(spec, "head", None) else None,
                    "train": spec.train.model_dump(mode="json", exclude_none=True),
                    "primary_metric": sub.evaluate.primary_metric}
             for (name, spec), sub in zip(recipe.tasks.items(), recipe.sub_recipes().values())}
    for name, spec in recipe.tasks.items():
        if (distill := getattr(spec, "distill", None)) is not None:
            # the teacher itself enters the key by its train fingerprint (run's inputs), not by its recipe's path
            tasks[name]["distill"] = distill.model_dump(mode="json", exclude={"teacher", "teacher_set"})
    return {"model": model, "train": train, "max_length": recipe.tokenizer.max_length,
            "multitask": recipe.multitask.model_dump(mode="json"), "tasks": tasks}


def selection_score(val: dict[str, float], primaries: dict[str, str], recipe: MultiRecipe) -> float:
    """The declared combination of the tasks' validation primary metrics (``val`` keys: ``<task>.<metric>``)."""
    cfg = recipe.multitask
    weights = ({name: 1.0 for name in primaries} if cfg.selection == "mean"
               else {name: (cfg.selection_weights or {}).get(name, 0.0) for name in primaries})
    total = sum(weights.values())
    return float(sum(w * val[f"{name}.{primaries[name]}"] for name, w in weights.items()) / total)


def build_encoder(recipe: MultiRecipe, encoded: StageRef) -> nn.Module:
    """The shared encoder: scratch (vocabulary of the shared tokenizer) or the pretrained checkpoint."""
    if recipe.model.arch == "scratch":
        tokenizer = StageRef.model_validate(encoded.extra["tokenizer"])
        max_length = max(sub.tokenizer.max_length for sub in recipe.sub_recipes().values())
        return ScratchEncoder(recipe.model, int(tokenizer.extra["vocab_size"]), max_length, int(tokenizer.extra["pad_id"]))
    return PretrainedEncoder.from_pretrained(resolve_pretrained(recipe.model.pretrained))


def build_model(recipe: MultiRecipe, encoded: StageRef) -> tuple[MultiTaskModel, dict[str, list[str]]]:
    """The shared encoder with one head per task (named by the task), seeded by ``train.seed``; the label lists."""
    torch.manual_seed(recipe.train.seed)
    encoded_t = task_refs(encoded)
    encoder = build_encoder(recipe, encoded)
    heads, labels = {}, {}
    for name, sub in recipe.sub_recipes().items():
        adapter = adapter_for(kind_of(sub).name)
        labels[name] = adapter.labels(encoded_t[name])
        heads[name] = adapter.head(sub, encoder.hidden_size, len(labels[name]))
    return MultiTaskModel(encoder, heads, recipe.loss_weights()), labels


def task_groups(model: MultiTaskModel, task: str, lr: float, cfg: TrainConfig, head_lr: float | None
                ) -> list[dict[str, Any]]:
    """The optimiser groups of one task's own optimiser: the shared encoder at ``lr`` and that task's head."""
    others = {id(p) for name, head in model.heads.items() if name != task for p in head.parameters()}
    groups = param_groups(model, lr, cfg.weight_decay, head_lr, cfg.layer_lr_decay)
    return [g for g in ({**g, "params": [p for p in g["params"] if id(p) not in others]} for g in groups) if g["params"]]


class TaskLosses:
    """Wraps the step and epoch callbacks: adds ``<task>.train_loss`` per step and per epoch, renames
    the per-task validation metrics to ``<task>.val_<metric>``.

    Used as a context manager: inside it a forward hook collects the per-task losses of every forward
    (a joint step runs one per task), handed on with the step's metrics."""

    def __init__(self, model: MultiTaskModel, on_step: StepCallback | None, on_epoch: StepCallback | None):
        self.model, self._on_step, self._on_epoch = model, on_step, on_epoch
        self.sums: dict[str, list[float]] = {}
        self._step: dict[str, float] = {}

    def __enter__(self) -> TaskLosses:
        self._hook = self.model.register_forward_hook(lambda model, args, output: self._step.update(model.last_losses))
        return self

    def __exit__(self, *exc: object) -> None:
        self._hook.remove()

    def on_step(self, step: int, metrics: dict[str, float]) -> None:
        losses, self._step = self._step, {}
        for name, value in losses.items():
            self.sums.setdefault(name, []).append(value)
        if self._on_step is not None:
            self._on_step(step, {**metrics, **{f"{name}.train_loss": v for name, v in losses.items()}})

    def on_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        out: dict[str, float] = {}
        for key, value in metrics.items():
            name, dot, metric = key.removeprefix("val_").partition(".")
            out[f"{name}.val_{metric}" if key.startswith("val_") and dot else key] = value
        out.update({f"{name}.train_loss": float(np.mean(v)) for name, v in self.sums.items() if v})
        self.sums = {}
        if self._on_epoch is not None:
            self._on_epoch(epoch, out)


def _single_task_checkpoint(ckpt: dict[str, Any], task: str, head: str, labels: list[str]) -> dict[str, Any]:
    """The shared model's checkpoint restricted to one task's head, renamed ``head`` (no module is rebuilt)."""
    prefix, renamed = f"heads.{task}.", f"heads.{head}."
    state = {(renamed + k[len(prefix):] if k.startswith(prefix) else k): v for k, v in ckpt["state_dict"].items()
             if k.startswith(prefix) or not k.startswith("heads.")}
    return {**ckpt, "heads": {head: ckpt["heads"][task]}, "weights": {head: 1.0}, "state_dict": state,
            "labels": labels}


def write_views(model: MultiTaskModel, recipe: MultiRecipe, encoded: StageRef, labels: dict[str, list[str]],
                folder: Path) -> None:
    """``folder/views/<task>/`` (per-task model + the kind's bundle files) and ``folder/heads/<task>/`` (no weights)."""
    import json

    ckpt = model.cpu().checkpoint()
    encoded_t = task_refs(encoded)
    for name, sub in recipe.sub_recipes().items():
        kind = kind_of(sub)
        adapter = adapter_for(kind.name)
        view, head = folder / VIEWS_DIR / name, folder / HEADS_DIR / name
        view.mkdir(parents=True)
        head.mkdir(parents=True)
        torch.save(_single_task_checkpoint(ckpt, name, adapter.single_head, labels[name]), view / MODEL_FILE)
        for file in kind.bundle_files:
            if file == MODEL_FILE:
                continue
            if file == "labels.json":
                (view / file).write_text(json.dumps(labels[name]))
            elif encoded_t[name].file(file).exists():
                shutil.copyfile(encoded_t[name].file(file), view / file)
            else:
                continue
            shutil.copyfile(view / file, head / file)


def view_refs(trained: StageRef) -> dict[str, StageRef]:
    """Per task, the trained stage as that task's kind sees it: its evaluate (and serving) stage reads this."""
    return {name: StageRef(stage=STAGE, fingerprint=hashlib.sha256(f"{trained.fingerprint}:{name}".encode()).hexdigest(),
                           path=str(trained.file(VIEWS_DIR) / name), rows=trained.rows, cache_hit=trained.cache_hit,
                           extra={"labels": labels, "encoder": trained.extra["encoder"], "metrics": {},
                                  "special_ids": trained.extra["task_special_ids"][name]})
            for name, labels in trained.extra["task_labels"].items()}


def with_teachers(recipe: MultiRecipe, loaders: dict[str, Loader], augmented: dict[str, StageRef],
                  labels: dict[str, list[str]], teachers: dict[str, StageRef]) -> dict[str, Loader]:
    """The task loaders, those of tasks with ``distill`` on their teacher's soft targets (tasks.multi.distill)."""
    from tasks.multi.distill import distilled, teacher_probabilities
    from tasks.text.loader import EncodedSplit

    out = dict(loaders)
    for name, spec in recipe.tasks.items():
        if (cfg := getattr(spec, "distill", None)) is None:
            continue
        where = f"tasks.{name}.distill"
        if name not in teachers:
            raise ValueError(f"{where}: no trained teacher for task {name} (the train_model flow trains "
                             f"{cfg.teacher} first)")
        probs = teacher_probabilities(teachers[name], augmented[name], labels[name], recipe.train.device, where)
        gold = EncodedSplit.read(augmented[name].file("train.parquet")).labels
        out[name] = distilled(loaders[name], gold, probs, cfg.weight, cfg.anneal, name)
    return out


def run(
    recipe: MultiRecipe, augmented: StageRef, encoded: StageRef, store: ArtifactStore, checkpoints_root: Path,
    force: bool = False, on_step: StepCallback | None = None, on_epoch: StepCallback | None = None,
    teachers: dict[str, StageRef] | None = None,
) -> StageRef:
    """Train the shared model on every task's ``train.parquet``; early-stop on the tasks' validation splits.
    ``teachers``: the trained single-task teacher of every task with ``distill``, by task name."""
    teachers = teachers or {}
    unknown = sorted(set(teachers) - {name for name, spec in recipe.tasks.items() if getattr(spec, "distill", None)})
    if unknown:
        raise ValueError(f"teachers for tasks without distill: {unknown}")
    key = stage_key(STAGE, train_config(recipe), [augmented.fingerprint, encoded.fingerprint,
                                                  *(teachers[name].fingerprint for name in sorted(teachers))], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    cfg = recipe.train
    model, labels = build_model(recipe, encoded)
    augmented_t, encoded_t = task_refs(augmented), task_refs(encoded)
    loaders, validators, primaries, batch_sizes, head_lrs = {}, {}, {}, {}, {}
    for name, sub in recipe.sub_recipes().items():
        adapter = adapter_for(kind_of(sub).name)
        batch_sizes[name] = sub.train.batch_size  # sub.train: the task's own keys over the shared ones
        if sub.train.head_lr is not None:
            head_lrs[name] = sub.train.head_lr
        loaders[name] = adapter.train_loader(sub, augmented_t[name], encoded_t[name], batch_sizes[name], model.pad_id, name)
        validators[name] = adapter.validator(sub, encoded_t[name], model.pad_id, name)
        primaries[name] = sub.evaluate.primary_metric
    loaders = with_teachers(recipe, loaders, augmented_t, labels, teachers)
    mt = recipe.multitask
    train_loader = multitask_loader(loaders, batch_sizes, mt.sampling, mt.temperature, mt.steps_per_epoch, mt.step,
                                    cfg.seed, mt.gradient)

    def validate(m: nn.Module, device: torch.device) -> dict[str, float]:
        val = {f"{name}.{k}": v for name, check in validators.items() for k, v in check(m, device).items()}
        return {**val, SELECTION: selection_score(val, primaries, recipe)}

    groups = route_groups = None
    if mt.optimizer == "per_task":
        route_groups = [task_groups(model, name, sub.train.lr, cfg, sub.train.head_lr)  # the task's own, else the shared
                        for name, sub in recipe.sub_recipes().items()]
    else:
        groups = param_groups(model, cfg.lr, cfg.weight_decay, cfg.head_lr, cfg.layer_lr_decay, head_lrs)
    checkpoint_dir = checkpoints_root / STAGE / key.fingerprint
    started = time.perf_counter()
    with TaskLosses(model, on_step, on_epoch) as callbacks:
        result = fit_loader(model, train_loader, validate, cfg, SELECTION, checkpoint_dir, callbacks.on_step,
                            callbacks.on_epoch, groups, route_groups=route_groups)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="nightshift-multi-") as tmp:
        write_views(model, recipe, encoded, labels, Path(tmp))
        rows = {"train": train_loader.size, "validation": sum(ref.rows.get("validation", 0) for ref in encoded_t.values()),
                **{f"{name}.train": loader.size for name, loader in loaders.items()}}
        return store_trained(
            key, store, primary_metric=SELECTION, model=model, result=result, seconds=seconds,
            labels=[f"{name}:{label}" for name, names in labels.items() for label in names], rows=rows,
            checkpoint_dir=checkpoint_dir, copies=[Path(tmp) / VIEWS_DIR, Path(tmp) / HEADS_DIR],
            json_files={"tasks.json": {name: {"task": spec.task, "loss_weight": spec.loss_weight, "labels": labels[name]}
                                       for name, spec in recipe.tasks.items()}},
            extra={"encoder": {k: v for k, v in key.config["model"].items() if k in ("arch", "pretrained", "checkpoint_sha256")},
                   "task_labels": labels, "tasks": list(recipe.tasks),
                   "teachers": {name: ref.fingerprint for name, ref in sorted(teachers.items())},
                   # what a kind's evaluate and serving read from its own trained stage (tokens: the special ids)
                   "task_special_ids": {name: {k: int(ref.extra[k]) for k in SPECIAL_IDS if k in ref.extra}
                                        for name, ref in encoded_t.items()}},
        )
