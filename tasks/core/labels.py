"""Label maps shared by every kind: the label list (index = label id) and labels to ids."""

from __future__ import annotations

from collections.abc import Iterable

import pyarrow as pa
import pyarrow.compute as pc

from tasks.core.store import DataError


def label_map(train_labels: Iterable[str], configured: list[str] | None = None) -> list[str]:
    """The label list (index = label id): ``configured`` order when given, else sorted train labels.

    Raises :class:`DataError` when train holds a label outside the configured set.
    """
    seen = sorted(set(train_labels))
    if configured is None:
        return seen
    if len(set(configured)) != len(configured):
        raise DataError(f"data.labels has duplicates: {configured}")
    unknown = [label for label in seen if label not in set(configured)]
    if unknown:
        raise DataError(f"train split has labels outside data.labels: {unknown}")
    return list(configured)


def label_ids(labels: pa.Array | pa.ChunkedArray, mapping: list[str]) -> pa.Array:
    """The id of each label under ``mapping`` (int32; null where the label is not in it)."""
    return pc.cast(pc.index_in(labels, value_set=pa.array(mapping, pa.string())), pa.int32())
