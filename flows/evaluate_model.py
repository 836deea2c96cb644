"""Sub-flow evaluate_model: test-split metrics, the champion re-scored on the same split, the gate.

    python -m flows.evaluate_model --config configs/sst2.yaml  # prepares and trains first (cache hits)
"""

from __future__ import annotations

from prefect import flow

from tasks.config import Recipe
from tasks.evaluate import evaluate_task
from tasks.lineage import Evaluated, PreparedData, TrainedModel, mlflow_run


@flow(name="evaluate-model")
def evaluate_model(
    recipe: Recipe, data: PreparedData, trained: TrainedModel, parent_run_id: str | None = None, force: bool = False
) -> Evaluated:
    """Score the challenger, re-score the champion, decide whether the challenger may be promoted."""
    with mlflow_run(recipe, "evaluate", parent_run_id) as run_id:
        evaluated = evaluate_task(recipe, trained.stage, data.stages["tokenize"], run_id, force)
    return Evaluated(run_id=run_id, stage=evaluated)


if __name__ == "__main__":
    from flows.params import standalone
    from flows.prepare_data import prepare_data
    from flows.train_model import train_model

    recipe, force = standalone(__doc__.splitlines()[0])
    data = prepare_data(recipe)
    print(evaluate_model(recipe, data, train_model(recipe, data), force=force).model_dump_json(indent=2))
