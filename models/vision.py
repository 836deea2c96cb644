"""Image classifiers for small greyscale images (MNIST): the founding document's MLP, a variant, a small CNN.

Every network takes normalised pixels ``x`` of shape (B, H*W), row-major (the data pipeline keeps
images flat), and ``forward(x, targets=None)`` returns ``(logits, loss)`` with logits (B, C); the
loss is cross-entropy on float32 logits, with optional label smoothing.

``document`` is the founding document's worked example exactly as its code writes it::

    x -> Linear(784, 256) -> ReLU -> Linear(256, 128) -> Dropout(0.5) -> Linear(128, 10)

Its code applies ReLU after the first layer only, so the 256 -> 128 -> 10 part is linear: a rank-128
factorisation of a single 256 -> 10 layer, with dropout in between. We keep it that way on purpose:
it is what the document measured.

``variant`` puts a ReLU after every hidden layer (presumably what the document meant), dropout
before the output layer. ``cnn`` is a small convolutional network: per entry of ``channels`` a
3x3 convolution (padding 1), ReLU and 2x2 max-pool; then the ``hidden`` dense layers with ReLU,
dropout, and the output layer.

PyTorch's default initialisation is kept (it is what the document used).
"""

from __future__ import annotations

import math
from itertools import pairwise
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

ImageModelKind = Literal["document", "variant", "cnn"]


class ImageModelConfig(BaseModel):
    """Architecture of an image classifier (input size and class count come from the data)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: ImageModelKind = Field(
        default="variant",
        description="document: the founding document's MLP as written (ReLU after the first hidden layer only); "
        "variant: ReLU after every hidden layer; cnn: small convolutional network.",
    )
    hidden: list[int] = Field(
        default=[256, 128], min_length=1, max_length=8,
        description="Hidden layer sizes (document: exactly two; cnn: dense layers after the convolutions).",
    )
    dropout: float = Field(default=0.5, ge=0, lt=1, description="Dropout before the output layer.")
    channels: list[int] = Field(
        default=[32, 64], min_length=1, max_length=4,
        description="cnn only: output channels of each 3x3 conv + ReLU + 2x2 max-pool block.",
    )

    @model_validator(mode="after")
    def _check_sizes(self) -> ImageModelConfig:
        if self.kind == "document" and len(self.hidden) != 2:
            raise ValueError(f"model.hidden: the document's MLP has exactly two hidden layers, got {self.hidden}")
        for name, sizes in (("hidden", self.hidden), ("channels", self.channels)):
            if any(not 1 <= s <= 65536 for s in sizes):
                raise ValueError(f"model.{name}: sizes must be between 1 and 65536, got {sizes}")
        return self


class DocumentMLP(nn.Module):
    """The founding document's network, layer names as in its code."""

    def __init__(self, cfg: ImageModelConfig, in_features: int, num_classes: int):
        super().__init__()
        h1, h2 = cfg.hidden
        self.fc1 = nn.Linear(in_features, h1)
        self.fc2 = nn.Linear(h1, h2)
        self.fc3 = nn.Linear(h2, num_classes)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc1(x))  # (B, 256)
        x = self.fc2(x)  # (B, 128): no activation here, exactly as the document writes it
        x = self.dropout(x)
        return self.fc3(x)  # (B, C)


class MLP(nn.Module):
    """Linear + ReLU per hidden layer, dropout, linear output layer."""

    def __init__(self, cfg: ImageModelConfig, in_features: int, num_classes: int):
        super().__init__()
        sizes = [in_features, *cfg.hidden]
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in pairwise(sizes))
        self.dropout = nn.Dropout(cfg.dropout)
        self.out = nn.Linear(sizes[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.hidden:
            x = F.relu(layer(x))
        return self.out(self.dropout(x))


class SmallCNN(nn.Module):
    """[3x3 conv -> ReLU -> 2x2 max-pool] per channel count, then dense layers like MLP."""

    def __init__(self, cfg: ImageModelConfig, image_shape: tuple[int, int], num_classes: int):
        super().__init__()
        self.image_shape = image_shape
        chans = [1, *cfg.channels]
        self.convs = nn.ModuleList(nn.Conv2d(a, b, kernel_size=3, padding=1) for a, b in pairwise(chans))
        h, w = image_shape
        for _ in cfg.channels:  # each max-pool halves the side, rounding down
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"model.channels: {len(cfg.channels)} pooling blocks shrink a {image_shape} image "
                             "to nothing")
        self.mlp = MLP(cfg, chans[-1] * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(x.shape[0], 1, *self.image_shape)  # (B, 1, H, W)
        for conv in self.convs:
            x = F.max_pool2d(F.relu(conv(x)), 2)  # (B, c, H/2, W/2)
        return self.mlp(x.flatten(1))


class ImageClassifier(nn.Module):
    """One of the networks above behind ``forward(x, targets=None) -> (logits, loss)``."""

    def __init__(self, cfg: ImageModelConfig, image_shape: tuple[int, int], num_classes: int,
                 label_smoothing: float = 0.0):
        super().__init__()
        if not 0 <= label_smoothing < 1:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.cfg = cfg
        self.image_shape = (int(image_shape[0]), int(image_shape[1]))
        self.num_classes = num_classes
        self.label_smoothing = float(label_smoothing)
        in_features = math.prod(self.image_shape)
        if cfg.kind == "document":
            self.net: nn.Module = DocumentMLP(cfg, in_features, num_classes)
        elif cfg.kind == "variant":
            self.net = MLP(cfg, in_features, num_classes)
        else:
            self.net = SmallCNN(cfg, self.image_shape, num_classes)

    @property
    def in_features(self) -> int:
        return math.prod(self.image_shape)

    def forward(self, x: torch.Tensor, targets: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        logits = self.net(x)  # (B, C)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float(), targets, label_smoothing=self.label_smoothing)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def checkpoint(self, **meta: object) -> dict:
        """Everything needed to rebuild this model from the file alone (nanoGPT habit)."""
        return {
            "model_config": self.cfg.model_dump(),
            "image_shape": list(self.image_shape),
            "num_classes": self.num_classes,
            "label_smoothing": self.label_smoothing,
            "state_dict": self.state_dict(),
            **meta,
        }

    @classmethod
    def from_checkpoint(cls, ckpt: dict) -> ImageClassifier:
        model = cls(ImageModelConfig(**ckpt["model_config"]), tuple(ckpt["image_shape"]), ckpt["num_classes"],
                    ckpt.get("label_smoothing", 0.0))
        model.load_state_dict(ckpt["state_dict"])
        return model
