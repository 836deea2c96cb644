"""How the fit loop and the predictors read encoded text: flat token-id arrays, length-bucketed
batches, dynamic padding. No Prefect, no MLflow: the served predictor uses it too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from tasks.core.batching import Loader, predict_loader


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


def text_loader(split: EncodedSplit, batch_size: int, pad_id: int, head: str) -> Loader:
    """Length-bucketed, dynamically padded batches of token ids: inputs (ids, mask), targets {head: labels}."""
    return Loader(
        size=len(split),
        batches=lambda rng: length_bucketed_batches(split.lengths, batch_size, rng),
        inputs=lambda index: collate(split, index, pad_id)[:2],
        targets=lambda index: {head: torch.from_numpy(split.labels[index])},
    )


def predict_proba(
    model: torch.nn.Module, split: EncodedSplit, pad_id: int, device: torch.device, head: str, batch_size: int = 256
) -> np.ndarray:
    """Class probabilities (n, C) of ``head`` on a token-id split, in the split's row order."""
    return predict_loader(model, text_loader(split, batch_size, pad_id, head), device, head)
