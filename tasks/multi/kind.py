"""The multi-task kind: every prep slot runs each task's own kind and combines the outputs; one shared
encoder with a head per task is trained, each task is evaluated by its own kind and gated on its own;
one served model answers for every head."""

from __future__ import annotations

from tasks.core.kind import Kind
from tasks.multi import evaluate, prep, train
from tasks.multi.serving import serving_facts

KIND = Kind(
    name="multi",
    task="multi-task",
    ingest=prep.ingest,
    validate=prep.validate,
    clean=prep.clean,
    split=prep.split,
    encode=prep.encode,
    augment=prep.augment,
    train=train.run,
    evaluate=evaluate.run,
    input_column="text",
    predictor="tasks.multi.predict:MultiPredictor",
    bundle_files=("model.pt", "heads", "tasks.json"),
    serving=serving_facts,
    examples=evaluate.examples,
)
