"""Stage: evaluate, for image recipes. Scores the challenger (and the re-scored champion) on the test split.

Same contract and gate as the text stage (:mod:`tasks.evaluate`, whose report, confusion matrix and
gate this reuses): ``report.json`` / ``report.md`` (accuracy, macro-F1, per-class precision, recall,
F1, support), ``confusion_matrix.png`` / ``.json``, ``predictions.json`` (``ids`` and ``pred`` in
test order) and, for images, ``misclassified.png``: a grid of up to 36 misclassified test digits
captioned ``true→predicted``. The champion is re-scored through the registry on the same images.

Run alone: ``python -m flows.evaluate_model --config configs/mnist.yaml`` (after train_model).
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import numpy as np
import pyarrow.parquet as pq
import torch

from tasks import evaluate as text_evaluate
from tasks import tracking
from tasks.artifacts import ArtifactStore, StageRef, fingerprint, source_hash
from tasks.config import Recipe
from tasks.evaluate import classification_report, confusion_png, gate, report_markdown
from tasks.vision import images
from tasks.vision import train as vision_train

STAGE = "evaluate"
MISCLASSIFIED_PNG = "misclassified.png"
MAX_SHOWN = 36

# A champion scorer: test images (flat int64 pixel rows) in, predicted label strings out (the loaded pyfunc).
PixelScorer = Callable[[np.ndarray], list[str]]


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
    recipe: Recipe,
    trained: StageRef,
    normalized: StageRef,
    store: ArtifactStore,
    champion_version: str | None = None,
    champion_scorer: PixelScorer | None = None,
    force: bool = False,
) -> StageRef:
    """Score the trained model on ``normalized/test.parquet``, re-score the champion, apply the gate."""
    config = {"evaluate": recipe.evaluate.model_dump(mode="json"), "champion_version": champion_version}
    code = source_hash(sys.modules[__name__], text_evaluate)
    fp = fingerprint(STAGE, config, [trained.fingerprint, normalized.fingerprint], code)
    if not force and (hit := store.lookup(STAGE, fp)) is not None:
        return hit
    test_table = pq.read_table(normalized.file("test.parquet"))
    pixels = images.to_numpy(test_table.column("pixels"))
    model, meta = vision_train.load_model(trained)
    labels, normalization = meta["labels"], meta["normalization"]
    probs = vision_train.predict_proba(model, pixels, normalization["mean"], normalization["std"], torch.device("cpu"))
    y_true = test_table.column("label").to_pylist()
    y_pred = [labels[i] for i in probs.argmax(1)]
    report = classification_report(y_true, y_pred, labels)

    champion_report = None
    if champion_scorer is not None:
        champion_report = classification_report(y_true, champion_scorer(pixels.astype(np.int64)), labels)
    metric = recipe.evaluate.primary_metric
    decision = gate(report[metric], champion_report[metric] if champion_report else None, champion_version,
                    recipe.evaluate)

    ids = test_table.column("id").to_pylist()
    with store.writer(STAGE, fp) as w:
        w.write_json("report.json", {"test": report, "champion": champion_report, "decision": decision.model_dump()})
        (w.path / "report.md").write_text(report_markdown(report, decision))
        cm = confusion_png(y_true, y_pred, labels, w.path / "confusion_matrix.png")
        w.write_json("confusion_matrix.json", {"labels": labels, "matrix": cm})
        w.write_json("predictions.json", {"ids": ids, "pred": y_pred})
        n_wrong = misclassified_png(pixels, ids, y_true, y_pred, normalization["image_shape"],
                                    w.path / MISCLASSIFIED_PNG)
        metrics = {f"test_{k}": v for k, v in report.items() if k != "per_class"}
        metrics.update({f"test_f1_{label}": row["f1"] for label, row in report["per_class"].items()})
        metrics["test_errors"] = n_wrong
        if champion_report:
            metrics.update({f"champion_test_{k}": v for k, v in champion_report.items() if k != "per_class"})
        return w.write_manifest(
            config=config, inputs=[trained.fingerprint, normalized.fingerprint], code=code,
            rows={"test": len(pixels)},
            extra={"metrics": metrics, "test": {k: v for k, v in report.items() if k != "per_class"},
                   "decision": decision.model_dump(), "task": recipe.task,
                   "log_files": ["report.json", "report.md", "confusion_matrix.png", "confusion_matrix.json",
                                 MISCLASSIFIED_PNG]},
        )


def champion_scorer(model_name: str) -> tuple[str | None, PixelScorer | None]:
    """The current champion's version and a scorer that loads it through the registry on first use."""
    version = tracking.alias_version(model_name, "champion")
    if version is None:
        return None, None

    def scorer(pixels: np.ndarray) -> list[str]:
        import pandas as pd

        model = tracking.load_pyfunc(f"models:/{model_name}/{version}")
        frame = pd.DataFrame({"pixels": list(np.asarray(pixels, dtype=np.int64))})
        return [str(label) for label in model.predict(frame)["label"].tolist()]

    return version, scorer
