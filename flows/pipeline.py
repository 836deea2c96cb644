"""The Nightshift pipeline: prepare_data → train_model → evaluate_model → deploy_model.

One MLflow parent run per pipeline run (tagged with the Prefect flow-run id, git commit, config
hash and data fingerprint; the flattened recipe as params), one child run per sub-flow.

    nightshift run --config configs/sst2.yaml           # or: python -m flows.pipeline --config ...
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow

from flows.deploy_model import deploy_model
from flows.evaluate_model import evaluate_model
from flows.prepare_data import prepare_data
from flows.train_model import train_model
from tasks.registry import Recipe
from tasks.stages import alert, alert_on_failure, mlflow_run, summarize


@flow(name="nightshift-pipeline")
def pipeline(recipe: Recipe, force: bool = False) -> dict[str, Any]:
    """Retrain, evaluate against the champion and release the recipe's model; returns the run summary."""
    started = time.time()
    with mlflow_run(recipe, "pipeline", None) as run_id, alert_on_failure(recipe, run_id):
        data = prepare_data(recipe, run_id, force)
        trained = train_model(recipe, data, run_id, force)
        evaluated = evaluate_model(recipe, data, trained, run_id, force)
        deployed = deploy_model(recipe, data, trained, evaluated, run_id)
        summary = summarize(recipe, run_id, data, trained, evaluated, deployed, started)
        alert(summary, data, evaluated)  # NIGHTSHIFT_ALERT_WEBHOOK; a failed run alerts from alert_on_failure
        return summary


if __name__ == "__main__":
    from flows.params import standalone
    from tasks.core.lineage import brief

    recipe, force = standalone(__doc__.splitlines()[0])
    print(brief(pipeline(recipe, force)))
