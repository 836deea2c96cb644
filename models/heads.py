"""Task heads on encoder hidden states (B, T, C): ``forward(hidden, mask, targets=None) -> (logits, loss)``.

``SequenceHead``: one label per text; pools the real tokens (mean, masked max, or the first token,
[CLS]) and applies a linear layer -> logits (B, K). ``TokenHead``: one tag per token -> logits
(B, T, K); targets of -100 (and padding positions) are ignored. Losses are computed in float32.
Heads do not initialise themselves: the model they sit in does (models.multitask).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

Pooling = Literal["mean", "max", "cls"]
IGNORE_INDEX = -100


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Sentence vectors (B, C) from hidden states (B, T, C) and mask (B, T), 1 = real token."""
    if pooling == "cls":
        return hidden[:, 0]
    keep = mask.bool().unsqueeze(-1)  # (B, T, 1)
    if pooling == "max":
        return hidden.masked_fill(~keep, float("-inf")).amax(1)
    w = keep.to(hidden.dtype)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1.0)


class SequenceHead(nn.Module):
    """Pool, (dropout), linear: logits (B, num_classes)."""

    kind = "sequence"

    def __init__(self, hidden: int, num_classes: int, pooling: Pooling = "mean", dropout: float = 0.0,
                 label_smoothing: float = 0.0):
        super().__init__()
        if pooling not in ("mean", "max", "cls"):
            raise ValueError(f"pooling must be mean, max or cls, got {pooling!r}")
        self.hidden, self.num_classes, self.pooling = hidden, num_classes, pooling
        self.dropout, self.label_smoothing = dropout, label_smoothing
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = nn.Linear(hidden, num_classes)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.proj(self.drop(pool(hidden, mask, self.pooling)))  # (B, K)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def spec(self) -> dict[str, Any]:
        """Kind and constructor arguments: enough to rebuild this head (see build_head)."""
        return {"kind": self.kind, "hidden": self.hidden, "num_classes": self.num_classes, "pooling": self.pooling,
                "dropout": self.dropout, "label_smoothing": self.label_smoothing}


class TokenHead(nn.Module):
    """(Dropout), linear per token: logits (B, T, num_tags)."""

    kind = "token"

    def __init__(self, hidden: int, num_tags: int, dropout: float = 0.0, label_smoothing: float = 0.0):
        super().__init__()
        self.hidden, self.num_tags = hidden, num_tags
        self.dropout, self.label_smoothing = dropout, label_smoothing
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.proj = nn.Linear(hidden, num_tags)

    @property
    def num_classes(self) -> int:
        return self.num_tags

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.proj(self.drop(hidden))  # (B, T, K)
        if targets is None:
            return logits, None
        targets = targets.masked_fill(~mask.bool(), IGNORE_INDEX)  # (B, T): padding never counts
        total = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX,
                                label_smoothing=self.label_smoothing, reduction="sum")
        # mean over the counted tokens; 0 (not NaN) when a batch has none, and no host sync to find out
        return logits, total / (targets != IGNORE_INDEX).sum().clamp(min=1)

    def spec(self) -> dict[str, Any]:
        return {"kind": self.kind, "hidden": self.hidden, "num_tags": self.num_tags, "dropout": self.dropout,
                "label_smoothing": self.label_smoothing}


HEADS: dict[str, type[nn.Module]] = {"sequence": SequenceHead, "token": TokenHead}


def build_head(spec: dict[str, Any]) -> nn.Module:
    """The inverse of ``head.spec()``."""
    args = dict(spec)
    kind = args.pop("kind")
    if kind not in HEADS:
        raise ValueError(f"unknown head kind {kind!r}; known: {sorted(HEADS)}")
    return HEADS[kind](**args)
