"""Transformer encoder for sequence classification, written plainly on scaled dot-product attention.

token + learned position embeddings -> N pre-LayerNorm blocks (multi-head self-attention, GELU
feed-forward, residuals, dropout) -> final LayerNorm -> mean or [CLS] pooling -> linear head.
Padding positions are masked out of attention and pooling, so padding never changes a prediction.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator


class TransformerConfig(BaseModel):
    """Architecture of the from-scratch encoder (vocab size and class count come from the data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    d_model: int = Field(default=128, ge=8, le=4096, description="Hidden size.")
    n_layers: int = Field(default=2, ge=1, le=48, description="Number of encoder blocks.")
    n_heads: int = Field(default=4, ge=1, le=64, description="Attention heads; must divide d_model.")
    d_ff: int = Field(default=256, ge=8, le=16384, description="Feed-forward inner size.")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout on embeddings, attention and residual branches.")
    attention_dropout: float | None = Field(
        default=None, ge=0, lt=1, description="Dropout on attention weights; null: the same as dropout."
    )
    token_dropout: float = Field(
        default=0.0, ge=0, lt=1,
        description="Training only: zero this fraction of token embeddings (whole words vanish; a regulariser for small data).",
    )
    pooling: Literal["mean", "max", "cls"] = Field(
        default="mean", description="Sentence vector: mean or element-wise max over non-pad tokens, or the [CLS] token."
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> TransformerConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model})")
        return self


class SelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout if cfg.attention_dropout is None else cfg.attention_dropout
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        # (B, T, C) -> (B, heads, T, C/heads)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        # keep: (B, T) bool, True for real tokens; broadcast over heads and query positions
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=keep[:, None, None, :], dropout_p=self.dropout if self.training else 0.0
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


class FeedForward(nn.Module):
    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm encoder block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: TransformerConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), keep)
        return x + self.ffn(self.ln2(x))


class TransformerClassifier(nn.Module):
    """Encoder + classification head. ``forward(ids, mask, targets=None) -> (logits, loss)``."""

    def __init__(self, cfg: TransformerConfig, vocab_size: int, num_classes: int, max_length: int, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model, padding_idx=pad_id)
        self.pos_emb = nn.Embedding(max_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, num_classes)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=0.02)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.02)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()

    def encode(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sentence vectors (B, d_model) for token ids (B, T) with mask (B, T), 1 = real token."""
        B, T = ids.shape
        keep = mask.bool()
        pos = torch.arange(T, device=ids.device)
        tok = self.tok_emb(ids)  # (B, T, C)
        if self.training and self.cfg.token_dropout > 0:
            # drop whole tokens (not features): the model cannot lean on any single rare word
            tok = tok * (torch.rand(B, T, 1, device=ids.device) >= self.cfg.token_dropout).to(tok.dtype)
        x = self.drop(tok + self.pos_emb(pos)[None])  # (B, T, C)
        for block in self.blocks:
            x = block(x, keep)
        x = self.ln_f(x)
        if self.cfg.pooling == "cls":
            return x[:, 0]
        if self.cfg.pooling == "max":
            return x.masked_fill(~keep.unsqueeze(-1), float("-inf")).amax(1)
        w = keep.unsqueeze(-1).to(x.dtype)  # (B, T, 1)
        return (x * w).sum(1) / w.sum(1).clamp(min=1.0)

    def forward(
        self, ids: torch.Tensor, mask: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.head(self.encode(ids, mask))  # (B, num_classes)
        loss = F.cross_entropy(logits, targets) if targets is not None else None
        return logits, loss

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint(self, **meta: object) -> dict:
        """Everything needed to rebuild this model from the file alone (nanoGPT habit)."""
        return {
            "model_config": self.cfg.model_dump(),
            "vocab_size": self.tok_emb.num_embeddings,
            "num_classes": self.head.out_features,
            "max_length": self.pos_emb.num_embeddings,
            "pad_id": self.pad_id,
            "state_dict": self.state_dict(),
            **meta,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> TransformerClassifier:
        model = cls(
            TransformerConfig(**ckpt["model_config"]), ckpt["vocab_size"], ckpt["num_classes"],
            ckpt["max_length"], ckpt["pad_id"],
        )
        model.load_state_dict(ckpt["state_dict"])
        return model
