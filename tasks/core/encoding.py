"""The encode stage's stored output, shared by the kinds that tokenize: the tokenizer, the label
list, one Parquet table per split, the rejects, the token statistics and the manifest."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import pyarrow as pa

from tasks.core.store import ArtifactStore, StageKey, StageRef

TOKENIZER_FILE = "tokenizer.json"
LABELS_FILE = "labels.json"
STATS_FILE = "token_stats.json"


class SavesToFile(Protocol):
    """What the encode stage stores as its tokenizer: anything with ``save(path)`` (a ``tokenizers.Tokenizer``)."""

    def save(self, path: str) -> None: ...


def store_encoded(
    store: ArtifactStore,
    key: StageKey,
    *,
    tokenizer: SavesToFile,
    labels: list[str],
    splits: Mapping[str, pa.Table],
    rejects: pa.Table,
    stats: dict[str, Any],
    rows: dict[str, int],
    extra: dict[str, Any],
) -> StageRef:
    """Write an encode stage's directory (``tokenizer.json``, ``labels.json``, ``<split>.parquet``,
    ``rejects.parquet``, ``token_stats.json``, ``manifest.json`` with ``rows`` and ``extra``) and return it."""
    with store.writer(key) as w:
        tokenizer.save(str(w.path / TOKENIZER_FILE))
        w.write_json(LABELS_FILE, labels)
        for name, table in splits.items():
            w.write_table(f"{name}.parquet", table)
        w.write_table("rejects.parquet", rejects)
        w.write_json(STATS_FILE, stats)
        return w.write_manifest(rows=rows, extra=extra)
