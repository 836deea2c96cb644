"""Sub-flow train_model: fit the model on prepared data (cached by fingerprint, resumable by checkpoint).

    python -m flows.train_model --config configs/sst2.yaml     # prepares data first (cache hits)
"""

from __future__ import annotations

from prefect import flow

from flows.prepare_data import prepare_data
from tasks import stages
from tasks.core.lineage import PreparedData, TrainedModel
from tasks.registry import Recipe, teacher_recipes


@flow(name="train-model")
def train_model(recipe: Recipe, data: PreparedData, parent_run_id: str | None = None, force: bool = False) -> TrainedModel:
    """Train on data.augment's train split with early stopping on data.encode's validation split.

    A multi-task task that distils a teacher (``tasks.<t>.distill``) has it prepared and trained first, as its
    own recipe with its own MLflow runs (a cache hit when that recipe was trained before)."""
    teachers = {task: train_model(teacher, prepare_data(teacher, None, force), None, force)
                for task, teacher in teacher_recipes(recipe).items()}
    with stages.mlflow_run(recipe, "train", parent_run_id) as run_id:
        trained = stages.train(recipe, data.stages["augment"], data.stages["encode"], run_id, force, teachers)
    return TrainedModel(run_id=run_id, stage=trained)


if __name__ == "__main__":
    from flows.params import standalone
    from tasks.core.lineage import brief

    recipe, force = standalone(__doc__.splitlines()[0])
    print(brief(train_model(recipe, prepare_data(recipe), force=force)))
