"""One text encoder, one or more task heads: ``forward(ids, mask, targets) -> (outputs, loss)``.

A single-task model is the one-head case. The loss is sum_t w_t * L_t over the heads whose targets
are in the batch (a multi-task batch may carry one task only). The model initialises itself once,
after all its submodules exist: a scratch encoder and its heads together (GPT-2 style, see
models.encoders.init_weights), a pretrained encoder keeps its weights and only the heads are drawn.
``checkpoint()`` / ``from_checkpoint()`` rebuild the model from the file alone (nanoGPT habit).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn

from models.encoders import (
    EncoderConfig,
    PretrainedEncoder,
    ScratchEncoder,
    init_weights,
    resolve_pretrained,
)
from models.heads import SequenceHead, TokenHead, build_head

HeadKind = Literal["sequence", "token"]


def init_head(module: nn.Module) -> None:
    """Heads on a pretrained encoder: N(0, 0.02) weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class MultiTaskModel(nn.Module):
    """``forward(ids (B, T), mask (B, T), targets={task: tensor}) -> ({task: logits}, loss or None)``."""

    def __init__(self, encoder: nn.Module, heads: dict[str, nn.Module], weights: dict[str, float] | None = None):
        super().__init__()
        if not heads:
            raise ValueError("a model needs at least one head")
        unknown = set(weights or {}) - set(heads)
        if unknown:
            raise ValueError(f"loss weights for unknown tasks {sorted(unknown)}; tasks: {sorted(heads)}")
        self.encoder = encoder
        self.heads = nn.ModuleDict(heads)
        self.weights = {name: float((weights or {}).get(name, 1.0)) for name in heads}
        self._last_losses: dict[str, torch.Tensor] = {}
        if isinstance(encoder, ScratchEncoder):
            # once over everything, in creation order: the same draws as the single-class model of old
            self.apply(init_weights)
        else:
            self.heads.apply(init_head)

    @property
    def pad_id(self) -> int:
        return int(self.encoder.pad_id)

    @property
    def last_losses(self) -> dict[str, float]:
        """Per-task losses of the last forward with targets (floats; read them only when logging)."""
        return {name: float(loss) for name, loss in self._last_losses.items()}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, targets: dict[str, torch.Tensor] | None = None
                ) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        targets = targets or {}
        unknown = set(targets) - set(self.heads)
        if unknown:
            raise ValueError(f"targets for unknown tasks {sorted(unknown)}; tasks: {sorted(self.heads)}")
        hidden = self.encoder(ids, mask)  # (B, T, C)
        outputs: dict[str, torch.Tensor] = {}
        losses: dict[str, torch.Tensor] = {}
        for name, head in self.heads.items():
            if targets and name not in targets:
                continue  # a training batch of another task: this head's output would be thrown away
            outputs[name], task_loss = head(hidden, mask, targets.get(name))
            if task_loss is not None:
                losses[name] = task_loss
        self._last_losses = {name: loss.detach() for name, loss in losses.items()}
        if not losses:
            return outputs, None
        loss = sum(self.weights[name] * task_loss for name, task_loss in losses.items())
        return outputs, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint(self, **meta: object) -> dict:
        """Everything needed to rebuild this model from the file alone (no pretrained folder, no network)."""
        enc = self.encoder
        if isinstance(enc, ScratchEncoder):
            encoder = {"kind": "scratch", "config": enc.cfg.model_dump(), "vocab_size": enc.vocab_size,
                       "max_length": enc.max_length, "pad_id": enc.pad_id}
        elif isinstance(enc, PretrainedEncoder):
            encoder = {"kind": "pretrained", "hf_config": enc.hf_config(), "pad_id": enc.pad_id}
        else:
            raise TypeError(f"cannot checkpoint an encoder of type {type(enc).__name__}")
        return {
            "encoder": encoder,
            "heads": {name: head.spec() for name, head in self.heads.items()},
            "weights": dict(self.weights),
            "state_dict": self.state_dict(),
            **meta,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> MultiTaskModel:
        enc = ckpt["encoder"]
        if enc["kind"] == "scratch":
            encoder: nn.Module = ScratchEncoder(EncoderConfig(**enc["config"]), enc["vocab_size"],
                                                enc["max_length"], enc["pad_id"])
        elif enc["kind"] == "pretrained":
            encoder = PretrainedEncoder.from_config(enc["hf_config"], pad_id=enc["pad_id"])
        else:
            raise ValueError(f"unknown encoder kind {enc['kind']!r} in checkpoint")
        model = cls(encoder, {name: build_head(spec) for name, spec in ckpt["heads"].items()}, ckpt["weights"])
        model.load_state_dict(ckpt["state_dict"])
        return model


def build_text_model(cfg: EncoderConfig, heads: dict[str, tuple[HeadKind, int]], *, vocab_size: int | None = None,
                     max_length: int = 512, pad_id: int = 0, label_smoothing: float = 0.0,
                     head_dropout: float = 0.0, weights: dict[str, float] | None = None) -> MultiTaskModel:
    """Encoder per ``cfg.arch`` + one head per task, e.g. ``heads={"label": ("sequence", 3)}``.

    Scratch: needs the tokenizer's ``vocab_size`` and ``pad_id``, and ``max_length``. Pretrained: all
    three come from the checkpoint (``max_length`` must fit its position table). Seed before calling.
    """
    if cfg.arch == "scratch":
        if vocab_size is None:
            raise ValueError("a scratch encoder needs vocab_size (from the trained tokenizer)")
        encoder: ScratchEncoder | PretrainedEncoder = ScratchEncoder(cfg, vocab_size, max_length, pad_id)
    else:
        encoder = PretrainedEncoder.from_pretrained(resolve_pretrained(cfg.pretrained))
        if max_length > encoder.max_length:
            raise ValueError(f"max_length {max_length} exceeds {cfg.pretrained}'s {encoder.max_length} positions")
    built: dict[str, nn.Module] = {}
    for name, (kind, n) in heads.items():
        if kind == "sequence":
            built[name] = SequenceHead(encoder.hidden_size, n, cfg.pooling, head_dropout, label_smoothing)
        elif kind == "token":
            built[name] = TokenHead(encoder.hidden_size, n, head_dropout, label_smoothing)
        else:
            raise ValueError(f"unknown head kind {kind!r} for task {name!r}: sequence or token")
    return MultiTaskModel(encoder, built, weights)


def param_groups(model: nn.Module, lr: float, weight_decay: float, head_lr: float | None = None,
                 layer_decay: float = 1.0, head_lrs: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """Optimizer groups: decay matrices only (biases, norms, anything named *emb* are not shrunk).

    On a MultiTaskModel the heads get ``head_lr`` (None: ``lr``), head ``t`` ``head_lrs[t]`` when given,
    and, with ``layer_decay`` < 1, an encoder parameter at depth L (encoder.layer_id) gets
    ``lr * layer_decay ** (num_layers + 1 - L)``.
    Groups come in order of first appearance (embeddings up, then heads), decayed before not decayed;
    with neither option that is exactly [decay, no_decay].
    """
    if not 0 < layer_decay <= 1:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    encoder = model.encoder if isinstance(model, MultiTaskModel) else None
    depth = getattr(encoder, "layer_id", None) if layer_decay < 1 else None
    groups: dict[tuple[float, bool], list[torch.nn.Parameter]] = {}
    lrs: list[float] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        p_lr = lr
        if encoder is not None and name.startswith("heads."):
            p_lr = lr if head_lr is None else head_lr
            p_lr = (head_lrs or {}).get(name.split(".")[1], p_lr)
        elif depth is not None and name.startswith("encoder."):
            p_lr = lr * layer_decay ** (encoder.num_layers + 1 - depth(name.removeprefix("encoder.")))
        if p_lr not in lrs:
            lrs.append(p_lr)
        groups.setdefault((p_lr, p.dim() >= 2 and "emb" not in name), []).append(p)
    return [{"params": groups[key], "weight_decay": weight_decay if key[1] else 0.0, "lr": key[0]}
            for p_lr in lrs for key in ((p_lr, True), (p_lr, False)) if key in groups]
