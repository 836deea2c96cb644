"""Stage: evaluate. Scores the challenger (and the re-scored champion) on the test split and gates it.

The challenger must reach ``evaluate.min_score`` on the primary metric, and must not fall below the
champion by more than ``evaluate.max_regression``, both measured on the *same current* test split:
the champion is re-scored, never compared by the numbers it had when it was trained.

Run alone: ``python -m flows.evaluate_model --config configs/sst2.yaml`` (after train_model).
"""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import torch

from tasks.core.gate import store_evaluation
from tasks.core.kind import ChampionScorer
from tasks.core.store import ArtifactStore, StageRef, stage_key
from tasks.text.config import TextRecipe
from tasks.text.loader import EncodedSplit, predict_proba
from tasks.text.train import HEAD, load_model

STAGE = "evaluate"



def run(
    recipe: TextRecipe,
    trained: StageRef,
    tokenized: StageRef,
    store: ArtifactStore,
    champion_version: str | None = None,
    champion_scorer: ChampionScorer | None = None,
    force: bool = False,
) -> StageRef:
    """Score the trained model on ``tokenized/test.parquet``, re-score the champion, apply the gate."""
    config = {"evaluate": recipe.evaluate.model_dump(mode="json"), "champion_version": champion_version}
    key = stage_key(STAGE, config, [trained.fingerprint, tokenized.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    test_table = pq.read_table(tokenized.file("test.parquet"))
    test = EncodedSplit.from_table(test_table)
    labels = json.loads(trained.file("labels.json").read_text())
    model = load_model(trained)
    probs = predict_proba(model, test, model.pad_id, torch.device("cpu"), HEAD)
    champion_pred = champion_scorer(test_table.column("text").to_pylist()) if champion_scorer is not None else None
    return store_evaluation(key, store, ids=test_table.column("id").to_pylist(),
                            y_true=test_table.column("label").to_pylist(), y_pred=[labels[i] for i in probs.argmax(1)],
                            labels=labels, champion_pred=champion_pred, champion_version=champion_version,
                            cfg=recipe.evaluate)
