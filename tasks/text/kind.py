"""The text-classification kind: which function fills each pipeline slot, and how the model is served."""

from __future__ import annotations

from typing import Any

import pyarrow.parquet as pq

from tasks.core.kind import Kind
from tasks.core.store import StageRef
from tasks.text import augment, clean, encode, evaluate, ingest, split, train, validate
from tasks.text.train import serving_facts


def examples(encoded: StageRef, n: int) -> list[Any]:
    """The first ``n`` raw test texts."""
    return pq.read_table(encoded.file("test.parquet"), columns=["text"]).column("text").slice(0, n).to_pylist()


KIND = Kind(
    name="text",
    task="text-classification",
    ingest=ingest.run,
    validate=validate.run,
    clean=clean.run,
    split=split.run,
    encode=encode.run,
    augment=augment.run,
    train=train.run,
    evaluate=evaluate.run,
    input_column="text",
    predictor="tasks.text.predict:TextPredictor",
    bundle_files=("model.pt", "tokenizer.json", "labels.json"),
    serving=serving_facts,
    examples=examples,
)
