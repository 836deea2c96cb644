"""Sub-flow evaluate_model: test-split metrics, the champion re-scored on the same split, the gate.

    python -m flows.evaluate_model --config configs/sst2.yaml  # prepares and trains first (cache hits)
"""

from __future__ import annotations

from prefect import flow

from tasks import stages
from tasks.core.lineage import Evaluated, PreparedData, TrainedModel
from tasks.registry import Recipe


@flow(name="evaluate-model")
def evaluate_model(
    recipe: Recipe, data: PreparedData, trained: TrainedModel, parent_run_id: str | None = None, force: bool = False
) -> Evaluated:
    """Score the challenger, re-score the champion, decide whether the challenger may be promoted."""
    with stages.mlflow_run(recipe, "evaluate", parent_run_id) as run_id:
        evaluated = stages.evaluate(recipe, trained.stage, data.stages["encode"], run_id, force)
    return Evaluated(run_id=run_id, stage=evaluated)


if __name__ == "__main__":
    from flows.params import standalone
    from flows.prepare_data import prepare_data
    from flows.train_model import train_model
    from tasks.core.lineage import brief

    recipe, force = standalone(__doc__.splitlines()[0])
    data = prepare_data(recipe)
    print(brief(evaluate_model(recipe, data, train_model(recipe, data), force=force)))
