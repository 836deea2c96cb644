"""Sub-flow prepare_data: ingest → validate → clean → split → encode → augment.

Every stage is cached by content fingerprint in ``$NIGHTSHIFT_HOME/artifacts``; one MLflow run
("prep") holds every stage's metrics, reports and rejects sample.

    python -m flows.prepare_data --config configs/sst2.yaml
"""

from __future__ import annotations

from prefect import flow

from tasks import stages
from tasks.core.lineage import PreparedData
from tasks.registry import Recipe


@flow(name="prepare-data")
def prepare_data(recipe: Recipe, parent_run_id: str | None = None, force: bool = False) -> PreparedData:
    """Turn the recipe's raw files into encoded, augmented train / validation / test splits."""
    with stages.mlflow_run(recipe, "prep", parent_run_id) as run_id:
        ingested = stages.ingest(recipe, run_id, force)
        validated = stages.validate(recipe, ingested, run_id, force)
        cleaned = stages.clean(recipe, validated, run_id, force)
        split = stages.split(recipe, cleaned, run_id, force)
        encoded = stages.encode(recipe, split, run_id, force)
        augmented = stages.augment(recipe, encoded, run_id, force)
    return PreparedData(run_id=run_id, stages={
        "ingest": ingested, "validate": validated, "clean": cleaned,
        "split": split, "encode": encoded, "augment": augmented,
    })


if __name__ == "__main__":
    from flows.params import standalone
    from tasks.core.lineage import brief

    recipe, force = standalone(__doc__.splitlines()[0])
    print(brief(prepare_data(recipe, force=force)))
