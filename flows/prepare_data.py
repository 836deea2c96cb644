"""Sub-flow prepare_data: ingest → validate → clean → split → tokenize → augment.

Every stage is cached by content fingerprint in ``$NIGHTSHIFT_HOME/artifacts``; one MLflow run
("prep") holds every stage's metrics, reports and rejects sample.

    python -m flows.prepare_data --config configs/sst2.yaml
"""

from __future__ import annotations

from prefect import flow

from tasks.augment import augment_task
from tasks.clean import clean_task
from tasks.config import Recipe
from tasks.ingest import ingest_task
from tasks.lineage import PreparedData, mlflow_run
from tasks.split import split_task
from tasks.tokenize import tokenize_task
from tasks.validate import validate_task


@flow(name="prepare-data")
def prepare_data(recipe: Recipe, parent_run_id: str | None = None, force: bool = False) -> PreparedData:
    """Turn the recipe's raw files into tokenized, augmented train / validation / test splits."""
    with mlflow_run(recipe, "prep", parent_run_id) as run_id:
        ingested = ingest_task(recipe, run_id, force)
        validated = validate_task(recipe, ingested, run_id, force)
        cleaned = clean_task(recipe, validated, run_id, force)
        split = split_task(recipe, cleaned, run_id, force)
        tokenized = tokenize_task(recipe, split, run_id, force)
        augmented = augment_task(recipe, tokenized, run_id, force)
    return PreparedData(run_id=run_id, stages={
        "ingest": ingested, "validate": validated, "clean": cleaned,
        "split": split, "tokenize": tokenized, "augment": augmented,
    })


if __name__ == "__main__":
    from flows.params import standalone

    recipe, force = standalone(__doc__.splitlines()[0])
    print(prepare_data(recipe, force=force).model_dump_json(indent=2))
