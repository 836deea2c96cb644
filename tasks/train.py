"""Stage: train. Fits the from-scratch Transformer classifier on the (augmented) train split.

AdamW with decoupled weight decay (or Adam: ``train.optimizer``; no decay on biases, norms or
embeddings), linear warmup then linear decay (or a constant rate: ``train.schedule``), gradient
clipping, dropout from the model config; dynamic padding with length-bucketed batches; CUDA with
bf16 autocast when present, else CPU; seeded so a CPU rerun is identical; early stopping on the
validation metric; a checkpoint after every epoch under
``$NIGHTSHIFT_HOME/checkpoints/train/<fingerprint>/`` so an interrupted run resumes where it stopped.

Run alone: ``python -m flows.train_model --config configs/sst2.yaml`` (after prepare_data).
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from prefect import task
from prefect.cache_policies import NONE
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm

import models.transformer
from models.transformer import TransformerClassifier
from tasks import tracking
from tasks.artifacts import ArtifactStore, StageRef, fingerprint, source_hash
from tasks.config import Recipe, TrainConfig
from tasks.lineage import tracked
from tasks.settings import get_settings

STAGE = "train"
MODEL_FILE = "model.pt"


@dataclass(frozen=True)
class EncodedSplit:
    """Token ids of one split as flat arrays: row i is ``values[offsets[i]:offsets[i+1]]``."""

    values: np.ndarray  # (total_tokens,) int64
    offsets: np.ndarray  # (n + 1,) int64
    labels: np.ndarray  # (n,) int64

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @classmethod
    def from_table(cls, table: pa.Table) -> EncodedSplit:
        ids = table.column("input_ids").combine_chunks()
        ids = ids.cast(pa.list_(pa.int64())) if ids.type.value_type != pa.int64() else ids
        offsets = ids.offsets.to_numpy().astype(np.int64)
        values = ids.values.to_numpy(zero_copy_only=False)
        # the list array may be a slice of a larger buffer: rebase offsets to its own values
        values = values[offsets[0] : offsets[-1]]
        offsets = offsets - offsets[0]
        return cls(values, offsets, table.column("label_id").to_numpy().astype(np.int64))

    @classmethod
    def read(cls, path: Path) -> EncodedSplit:
        return cls.from_table(pq.read_table(path, columns=["input_ids", "label_id"]))


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Batches of indices with similar lengths (little padding), in random order when ``rng`` is given.

    Shuffle, cut into pools of 50 batches, sort each pool by length, cut into batches, shuffle the
    batches: random enough for SGD, yet padding stays small.
    """
    n = len(lengths)
    order = rng.permutation(n) if rng is not None else np.arange(n)
    pool = batch_size * 50
    batches: list[np.ndarray] = []
    for start in range(0, n, pool):
        chunk = order[start : start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    if rng is not None:
        rng.shuffle(batches)
    return batches


def collate(split: EncodedSplit, index: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad the rows ``index`` to their own longest length: ids (B, T), mask (B, T), labels (B,)."""
    starts, ends = split.offsets[index], split.offsets[index + 1]
    lengths = ends - starts
    width = int(lengths.max())
    positions = np.arange(width)[None, :]
    mask = positions < lengths[:, None]  # (B, T)
    gather = np.minimum(starts[:, None] + positions, len(split.values) - 1)
    ids = np.where(mask, split.values[gather], pad_id)
    return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64)), torch.from_numpy(split.labels[index])


def warmup_linear(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over the warmup steps, then linear decay to 0."""
    warmup = max(1, int(total_steps * warmup_fraction))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def warmup_constant(total_steps: int, warmup_fraction: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup to 1 over the warmup steps, then constant (no warmup when the fraction is 0)."""
    warmup = max(1, int(total_steps * warmup_fraction))
    return lambda step: (step + 1) / warmup if step < warmup else 1.0


def lr_multiplier(total_steps: int, cfg: TrainConfig) -> Callable[[int], float]:
    """The LR multiplier per step that ``train.schedule`` and ``train.warmup_fraction`` ask for."""
    make = warmup_constant if cfg.schedule == "constant" else warmup_linear
    return make(total_steps, cfg.warmup_fraction)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW (decoupled decay, betas 0.9/0.98) or Adam (torch defaults, decay as L2).

    Either way biases, norms and embeddings are not decayed (:func:`param_groups`).
    """
    groups = param_groups(model, cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8)


def clip_gradients(model: torch.nn.Module, max_norm: float | None) -> float:
    """Clip the gradient norm to ``max_norm`` (None: leave it); return the norm before clipping."""
    return float(torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf if max_norm is None else max_norm))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, LayerNorm weights and embeddings are not shrunk."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "emb" not in name else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def resolve_device(choice: str) -> torch.device:
    if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("train.device=cuda but no CUDA device is visible")
        return torch.device("cuda")
    return torch.device("cpu")


@dataclass(frozen=True)
class Loader:
    """How :func:`fit_loader` reads one split, whatever the modality (text here, images in tasks.vision)."""

    labels: np.ndarray  # (n,) class ids
    batches: Callable[[np.random.Generator | None], list[np.ndarray]]  # index batches; None: fixed order
    inputs: Callable[[np.ndarray], tuple[torch.Tensor, ...]]  # the model's inputs for one index batch (CPU)


def text_loader(split: EncodedSplit, batch_size: int, pad_id: int) -> Loader:
    """Length-bucketed, dynamically padded batches of token ids: inputs (ids, mask)."""
    return Loader(
        labels=split.labels,
        batches=lambda rng: length_bucketed_batches(split.lengths, batch_size, rng),
        inputs=lambda index: collate(split, index, pad_id)[:2],
    )


@torch.no_grad()
def predict_loader(model: torch.nn.Module, loader: Loader, device: torch.device) -> np.ndarray:
    """Class probabilities (n, C) in the loader's row order."""
    model.eval()
    out: np.ndarray | None = None
    for index in loader.batches(None):
        inputs = [t.to(device) for t in loader.inputs(index)]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits, _ = model(*inputs)
        probs = torch.softmax(logits.float(), -1).cpu().numpy()
        if out is None:
            out = np.zeros((len(loader.labels), probs.shape[1]), dtype=np.float32)
        out[index] = probs
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)


def predict_proba(
    model: torch.nn.Module, split: EncodedSplit, pad_id: int, device: torch.device, batch_size: int = 256
) -> np.ndarray:
    """Class probabilities (n, C) of a token-id split, in the split's row order."""
    return predict_loader(model, text_loader(split, batch_size, pad_id), device)


def score(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """accuracy and macro-F1."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


@dataclass
class FitResult:
    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    resumed_from_epoch: int | None = None


def fit_loader(
    model: torch.nn.Module,
    train: Loader,
    validation: Loader,
    cfg: TrainConfig,
    primary_metric: str,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``model`` with early stopping on ``primary_metric``; resume from ``checkpoint_dir/last.pt``."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    steps_per_epoch = math.ceil(len(train.labels) / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizer = make_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(total_steps, cfg))
    result = FitResult(best_state=copy.deepcopy(model.state_dict()), best_epoch=0, best_score=-math.inf)
    start_epoch, bad_epochs, step = 1, 0, 0

    last = checkpoint_dir / "last.pt" if checkpoint_dir else None
    if last is not None and last.exists():
        ckpt = torch.load(last, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        torch.set_rng_state(ckpt["torch_rng"])
        result = ckpt["result"]
        start_epoch, bad_epochs, step = ckpt["epoch"] + 1, ckpt["bad_epochs"], ckpt["step"]
        result.resumed_from_epoch = ckpt["epoch"]

    progress = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=None, file=sys.stderr)
    for epoch in range(start_epoch, cfg.epochs + 1):
        if step >= total_steps or bad_epochs >= cfg.patience:
            break
        model.train()
        rng = np.random.default_rng([cfg.seed, epoch])  # per-epoch stream: a resumed run shuffles the same
        losses = []
        for index in train.batches(rng):
            if step >= total_steps:
                break
            inputs = [t.to(device) for t in train.inputs(index)]
            labels = torch.from_numpy(train.labels[index]).to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                logits, _ = model(*inputs)
            # the loss is taken here, not by the model, so train.label_smoothing applies to every model kind
            loss = torch.nn.functional.cross_entropy(logits.float(), labels, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = clip_gradients(model, cfg.grad_clip)
            optimizer.step()
            scheduler.step()
            step += 1
            losses.append(loss.item())
            progress.update(1)
            if on_step is not None:
                on_step(step, {"train_loss": losses[-1], "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)})
        val = score(validation.labels, predict_loader(model, validation, device).argmax(1))
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   **{f"val_{k}": v for k, v in val.items()}}
        result.history.append(metrics)
        progress.set_postfix(loss=f"{metrics['train_loss']:.3f}", val=f"{val[primary_metric]:.3f}")
        if val[primary_metric] > result.best_score:
            result.best_score, result.best_epoch, bad_epochs = val[primary_metric], epoch, 0
            result.best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        result.steps = step
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if last is not None:
            last.parent.mkdir(parents=True, exist_ok=True)
            tmp = last.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(), "torch_rng": torch.get_rng_state(), "result": result,
                        "epoch": epoch, "bad_epochs": bad_epochs, "step": step}, tmp)
            tmp.replace(last)  # a crash mid-save keeps the previous checkpoint intact
    progress.close()
    model.load_state_dict(result.best_state)
    return result


def fit(
    model: TransformerClassifier,
    train: EncodedSplit,
    validation: EncodedSplit,
    cfg: TrainConfig,
    primary_metric: str,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """:func:`fit_loader` on token-id splits (length-bucketed, dynamically padded batches)."""
    return fit_loader(model, text_loader(train, cfg.batch_size, model.pad_id), text_loader(validation, 256, model.pad_id),
                      cfg, primary_metric, checkpoint_dir, on_step, on_epoch)


def curves_png(history: list[dict[str, float]], path: Path, primary_metric: str) -> None:
    """Training loss and validation metric per epoch, side by side."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.5))
    ax1, ax2 = fig.subplots(1, 2)
    epochs = [h["epoch"] for h in history]
    ax1.plot(epochs, [h["train_loss"] for h in history], marker="o")
    ax1.set(title="train loss", xlabel="epoch")
    ax2.plot(epochs, [h[f"val_{primary_metric}"] for h in history], marker="o", color="tab:green")
    ax2.set(title=f"validation {primary_metric}", xlabel="epoch")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def config_for_fingerprint(recipe: Recipe) -> dict[str, Any]:
    """What decides the trained weights besides the data: model and training settings."""
    train = recipe.train.model_dump(mode="json")
    train.pop("num_threads")  # speed only, not the result
    return {"model": recipe.model.model_dump(mode="json"), "train": train,
            "primary_metric": recipe.evaluate.primary_metric, "clean": recipe.clean.model_dump(mode="json")}


def store_trained(
    recipe: Recipe, store: ArtifactStore, *, fp: str, config: dict[str, Any], code: str, inputs: list[str],
    model: torch.nn.Module, result: FitResult, seconds: float, labels: list[str], rows: dict[str, int],
    checkpoint_dir: Path, copies: tuple[Path, ...] | list[Path] = (), json_files: dict[str, Any] | None = None,
    checkpoint_meta: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
) -> StageRef:
    """The tail shared by the text and image train stages: store the model, its history and curves.

    The weights go to ``model.pt`` (with labels and ``checkpoint_meta``), ``copies`` are copied beside
    them, ``json_files`` written as JSON (and logged); then the resumable checkpoint is removed.
    """
    metric = recipe.evaluate.primary_metric
    json_files = {"labels.json": labels, **(json_files or {})}
    with store.writer(STAGE, fp) as w:
        torch.save(model.cpu().checkpoint(labels=labels, **(checkpoint_meta or {})), w.path / MODEL_FILE)
        for path in copies:
            shutil.copyfile(path, w.path / path.name)
        for name, value in json_files.items():
            w.write_json(name, value)
        w.write_json("history.json", result.history)
        curves_png(result.history, w.path / "training_curves.png", metric)
        metrics = {"best_epoch": result.best_epoch, f"best_val_{metric}": result.best_score, "steps": result.steps,
                   "train_seconds": seconds, "parameters": model.num_parameters(), "train_rows": rows["train"]}
        log_files = ["training_curves.png", "history.json", *(n for n in json_files if n != "labels.json")]
        ref = w.write_manifest(
            config=config, inputs=inputs, code=code, rows=rows,
            extra={"metrics": metrics, "log_files": log_files, "resumed_from_epoch": result.resumed_from_epoch,
                   "labels": labels, **(extra or {})},
        )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # done: the stored model supersedes the checkpoint
    return ref


def run(
    recipe: Recipe,
    augmented: StageRef,
    tokenized: StageRef,
    store: ArtifactStore,
    checkpoints_root: Path,
    force: bool = False,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> StageRef:
    """Train on ``augmented/train.parquet``, early-stop on ``tokenized/validation.parquet``; store the model."""
    config = config_for_fingerprint(recipe)
    code = source_hash(sys.modules[__name__], models.transformer)
    fp = fingerprint(STAGE, config, [augmented.fingerprint, tokenized.fingerprint], code)
    if not force and (hit := store.lookup(STAGE, fp)) is not None:
        return hit
    if recipe.train.num_threads:
        torch.set_num_threads(recipe.train.num_threads)
    train = EncodedSplit.read(augmented.file("train.parquet"))
    validation = EncodedSplit.read(tokenized.file("validation.parquet"))
    labels = json.loads(tokenized.file("labels.json").read_text())
    torch.manual_seed(recipe.train.seed)
    model = TransformerClassifier(recipe.model, vocab_size=int(tokenized.extra["vocab_size"]),
                                  num_classes=len(labels), max_length=recipe.tokenizer.max_length,
                                  pad_id=int(tokenized.extra["pad_id"]))
    checkpoint_dir = checkpoints_root / STAGE / fp
    started = time.perf_counter()
    result = fit(model, train, validation, recipe.train, recipe.evaluate.primary_metric,
                 checkpoint_dir, on_step, on_epoch)
    seconds = time.perf_counter() - started
    return store_trained(
        recipe, store, fp=fp, config=config, code=code, inputs=[augmented.fingerprint, tokenized.fingerprint],
        model=model, result=result, seconds=seconds, labels=labels, rows={"train": len(train), "validation": len(validation)},
        checkpoint_dir=checkpoint_dir, copies=[tokenized.file("tokenizer.json")],
    )


@task(name="train", cache_policy=NONE)
def train_task(recipe: Recipe, augmented: StageRef, tokenized: StageRef, run_id: str | None, force: bool = False) -> StageRef:
    """Train (or find the identical trained model in the store); per-step loss and per-epoch metrics to MLflow."""
    steps = tracking.MetricBuffer(run_id)

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        steps.add(epoch, {f"epoch_{k}": v for k, v in metrics.items() if k != "epoch"})
        steps.flush()

    def work(store: ArtifactStore) -> StageRef:
        train_run = run
        if recipe.task == "image-classification":
            from tasks.vision import train as vision_train

            train_run = vision_train.run
        ref = train_run(recipe, augmented, tokenized, store, get_settings().checkpoints_root, force, steps.add, on_epoch)
        steps.flush()
        return ref

    return tracked(run_id, STAGE, work)
