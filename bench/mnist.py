"""Benchmark: the founding document's MNIST MLP, its variant and the mnist recipe, each over several seeds.

Run from the repository root (offline, CPU; about 10-20 minutes on 2 busy cores)::

    python bench/mnist.py --json bench-results/mnist.json [--seeds 13 14 15] [--threads 1]

Arms, each scored on the 10,000 official test images, one run per seed (the seed drives
initialisation, dropout and shuffling; in the recipe arms also the augmentation draws):

* ``document_exact``: the document's protocol exactly -- its MLP (784 -> 256, ReLU, -> 128, dropout
  0.5, -> 10; ReLU after the first layer only), all 60,000 train images, Adam lr 1e-3, batch 64, 10
  epochs, cross-entropy, the weights after the last epoch. Pixels are normalised with the train
  split's mean/std (the document's own preprocessing is not stated beyond the network and optimiser).
* ``variant_exact``: the same protocol with a ReLU after both hidden layers.
* ``recipe_document``: the seed-faithful run through the pipeline's real stages -- ``configs/mnist.yaml``
  with ``model.kind=document``, ``augment.enabled=false``, ``train.schedule=constant``: 54,000 train
  images (6,000 held out for validation), 10 epochs, the best validation epoch kept.
* ``recipe``: ``configs/mnist.yaml`` as it is (the variant with augmentation and a decaying rate).
* ``recipe_cnn`` (not run by default): the recipe with ``model.kind=cnn``, one dense layer of 128 and 3 epochs.

Prep (ingest -> validate -> clean -> split -> normalize -> augment) runs through each stage's
``run()`` into a temporary artifact store; training and scoring use :mod:`tasks.vision.train`.
Result: ours = the recipe, baseline = the document's exact protocol, ratio = mean test accuracy of
ours / baseline; per arm every seed's accuracy, mean and sample standard deviation, and seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from models.vision import ImageModelConfig
from tasks.core.config import TrainConfig
from tasks.core.fit import lr_multiplier, make_optimizer
from tasks.core.store import ArtifactStore, StageRef
from tasks.registry import Recipe, load_recipe
from tasks.vision import augment, clean, images, ingest, loader, split, train, validate
from tasks.vision import encode as normalize
from tasks.vision.encode import fit_normalization

try:  # python -m bench.mnist
    from bench import common
except ModuleNotFoundError:  # python bench/mnist.py: bench/ itself is on the path
    import common  # type: ignore[no-redef]

CONFIG = common.ROOT / "configs" / "mnist.yaml"
DOCUMENT_RUN = ["model.kind=document", "augment.enabled=false", "train.schedule=constant"]
CNN_RUN = ["model.kind=cnn", "model.hidden=[128]", "train.epochs=3"]
DOCUMENT_TRAIN = TrainConfig(optimizer="adam", lr=1e-3, weight_decay=0.0, schedule="constant", warmup_fraction=0.0,
                             grad_clip=None, epochs=10, batch_size=64, device="cpu", patience=10)


def read_official(recipe: Recipe) -> dict[str, np.ndarray]:
    """The 60,000 train and 10,000 test images and labels, straight from the IDX files."""
    out = {}
    for split_name, path in (("train", recipe.data.train_path), ("test", recipe.data.test_path)):
        images_path = common.ROOT / path
        labels_path = ingest.labels_path_for(images_path, None, f"{split_name}_labels_path")
        out[f"{split_name}_pixels"] = ingest.read_idx_images(images_path).reshape(-1, 784)
        out[f"{split_name}_labels"] = ingest.read_idx_labels(labels_path).astype(np.int64)
    return out


def exact_protocol(kind: str, seed: int, data: dict[str, np.ndarray]) -> dict[str, Any]:
    """The document's training loop: every train image, 10 epochs, last weights; test accuracy per epoch."""
    cfg = DOCUMENT_TRAIN.model_copy(update={"seed": seed})
    norm = fit_normalization(data["train_pixels"])
    model = train.build_model(ImageModelConfig(kind=kind), (28, 28), 10, seed)
    torch.manual_seed(seed)
    optimizer = make_optimizer(model, cfg)
    steps = cfg.epochs * -(-len(data["train_labels"]) // cfg.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(steps, cfg))
    per_epoch = []
    started = time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        rng = np.random.default_rng([seed, epoch])
        for index in loader.shuffled_batches(len(data["train_labels"]), cfg.batch_size, rng):
            x = loader.batch_tensor(data["train_pixels"], index, norm["mean"], norm["std"])
            _, loss = model(x, torch.from_numpy(data["train_labels"][index]))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        probs = train.predict_proba(model, data["test_pixels"], norm["mean"], norm["std"])
        per_epoch.append(round(float((probs.argmax(1) == data["test_labels"]).mean()), 4))
    return {"accuracy": per_epoch[-1], "test_accuracy_per_epoch": per_epoch,
            "seconds": round(time.perf_counter() - started, 1)}


def prepared(recipe: Recipe, store: ArtifactStore) -> tuple[StageRef, StageRef]:
    """(augment ref, normalize ref) of ``recipe`` through the real prep stages."""
    ref = ingest.run(recipe, store, base_dir=common.ROOT)
    ref = validate.run(recipe, ref, store)
    ref = clean.run(recipe, ref, store)
    ref = split.run(recipe, ref, store)
    normalized = normalize.run(recipe, ref, store)
    return augment.run(recipe, normalized, store), normalized


def recipe_run(overrides: list[str], seed: int, store: ArtifactStore) -> dict[str, Any]:
    """Train ``configs/mnist.yaml`` (with ``overrides``) for ``seed`` through the stages; score on test."""
    recipe = load_recipe(CONFIG, [*overrides, f"train.seed={seed}", f"augment.seed={seed}"])
    started = time.perf_counter()
    augmented, normalized = prepared(recipe, store)
    prep_seconds = time.perf_counter() - started
    trained = train.run(recipe, augmented, normalized, store, store.root / "checkpoints", force=True)
    model, meta = train.load_model(trained)
    test = pq.read_table(normalized.file("test.parquet"))
    probs = train.predict_proba(model, images.to_numpy(test.column("pixels")), meta["normalization"]["mean"],
                                meta["normalization"]["std"])
    labels = test.column("label_id").to_numpy()
    return {"accuracy": round(float((probs.argmax(1) == labels).mean()), 4), "test_rows": len(labels),
            "best_epoch": trained.extra["metrics"]["best_epoch"],
            "best_val_accuracy": round(trained.extra["metrics"]["best_val_accuracy"], 4),
            "train_rows": trained.extra["metrics"]["train_rows"],
            "seconds": round(trained.extra["metrics"]["train_seconds"], 1), "prep_seconds": round(prep_seconds, 1)}


def arm_summary(runs: dict[int, dict[str, Any]]) -> dict[str, Any]:
    accuracies = [r["accuracy"] for r in runs.values()]
    return {"runs": {str(k): v for k, v in runs.items()}, "accuracy": common.mean_std(accuracies),
            "seconds_mean": round(statistics.fmean(r["seconds"] for r in runs.values()), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, required=True, help="write the result here")
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 14, 15])
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest for these MLPs)")
    parser.add_argument("--arms", nargs="+", default=["document_exact", "variant_exact", "recipe_document", "recipe"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    recipe = load_recipe(CONFIG)
    data = read_official(recipe)
    arms: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="nightshift-bench-mnist-") as tmp:
        store = ArtifactStore(Path(tmp) / "artifacts")
        for arm in args.arms:
            runs = {}
            for seed in args.seeds:
                if arm == "document_exact":
                    runs[seed] = exact_protocol("document", seed, data)
                elif arm == "variant_exact":
                    runs[seed] = exact_protocol("variant", seed, data)
                elif arm == "recipe_document":
                    runs[seed] = recipe_run(DOCUMENT_RUN, seed, store)
                elif arm == "recipe_cnn":
                    runs[seed] = recipe_run(CNN_RUN, seed, store)
                elif arm == "recipe":
                    runs[seed] = recipe_run([], seed, store)
                else:
                    parser.error(f"unknown arm {arm!r}")
                print(f"{arm} seed {seed}: {runs[seed]}", flush=True)
            arms[arm] = arm_summary(runs)
    ours = arms.get("recipe", {}).get("accuracy")
    baseline = arms.get("document_exact", {}).get("accuracy")
    result = {
        "name": "mnist",
        "ours": {"arm": "recipe", **(ours or {})},
        "baseline": {"arm": "document_exact", **(baseline or {})},
        "ratio": round(ours["mean"] / baseline["mean"], 4) if ours and baseline else None,
        "unit": "test accuracy on the 10,000 MNIST test images (mean and sample std over seeds)",
        "machine": common.machine(),
        "seeds": args.seeds,
        "threads": args.threads,
        "arms": arms,
        "recipe": load_recipe(CONFIG).as_dict(),
    }
    common.write_result(args.json, result)
    rows = [("arm", "accuracy mean", "std", "per seed", "train s (mean)")]
    for arm, s in arms.items():
        rows.append((arm, f"{s['accuracy']['mean']:.4f}", f"{s['accuracy']['std']:.4f}",
                     " ".join(f"{r['accuracy']:.4f}" for r in s["runs"].values()), f"{s['seconds_mean']:.0f}"))
    print(common.table(rows))


if __name__ == "__main__":
    main()
