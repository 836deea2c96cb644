"""numpy and pandas outputs as plain JSON values: one helper for the server, batch scoring and predictors.

Inference-safe: imports only the standard library (numpy values are recognised by their ``tolist`` /
``item`` methods), so a predictor inside a served bundle can use it.

- :func:`plain`: numpy scalars and arrays, tuples, dict keys made plain, recursively; a NaN or
  infinite float becomes ``None`` (JSON has no NaN; ``json.dumps`` would write the invalid token
  ``NaN``, and ``allow_nan=False`` would raise);
- :func:`dumps`: ``json.dumps`` of :func:`plain` (strict JSON: never ``NaN``);
- :func:`is_nested` / :func:`json_columns`: which output columns Parquet must store as JSON text.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from typing import Any


def plain(value: Any) -> Any:
    """``value`` with numpy made Python, tuples made lists, dict keys made strings, NaN / inf made None."""
    if isinstance(value, float):  # numpy float64 is a float too
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if hasattr(value, "tolist"):  # numpy arrays and scalars (float32, int64 ...)
        return plain(value.tolist())
    return value


def dumps(value: Any, **kwargs: Any) -> str:
    """Strict JSON text of ``value`` (numpy made plain, NaN / inf as null)."""
    return json.dumps(plain(value), allow_nan=False, **kwargs)


def fast_dumps(value: Any) -> str:
    """:func:`dumps`, without walking ``value`` first when it is already plain and finite (the usual case)."""
    try:
        return json.dumps(value, allow_nan=False, default=_numpy)
    except ValueError:  # a NaN / inf somewhere: clean the whole value, then write it
        return dumps(value)


def _numpy(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def is_nested(value: Any) -> bool:
    """A dict, or a list holding dicts or lists: what a flat Parquet column cannot hold with one type."""
    return isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value))


def json_columns(columns: dict[str, Iterable[Any]]) -> set[str]:
    """The names of the columns to store as JSON text, decided once per column from its (plain) values.

    A column goes to JSON when any value is nested (:func:`is_nested`), or when it holds lists and every
    one is empty: ``[]`` alone does not say whether later rows hold numbers or entity records, and the
    entity list of a sentence without entities is ``[]``. Flat lists of scalars (``probabilities``,
    ``tags``) stay Parquet lists.
    """
    chosen = set()
    for name, values in columns.items():
        lists = 0
        empty = 0
        for value in values:
            if is_nested(value):
                chosen.add(name)
                break
            if isinstance(value, list):
                lists += 1
                empty += not value
        else:
            if lists and lists == empty:
                chosen.add(name)
    return chosen
