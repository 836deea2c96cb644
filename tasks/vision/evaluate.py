"""Stage: evaluate, for image recipes. Scores the challenger (and the re-scored champion) on the test split.

Same contract and gate as the text stage (:mod:`tasks.core.gate`, whose report, confusion matrix and
gate this reuses): ``report.json`` / ``report.md`` (accuracy, macro-F1, per-class precision, recall,
F1, support), ``confusion_matrix.png`` / ``.json``, ``predictions.json`` (``ids`` and ``pred`` in
test order) and, for images, ``misclassified.png``: a grid of up to 36 misclassified test digits
captioned ``true→predicted``. The champion is re-scored through the registry on the same images.

Run alone: ``python -m flows.evaluate_model --config configs/mnist.yaml`` (after train_model).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from tasks.core.gate import store_evaluation
from tasks.core.kind import ChampionScorer
from tasks.core.store import ArtifactStore, StageRef, stage_key
from tasks.vision import images
from tasks.vision import train as vision_train
from tasks.vision.config import ImageRecipe

STAGE = "evaluate"
MISCLASSIFIED_PNG = "misclassified.png"
MAX_SHOWN = 36

# A champion scorer: test images (flat int64 pixel rows) in, predicted label strings out (the loaded pyfunc).


def misclassified_png(
    pixels: np.ndarray, ids: list[str], y_true: list[str], y_pred: list[str], image_shape: list[int], path,
    limit: int = MAX_SHOWN,
) -> int:
    """Write a grid of the first ``limit`` misclassified images (``true→pred``); return how many are wrong in all."""
    wrong = [i for i, (t, p) in enumerate(zip(y_true, y_pred)) if t != p]
    shown = wrong[:limit]
    images.grid_png(pixels[shown] if shown else np.zeros((0, pixels.shape[1]), np.uint8), image_shape,
                    [f"{images.short_id(ids[i])}: {y_true[i]}→{y_pred[i]}" for i in shown], path,
                    f"misclassified test images: {len(shown)} of {len(wrong)} (id: true→predicted)")
    return len(wrong)


def run(
    recipe: ImageRecipe,
    trained: StageRef,
    normalized: StageRef,
    store: ArtifactStore,
    champion_version: str | None = None,
    champion_scorer: ChampionScorer | None = None,
    force: bool = False,
) -> StageRef:
    """Score the trained model on ``normalized/test.parquet``, re-score the champion, apply the gate."""
    config = {"evaluate": recipe.evaluate.model_dump(mode="json"), "champion_version": champion_version}
    key = stage_key(STAGE, config, [trained.fingerprint, normalized.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    test_table = pq.read_table(normalized.file("test.parquet"))
    pixels = images.to_numpy(test_table.column("pixels"))
    model, meta = vision_train.load_model(trained)
    labels, normalization = meta["labels"], meta["normalization"]
    probs = vision_train.predict_proba(model, pixels, normalization["mean"], normalization["std"], torch.device("cpu"))
    y_true = test_table.column("label").to_pylist()
    y_pred = [labels[i] for i in probs.argmax(1)]
    ids = test_table.column("id").to_pylist()

    def misclassified(directory: Path) -> tuple[list[str], dict[str, float]]:
        wrong = misclassified_png(pixels, ids, y_true, y_pred, normalization["image_shape"], directory / MISCLASSIFIED_PNG)
        return [MISCLASSIFIED_PNG], {"test_errors": wrong}

    champion_pred = champion_scorer(list(pixels.astype(np.int64))) if champion_scorer is not None else None
    return store_evaluation(key, store, ids=ids, y_true=y_true, y_pred=y_pred, labels=labels,
                            champion_pred=champion_pred, champion_version=champion_version, cfg=recipe.evaluate,
                            write_more=misclassified)
