"""How the fit loop and the predictor read images: flat uint8 pixels, normalised per batch.
Inference-safe (torch, numpy, pyarrow): the served predictor uses it too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.core.batching import Loader, predict_loader
from tasks.vision import images
from tasks.vision.encode import normalize

PREDICT_BATCH = 1024


@dataclass(frozen=True)
class ImageSplit:
    """One split as arrays: flat uint8 pixels (n, H*W) and label ids (n,)."""

    pixels: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    @classmethod
    def from_table(cls, table: pa.Table) -> ImageSplit:
        return cls(images.to_numpy(table.column("pixels")), table.column("label_id").to_numpy().astype(np.int64))

    @classmethod
    def read(cls, path: Path) -> ImageSplit:
        return cls.from_table(pq.read_table(path, columns=["pixels", "label_id"]))


def shuffled_batches(n: int, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """``range(n)`` cut into batches, in a random permutation when ``rng`` is given."""
    order = rng.permutation(n) if rng is not None else np.arange(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def batch_tensor(pixels: np.ndarray, index: np.ndarray | slice, mean: float, std: float) -> torch.Tensor:
    """Normalised float32 pixels (B, H*W) of the rows ``index``."""
    return torch.from_numpy(normalize(pixels[index], mean, std))


def image_loader(pixels: np.ndarray, labels: np.ndarray, batch_size: int, mean: float, std: float) -> Loader:
    """Shuffled batches of normalised pixels for :func:`tasks.core.fit.fit_loader`; targets are label ids."""
    return Loader(
        size=len(labels),
        batches=lambda rng: shuffled_batches(len(labels), batch_size, rng),
        inputs=lambda index: (batch_tensor(pixels, index, mean, std),),
        targets=lambda index: torch.from_numpy(labels[index]),
    )


def predict_proba(
    model: torch.nn.Module, pixels: np.ndarray, mean: float, std: float, device: torch.device | None = None,
    batch_size: int = PREDICT_BATCH,
) -> np.ndarray:
    """Class probabilities (n, C) of flat uint8 images (n, H*W), in row order."""
    loader = image_loader(pixels, np.zeros(len(pixels), dtype=np.int64), batch_size, mean, std)
    return predict_loader(model, loader, device or torch.device("cpu"))

