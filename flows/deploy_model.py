"""Sub-flow deploy_model: register the challenger; if the gate passed, infra-validate it and move the champion alias.

    python -m flows.deploy_model --config configs/sst2.yaml    # runs the stages before it (cache hits)
"""

from __future__ import annotations

from prefect import flow

from tasks import stages
from tasks.core.lineage import Deployed, Evaluated, PreparedData, TrainedModel
from tasks.registry import Recipe


@flow(name="deploy-model")
def deploy_model(
    recipe: Recipe, data: PreparedData, trained: TrainedModel, evaluated: Evaluated, parent_run_id: str | None = None
) -> Deployed:
    """Under the model's release lock: log + register the challenger (from the train run); when the gate passed,
    infra-validate it in a real server and promote it to champion."""
    with stages.mlflow_run(recipe, "deploy", parent_run_id) as run_id, stages.release_lock(recipe, parent_run_id):
        encoded = data.stages["encode"]
        registered = stages.register(recipe, trained.stage, evaluated.stage, encoded, data.fingerprint, trained.run_id)
        release = stages.deploy(recipe, registered.version, evaluated.stage, encoded, run_id, parent_run_id)
    return Deployed(run_id=run_id, name=registered.name, version=registered.version, uri=registered.uri,
                    reused=registered.reused, release=release.model_dump())


if __name__ == "__main__":
    from flows.evaluate_model import evaluate_model
    from flows.params import standalone
    from flows.prepare_data import prepare_data
    from flows.train_model import train_model
    from tasks.core.lineage import brief

    recipe, force = standalone(__doc__.splitlines()[0])
    data = prepare_data(recipe)
    trained = train_model(recipe, data)
    print(brief(deploy_model(recipe, data, trained, evaluate_model(recipe, data, trained))))
