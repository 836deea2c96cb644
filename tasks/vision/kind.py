"""The image-classification kind: which function fills each pipeline slot, and how the model is served."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow.parquet as pq

from tasks.core.kind import Kind
from tasks.core.store import StageRef
from tasks.vision import (
    augment,
    clean,
    encode,
    evaluate,
    ingest,
    split,
    train,
    validate,
)


def examples(encoded: StageRef, n: int) -> list[Any]:
    """The first ``n`` test images as flat lists of ints (the served model's ``pixels`` cells)."""
    pixels = pq.read_table(encoded.file("test.parquet"), columns=["pixels"]).column("pixels").slice(0, n)
    return np.asarray(pixels.combine_chunks().flatten(), dtype=np.int64).reshape(len(pixels), -1).tolist()


def serving(recipe: Any, trained: StageRef) -> dict[str, Any]:
    """The image size and input layout, recorded as the model's metadata (the CLI resizes files to it)."""
    shape = trained.extra["normalization"]["image_shape"]
    return {"metadata": {"image_shape": list(shape), "input": "pixels: H*W integers 0-255, row-major"}}


KIND = Kind(
    name="vision",
    task="image-classification",
    ingest=ingest.run,
    validate=validate.run,
    clean=clean.run,
    split=split.run,
    encode=encode.run,
    augment=augment.run,
    train=train.run,
    evaluate=evaluate.run,
    input_column="pixels",
    predictor="tasks.vision.predict:ImagePredictor",
    bundle_files=("model.pt", "normalization.json", "labels.json"),
    serving=serving,
    examples=examples,
)
