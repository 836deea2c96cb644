"""The token-classification kind: which function fills each pipeline slot, and how the model is served."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from tasks.core.kind import Kind
from tasks.core.store import StageRef
from tasks.tokens import (
    augment,
    clean,
    encode,
    evaluate,
    ingest,
    split,
    train,
    validate,
)
from tasks.tokens.train import serving_facts


def examples(encoded: StageRef, n: int) -> list[Any]:
    """The first ``n`` test sentences as raw text: their tokens joined by single spaces (the served
    model splits them back into exactly those words)."""
    tokens = pq.read_table(encoded.file("test.parquet"), columns=["tokens"]).column("tokens").slice(0, n).to_pylist()
    return [" ".join(t) for t in tokens]


KIND = Kind(
    name="tokens",
    task="token-classification",
    ingest=ingest.run,
    validate=validate.run,
    clean=clean.run,
    split=split.run,
    encode=encode.run,
    augment=augment.run,
    train=train.run,
    evaluate=evaluate.run,
    input_column="text",
    predictor="tasks.tokens.predict:TokenPredictor",
    bundle_files=("model.pt", "tokenizer.json", "labels.json"),
    serving=serving_facts,
    examples=examples,
)
