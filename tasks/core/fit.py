"""The fit loop every kind trains with, and what it needs: schedules, the optimiser, devices,
threads, checkpoints, progress.

The model owns its loss: ``model(*inputs, targets=targets)`` returns ``(outputs, loss)`` and the loop
steps on that loss. AdamW with decoupled weight decay (or Adam: ``train.optimizer``) over the
parameter groups the kind gives (no decay on biases, norms or embeddings; separate head and
layer-wise learning rates for pretrained encoders), linear warmup then linear decay (or constant),
gradient clipping, CUDA with bf16 autocast when present, else CPU with ``train.threads`` threads
(restored afterwards); seeded so a CPU rerun is identical; optionally an exponential moving average
of the weights (``train.ema_decay``) that is what gets validated and kept; optionally the heads
trained alone on the frozen encoder first (``train.probe_fraction``, LP-FT); early stopping on the
validation metric; a checkpoint after every epoch under
``$NIGHTSHIFT_HOME/checkpoints/train/<fingerprint>/`` so an interrupted run resumes where it stopped.
A progress bar per epoch (step, loss, ETA) and one line per epoch go to the terminal; both stay quiet
when stderr is not a terminal.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import os
import shutil
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from tqdm.auto import tqdm

from tasks.core.batching import Loader, to_device
from tasks.core.config import TrainConfig
from tasks.core.store import ArtifactStore, StageKey, StageRef

STAGE = "train"
MODEL_FILE = "model.pt"
CHECKPOINT_FILE = "last.pt"  # under checkpoints/train/<train fingerprint>/, after every epoch
log = logging.getLogger(__name__)
StepCallback = Callable[[int, dict[str, float]], None]


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
    """The LR multiplier per step that ``train.schedule`` and ``train.warmup_fraction`` ask for.

    With ``train.probe_fraction`` the first :func:`probe_steps` steps run at 1 (only the heads train
    then) and the schedule runs over the steps left, warmup included: fine-tuning starts from trained
    heads with the encoder warming up as it would without the probe.
    """
    make = warmup_constant if cfg.schedule == "constant" else warmup_linear
    probe = probe_steps(total_steps, cfg)
    tune = make(max(1, total_steps - probe), cfg.warmup_fraction)
    return lambda step: 1.0 if step < probe else tune(step - probe)


def probe_steps(total_steps: int, cfg: TrainConfig) -> int:
    """How many of the first steps ``train.probe_fraction`` trains the heads alone: always fewer than all."""
    return int(total_steps * cfg.probe_fraction)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig, groups: list[dict[str, Any]] | None = None) -> torch.optim.Optimizer:
    """``train.optimizer``: AdamW (decoupled decay, betas 0.9/0.98) or Adam (torch defaults, decay as L2).

    ``groups`` are the kind's parameter groups (each may carry its own ``lr``); by default
    :func:`param_groups`: biases, norms and embeddings are not decayed.
    """
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay)
    # torch's fused kernel: on CPU its per-step update of a 22M-parameter encoder takes a quarter of the
    # for-loop implementation's time (bench/train.py); it needs every parameter floating point on CPU/CUDA
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for g in groups for p in g["params"])
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, fused=fused or None)
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98), eps=1e-8, fused=fused or None)


def clip_gradients(model: torch.nn.Module, max_norm: float | None) -> float:
    """Clip the gradient norm to ``max_norm`` (None: leave it); return the norm before clipping.

    The multi-tensor (foreach) kernels take a third less time than torch's CPU default of one tensor
    at a time (MiniLM's 100 gradients: 29 ms against 45 ms a step).
    """
    params = [p for p in model.parameters() if p.grad is not None]
    foreach = all(p.device.type in ("cpu", "cuda") for p in params) or None
    return float(torch.nn.utils.clip_grad_norm_(params, math.inf if max_norm is None else max_norm, foreach=foreach))


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


def default_threads() -> int:
    """``OMP_NUM_THREADS`` when set, else half the machine's cores (at least one).

    All the cores thrash as soon as anything else runs: torch's OpenMP threads spin while they wait
    for a core, and a 2,000-row training took 22-50 s on 2 threads against 3-10 s on 1, idle or
    loaded (bench/train.py, threads study). Half the cores leaves room for the rest of the pipeline.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else max(1, (os.cpu_count() or 1) // 2)


@contextlib.contextmanager
def torch_threads(threads: int | None) -> Iterator[int]:
    """Run the body with ``threads`` torch CPU threads (None: :func:`default_threads`), then restore them."""
    before = torch.get_num_threads()
    wanted = threads or default_threads()
    torch.set_num_threads(wanted)
    try:
        yield wanted
    finally:
        torch.set_num_threads(before)


def score(y_true: np.ndarray, y_pred: np.ndarray) -> dict[str, float]:
    """accuracy and macro-F1."""
    return {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", zero_division=0)),
    }


class WeightAverage:
    """An exponential moving average of a model's floating-point weights (``train.ema_decay``).

    After update n the average is ``sum_i (1 - d) d**(n - i) w_i / (1 - d**n)`` over the weights ``w_i``
    after every optimiser step so far: Adam's bias correction, so it is an average of the weights seen
    (the initial ones are not in it) and looks back about ``1 / (1 - d)`` steps from the first update on.
    Validation and the kept weights use it (:meth:`applied`); training continues on the raw weights.
    Non-float buffers (position ids) are left alone.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.updates = decay, 0
        self.shadow = {k: torch.zeros_like(v) for k, v in model.state_dict().items() if v.is_floating_point()}

    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        state = model.state_dict()
        with torch.no_grad():
            torch._foreach_lerp_(list(self.shadow.values()), [state[k].detach() for k in self.shadow], 1.0 - self.decay)

    def averaged(self) -> dict[str, torch.Tensor]:
        """The bias-corrected average (before any update: nothing to average, so nothing)."""
        if self.updates == 0:
            return {}
        correction = 1.0 - self.decay ** self.updates
        return {k: v / correction for k, v in self.shadow.items()}

    @contextlib.contextmanager
    def applied(self, model: torch.nn.Module) -> Iterator[None]:
        """The body sees the averaged weights in ``model``; its own weights come back afterwards."""
        averaged = self.averaged()
        raw = {k: v.detach().clone() for k, v in model.state_dict().items() if k in averaged}
        model.load_state_dict(averaged, strict=False)
        try:
            yield
        finally:
            model.load_state_dict(raw, strict=False)

    def state_dict(self) -> dict[str, Any]:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["shadow"].keys() != self.shadow.keys():
            raise ValueError("the saved weight average holds other tensors than this model")
        self.decay, self.updates = state["decay"], state["updates"]
        self.shadow = {k: v.to(self.shadow[k].device) for k, v in state["shadow"].items()}


@dataclass
class FitResult:
    """What :func:`fit_loader` returns: the best weights, when they were reached, the history."""

    best_state: dict[str, torch.Tensor]
    best_epoch: int
    best_score: float
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    resumed_from_epoch: int | None = None


Validator = Callable[[torch.nn.Module, torch.device], dict[str, float]]


def fit_loader(
    model: torch.nn.Module,
    train: Loader,
    validate: Validator,
    cfg: TrainConfig,
    primary_metric: str,
    checkpoint_dir: Path | None = None,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    groups: list[dict[str, Any]] | None = None,
    progress: bool | None = None,
    route_groups: list[list[dict[str, Any]]] | None = None,
) -> FitResult:
    """Train ``model`` on its own loss with early stopping on ``validate(model)[primary_metric]``.

    Resumes from ``checkpoint_dir/last.pt`` when it exists. ``groups`` are optimiser parameter groups
    (default :func:`param_groups`); ``progress`` None shows bars only when stderr is a terminal.
    ``route_groups`` instead gives several optimisers, one per list of groups: each step is taken by
    the one ``train.route(batch)`` names (multi-task: one per task), all on the one schedule.
    """
    if route_groups is not None and (train.route is None or groups is not None):
        raise ValueError("route_groups needs a loader with route, and no groups")
    with torch_threads(cfg.threads):
        return _fit(model, train, validate, cfg, primary_metric, checkpoint_dir, on_step, on_epoch,
                    route_groups if route_groups is not None else [groups], progress)


def _fit(
    model: torch.nn.Module, train: Loader, validate: Validator, cfg: TrainConfig, primary_metric: str,
    checkpoint_dir: Path | None, on_step: Callable[[int, dict[str, float]], None] | None,
    on_epoch: Callable[[int, dict[str, float]], None] | None, group_sets: list[list[dict[str, Any]] | None],
    progress: bool | None,
) -> FitResult:
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    model.to(device)
    steps_per_epoch = train.steps or math.ceil(train.size / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    optimizers, schedulers = _optimizers(model, cfg, group_sets, total_steps)
    average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
    result = FitResult(best_state=copy.deepcopy(model.state_dict()), best_epoch=0, best_score=-math.inf)
    start_epoch, bad_epochs, step = 1, 0, 0

    last = checkpoint_dir / CHECKPOINT_FILE if checkpoint_dir else None
    ckpt = read_checkpoint(last, device) if last is not None else None
    if ckpt is not None:
        try:
            model.load_state_dict(ckpt["model"])
            if len(ckpt["optimizer"]) != len(optimizers):
                raise ValueError(f"{len(ckpt['optimizer'])} optimisers saved, {len(optimizers)} wanted")
            for optimizer, scheduler, o_state, s_state in zip(optimizers, schedulers, ckpt["optimizer"], ckpt["scheduler"]):
                optimizer.load_state_dict(o_state)
                scheduler.load_state_dict(s_state)
            if average is not None:
                average.load_state_dict(ckpt["ema"])  # saved without one (None, or absent): start over
            torch.set_rng_state(ckpt["torch_rng"])
        except Exception as exc:  # a checkpoint of another shape: start over exactly as a fresh run would
            log.warning("train: checkpoint %s does not fit this model (%s: %s); training from epoch 0",
                        last, type(exc).__name__, exc)
            model.load_state_dict(result.best_state)
            optimizers, schedulers = _optimizers(model, cfg, group_sets, total_steps)
            average = WeightAverage(model, cfg.ema_decay) if cfg.ema_decay is not None else None
            torch.manual_seed(cfg.seed)
            ckpt = None
    if ckpt is not None:
        result = ckpt["result"]
        start_epoch, bad_epochs, step = ckpt["epoch"] + 1, ckpt["bad_epochs"], ckpt["step"]
        result.resumed_from_epoch = ckpt["epoch"]
        log.info("train: resuming from the checkpoint of epoch %d (%s)", ckpt["epoch"], last)

    show = (sys.stderr.isatty() if progress is None else progress)
    combine = train.combine if train.parts is not None else None
    trainable = [p for p in model.parameters() if p.requires_grad]
    probe = probe_steps(total_steps, cfg)
    probed = _probed(model, probe, combine is not None)
    for epoch in range(start_epoch, cfg.epochs + 1):
        if step >= total_steps or bad_epochs >= cfg.patience:
            break
        model.train()
        # per-epoch seeding: a resumed run sees the same batches
        batches = (train.epoch_batches(epoch) if train.epoch_batches is not None
                   else train.batches(np.random.default_rng([cfg.seed, epoch])))
        batches = batches[: max(0, total_steps - step)]
        losses = []
        bar = tqdm(batches, desc=f"epoch {epoch}/{cfg.epochs}", unit="step", disable=not show, file=sys.stderr,
                   leave=False, dynamic_ncols=True)
        for batch in bar:
            if probed and step <= probe:  # no gradient, so no backward, through a frozen encoder
                for p in probed:
                    p.requires_grad_(step == probe)
            model.zero_grad(set_to_none=True)
            step_loss = torch.zeros((), device=device)
            part_grads: list[list[torch.Tensor | None]] = []
            # one backward per part accumulates the gradient of the summed loss without holding every
            # part's graph at once; with train.combine each part's gradient is kept apart instead
            for index in (train.parts(batch) if train.parts is not None else (batch,)):
                inputs = [t.to(device) for t in train.inputs(index)]
                targets = to_device(train.targets_at(index, step / total_steps), device)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                    _, loss = model(*inputs, targets=targets)
                loss.backward()
                step_loss += loss.detach().float()
                if combine is not None:
                    part_grads.append([p.grad for p in trainable])
                    for p in trainable:
                        p.grad = None
            step_stats: dict[str, torch.Tensor] = {}
            if combine is not None:
                merged, step_stats = combine(part_grads)
                for p, g in zip(trainable, merged):
                    p.grad = g
            grad_norm = clip_gradients(model, cfg.grad_clip)
            optimizers[train.route(batch) if len(optimizers) > 1 else 0].step()
            with warnings.catch_warnings():
                # every schedule follows the global step; one whose optimiser has not stepped yet (the
                # other tasks' batches came first) would warn that the order looks wrong: it is not
                warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step\\(\\)` before")
                for scheduler in schedulers:
                    scheduler.step()
            if average is not None:
                average.update(model)
            step += 1
            losses.append(step_loss.item())  # one host sync per step, however many parts
            if step % 10 == 0 or step == 1:
                bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
            if on_step is not None:
                lr = 0.0 if probed and step <= probe else schedulers[0].get_last_lr()[0]  # the encoder's
                on_step(step, {"train_loss": losses[-1], "lr": lr, "grad_norm": float(grad_norm),
                               **{k: float(v) for k, v in step_stats.items()}})
        bar.close()
        with average.applied(model) if average is not None else contextlib.nullcontext():
            val = validate(model, device)
            if improved := val[primary_metric] > result.best_score:  # keep the weights just validated
                result.best_state = copy.deepcopy(model.state_dict())
        metrics = {"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                   **{f"val_{k}": v for k, v in val.items()}}
        result.history.append(metrics)
        if show:
            tqdm.write(f"epoch {epoch}/{cfg.epochs}: train loss {metrics['train_loss']:.4f}, "
                       f"validation {primary_metric} {val[primary_metric]:.4f} ({step} steps)", file=sys.stderr)
        if improved:
            result.best_score, result.best_epoch, bad_epochs = val[primary_metric], epoch, 0
        else:
            bad_epochs += 1
        result.steps = step
        if on_epoch is not None:
            on_epoch(epoch, metrics)
        if last is not None:
            last.parent.mkdir(parents=True, exist_ok=True)
            tmp = last.with_suffix(".tmp")  # written whole, then renamed: last.pt is never half-written
            torch.save({"model": model.state_dict(), "optimizer": [o.state_dict() for o in optimizers],
                        "scheduler": [s.state_dict() for s in schedulers], "torch_rng": torch.get_rng_state(), "result": result,
                        "ema": average.state_dict() if average is not None else None, "epoch": epoch, "bad_epochs": bad_epochs, "step": step}, tmp)
            tmp.replace(last)  # a crash mid-save keeps the previous checkpoint intact
    for p in probed:  # stopped early while still probing: leave the model as it came
        p.requires_grad_(True)
    model.load_state_dict(result.best_state)
    return result


def _probed(model: torch.nn.Module, probe: int, combined: bool) -> list[torch.nn.Parameter]:
    """The encoder parameters ``train.probe_fraction`` freezes at first: those of ``model.encoder`` that train."""
    if not probe:
        return []
    encoder = getattr(model, "encoder", None)
    if not isinstance(encoder, torch.nn.Module):
        raise ValueError(f"train.probe_fraction: {type(model).__name__} has no encoder apart from its heads to freeze")
    if combined:
        raise ValueError("train.probe_fraction does not combine with multitask.gradient (a frozen encoder has no gradients to combine)")
    return [p for p in encoder.parameters() if p.requires_grad]


def _optimizers(model: torch.nn.Module, cfg: TrainConfig, group_sets: list[list[dict[str, Any]] | None],
                total_steps: int) -> tuple[list[torch.optim.Optimizer], list[torch.optim.lr_scheduler.LambdaLR]]:
    """One optimiser per set of groups (None: :func:`param_groups`), each with the schedule over ``total_steps``."""
    optimizers = [make_optimizer(model, cfg, groups) for groups in group_sets]
    return optimizers, [torch.optim.lr_scheduler.LambdaLR(o, lr_multiplier(total_steps, cfg)) for o in optimizers]


_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "torch_rng", "result", "epoch", "bad_epochs", "step")


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any] | None:
    """The resumable state in ``path``, or None when there is none or it is unreadable.

    ``fit_loader`` writes ``last.tmp`` and renames it over ``last.pt``, so a crash mid-save leaves the
    previous checkpoint intact; a file that is still damaged (truncated by a full disk, copied in
    part, written by an incompatible version) is reported, removed and training starts over from
    epoch 0 rather than resuming from state that is not what it claims.
    """
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
        missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt] if isinstance(ckpt, dict) else list(_CHECKPOINT_KEYS)
        if missing or not isinstance(ckpt["result"], FitResult):
            raise ValueError(f"not a training checkpoint (missing {missing or ['result']})")
    except Exception as exc:
        log.warning("train: ignoring unreadable checkpoint %s (%s: %s); training from epoch 0", path,
                    type(exc).__name__, exc)
        path.unlink(missing_ok=True)
        return None
    return ckpt


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


def store_trained(
    key: StageKey, store: ArtifactStore, *, primary_metric: str, model: torch.nn.Module, result: FitResult,
    seconds: float, labels: list[str], rows: dict[str, int], checkpoint_dir: Path,
    copies: tuple[Path, ...] | list[Path] = (), json_files: dict[str, Any] | None = None,
    checkpoint_meta: dict[str, Any] | None = None, extra: dict[str, Any] | None = None,
) -> StageRef:
    """The tail shared by every kind's train stage: store the model, its history and curves.

    The weights go to ``model.pt`` (with labels and ``checkpoint_meta``), ``copies`` (files or folders)
    are copied beside them, ``json_files`` written as JSON (and logged, but for ``labels.json``); then
    the resumable checkpoint is removed.
    """
    metric = primary_metric
    json_files = {"labels.json": labels, **(json_files or {})}
    with store.writer(key) as w:
        torch.save(model.cpu().checkpoint(labels=labels, **(checkpoint_meta or {})), w.path / MODEL_FILE)
        for path in copies:
            if path.is_dir():
                shutil.copytree(path, w.path / path.name)
            else:
                shutil.copyfile(path, w.path / path.name)
        for name, value in json_files.items():
            w.write_json(name, value)
        w.write_json("history.json", result.history)
        curves_png(result.history, w.path / "training_curves.png", metric)
        metrics = {"best_epoch": result.best_epoch, f"best_val_{metric}": result.best_score, "steps": result.steps,
                   "train_seconds": seconds, "parameters": model.num_parameters(), "train_rows": rows["train"]}
        log_files = ["training_curves.png", "history.json",
                     *(n for n in json_files if n != "labels.json")]
        ref = w.write_manifest(
            rows=rows,
            extra={"metrics": metrics, "log_files": log_files, "resumed_from_epoch": result.resumed_from_epoch,
                   "labels": labels, **(extra or {})},
        )
    shutil.rmtree(checkpoint_dir, ignore_errors=True)  # done: the stored model supersedes the checkpoint
    return ref
