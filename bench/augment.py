"""Benchmark: what EDA-style augmentation does to dev accuracy on a small SST-2 train slice.

Run from the repository root (offline, CPU; a few minutes on 2 cores)::

    python bench/augment.py --json /tmp/nightshift-bench/augment.json [--rows 2000] [--seeds 13 14 15 16 17]

For each seed: a seeded sample of ``--rows`` rows of SST-2 train goes through the real prep stages
(ingest -> validate -> clean -> split -> tokenize, each stage's ``run()`` into a temporary artifact
store; the GLUE dev set is the test file), then the augment stage runs twice: disabled (baseline)
and enabled (``copies``, ``p``; ours). The same small from-scratch Transformer classifier is trained
on each with :func:`tasks.text.train.fit` (same model, optimiser, epochs, early stopping on the same
validation split, same seed) and scored on dev with :func:`tasks.text.loader.predict_proba`. The seed
drives the train sample, the split, the augmentation draws and the initialisation/shuffling.

Result: ours = with augmentation, baseline = without, ratio = mean dev accuracy with / without,
plus per-seed figures, mean and standard deviation, and the paired per-seed differences.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from models.encoders import EncoderConfig
from tasks.core.config import TrainConfig
from tasks.core.fit import score
from tasks.core.store import ArtifactStore, StageRef
from tasks.registry import Recipe, load_recipe
from tasks.text import augment, clean, ingest, split, validate
from tasks.text import encode as tokenize
from tasks.text.config import AugmentConfig
from tasks.text.loader import EncodedSplit, predict_proba
from tasks.text.train import HEAD, build_model, fit

try:  # python -m bench.augment
    from bench import common
except ModuleNotFoundError:  # python bench/augment.py: bench/ itself is on the path
    import common  # type: ignore[no-redef]

CONFIG = common.ROOT / "configs" / "sst2.yaml"
# small enough for well under a minute per run on 2 CPU cores
MODEL = EncoderConfig(d_model=64, n_layers=1, n_heads=4, d_ff=128, dropout=0.2)
TRAIN = {"epochs": 8, "batch_size": 32, "lr": 1e-3, "patience": 3, "device": "cpu"}


def bench_recipe(config: Path, train_path: Path, seed: int, copies: int, p: float) -> Recipe:
    """The recipe with the slice as train, dev as test, the small model, and every seed set to ``seed``.

    ``augment`` is configured enabled with ``copies`` and ``p``; the baseline arm switches it off.
    """
    recipe = load_recipe(config)
    data = recipe.data.model_copy(update={"train_path": str(train_path), "test_path": str(common.ROOT / recipe.data.test_path)})
    return recipe.model_copy(update={
        "data": data,
        "model": MODEL,
        "split": recipe.split.model_copy(update={"seed": seed}),
        "augment": AugmentConfig(enabled=True, copies=copies, p=p, seed=seed),
        "train": TrainConfig(**{**TRAIN, "seed": seed}),
    })


def sample_train(config: Path, rows: int, seed: int, path: Path) -> Path:
    """Write ``rows`` rows of the recipe's train file, drawn without replacement with ``seed``, to ``path``."""
    recipe = load_recipe(config)
    table = pq.read_table(common.ROOT / recipe.data.train_path)
    if rows > table.num_rows:
        raise ValueError(f"--rows {rows} > {table.num_rows} rows in {recipe.data.train_path}")
    index = np.sort(np.random.default_rng(seed).choice(table.num_rows, size=rows, replace=False))
    pq.write_table(table.take(index), path)
    return path


def prepare(recipe: Recipe, store: ArtifactStore) -> StageRef:
    """ingest -> validate -> clean -> split -> tokenize (the real stages); the tokenize ref."""
    ingested = ingest.run(recipe, store, force=True)
    validated = validate.run(recipe, ingested, store, force=True)
    cleaned = clean.run(recipe, validated, store, force=True)
    splits = split.run(recipe, cleaned, store, force=True)
    return tokenize.run(recipe, splits, store, force=True)


def train_and_score(recipe: Recipe, tokenized: StageRef, augmented: StageRef, repeat: int = 1) -> dict[str, Any]:
    """Fit a fresh model on ``augmented``'s train split (early stopping on the tokenize validation
    split) and score it on the test split (the dev set).

    ``repeat`` > 1 trains on that many exact copies of every train row: the control arm, with the
    steps per epoch of an augmented run but nothing new in the rows.
    """
    table = pq.read_table(augmented.file("train.parquet"), columns=["input_ids", "label_id"])
    train = EncodedSplit.from_table(pa.concat_tables([table] * repeat) if repeat > 1 else table)
    validation = EncodedSplit.read(tokenized.file("validation.parquet"))
    dev = EncodedSplit.read(tokenized.file("test.parquet"))
    model = build_model(recipe, tokenized, int(tokenized.extra["num_labels"]))
    started = time.perf_counter()
    result = fit(model, train, validation, recipe)
    seconds = time.perf_counter() - started
    device = torch.device(recipe.train.device)
    predicted = predict_proba(model, dev, model.pad_id, device, HEAD).argmax(1)
    dev_scores = score(dev.labels, predicted)
    return {
        "dev_accuracy": round(dev_scores["accuracy"], 6),
        "dev_macro_f1": round(dev_scores["macro_f1"], 6),
        "best_val_accuracy": round(result.best_score, 6),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "steps": result.steps,
        "train_rows": len(train),
        "dev_rows": len(dev),
        "train_seconds": round(seconds, 3),
    }


def run_seed(config: Path, rows: int, seed: int, copies: list[int], p: float, workdir: Path) -> dict[str, Any]:
    """One seed: prep once, then train without augmentation and with each ``copies`` value."""
    train_path = sample_train(config, rows, seed, workdir / f"train-{seed}.parquet")
    store = ArtifactStore(workdir / f"artifacts-{seed}")
    recipe = bench_recipe(config, train_path, seed, copies[0], p)
    tokenized = prepare(recipe, store)
    arms: dict[str, Any] = {}
    plain = recipe.model_copy(update={"augment": recipe.augment.model_copy(update={"enabled": False})})
    passthrough = augment.run(plain, tokenized, store, force=True)
    arms["none"] = train_and_score(plain, tokenized, passthrough)
    arms[f"repeated_{copies[0]}"] = train_and_score(plain, tokenized, passthrough, repeat=1 + copies[0])
    for n in copies:
        arm = recipe.model_copy(update={"augment": recipe.augment.model_copy(update={"copies": n})})
        augmented = augment.run(arm, tokenized, store, force=True)
        arms[f"copies_{n}"] = {**train_and_score(arm, tokenized, augmented),
                               "unchanged_copies": int(augmented.extra["metrics"]["unchanged_copies"])}
    arms["rows"] = {"sample": rows, **{f"tokenize_{k}": v for k, v in tokenized.rows.items()},
                    "vocab_size": tokenized.extra["vocab_size"]}
    return arms


def arm_summary(per_seed: dict[int, dict[str, Any]], arm: str) -> dict[str, Any]:
    acc = [per_seed[s][arm]["dev_accuracy"] for s in per_seed]
    f1 = [per_seed[s][arm]["dev_macro_f1"] for s in per_seed]
    return {
        "dev_accuracy": common.mean_std(acc),
        "dev_macro_f1": common.mean_std(f1),
        "per_seed_dev_accuracy": dict(zip(map(str, per_seed), acc)),
        "train_seconds_mean": round(statistics.fmean(per_seed[s][arm]["train_seconds"] for s in per_seed), 3),
    }


def run_benchmark(config: Path = CONFIG, rows: int = 2000, seeds: tuple[int, ...] = (13, 14, 15, 16, 17),
                  copies: int = 4, extra_copies: tuple[int, ...] = (2,), p: float = 0.1, threads: int = 1) -> dict[str, Any]:
    """Every seed, every arm; the result dict that ``--json`` writes.

    ``threads`` sets torch's intra-op threads for the run: one thread is several times faster than
    two for this tiny model when other processes share the two cores (spinning OpenMP workers).
    """
    torch.set_num_threads(threads)
    all_copies = [copies, *[c for c in extra_copies if c != copies]]
    per_seed: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="nightshift-bench-augment-") as tmp:
        for seed in seeds:
            per_seed[seed] = run_seed(Path(config), rows, seed, all_copies, p, Path(tmp))
    main_arm = f"copies_{copies}"
    ours, baseline = arm_summary(per_seed, main_arm), arm_summary(per_seed, "none")
    diffs = [per_seed[s][main_arm]["dev_accuracy"] - per_seed[s]["none"]["dev_accuracy"] for s in per_seed]
    extra = {}
    for arm in [f"repeated_{copies}", *[f"copies_{n}" for n in all_copies[1:]]]:
        summary = arm_summary(per_seed, arm)
        summary["ratio"] = round(summary["dev_accuracy"]["mean"] / baseline["dev_accuracy"]["mean"], 4)
        summary["paired_difference"] = common.mean_std(
            [per_seed[s][arm]["dev_accuracy"] - per_seed[s]["none"]["dev_accuracy"] for s in per_seed])
        extra[arm] = summary
    control = f"repeated_{copies}"
    extra[control]["what"] = (f"control: augmentation off, every train row repeated {1 + copies} times, so epochs have "
                              f"the optimiser steps (and early stopping the granularity) of the copies={copies} arm")
    extra["augmented_vs_control"] = {
        "ratio": round(ours["dev_accuracy"]["mean"] / extra[control]["dev_accuracy"]["mean"], 4),
        "paired_difference": common.mean_std(
            [per_seed[s][main_arm]["dev_accuracy"] - per_seed[s][control]["dev_accuracy"] for s in per_seed]),
    }
    return {
        "name": "augment",
        "ours": {"what": f"augment.enabled=true, copies={copies}, p={p}", **ours},
        "baseline": {"what": "augment.enabled=false (same model, training config and seed)", **baseline},
        "ratio": round(ours["dev_accuracy"]["mean"] / baseline["dev_accuracy"]["mean"], 4),
        "ratio_definition": "mean dev accuracy with augmentation / mean dev accuracy without (above 1: augmentation helps)",
        "unit": "accuracy",
        "paired_difference": {**common.mean_std(diffs), "per_seed": dict(zip(map(str, per_seed), [round(d, 6) for d in diffs])),
                              "seeds_better": sum(d > 0 for d in diffs), "seeds_worse": sum(d < 0 for d in diffs)},
        "extra_arms": extra,
        "per_seed": {str(s): v for s, v in per_seed.items()},
        "settings": {
            "config": "configs/sst2.yaml",
            "rows": rows,
            "seeds": list(seeds),
            "sample": "rows drawn without replacement from SST-2 train with numpy default_rng(seed)",
            "dev_set": "data/sst2/dev.parquet (the recipe's test file; scored after the clean stage)",
            "model": MODEL.model_dump(),
            "train": TRAIN,
            "torch_threads": threads,
            "augment": {"copies": copies, "extra_copies": list(all_copies[1:]), "p": p,
                        "operations": list(AugmentConfig().operations)},
            "note": "every arm trains for the same number of epochs with early stopping on the same validation split, "
                    "so an augmented epoch has (1 + copies) times the optimiser steps; the repeated_<copies> control "
                    "has those steps without augmentation",
        },
        "machine": common.machine(),
    }


def report(result: dict[str, Any]) -> str:
    """The short human table printed after a run."""
    seeds = list(result["per_seed"])
    arms = [("none", "without augmentation"),
            *[(k, k.replace("_", " ") + (" (control)" if k.startswith("repeated_") else ""))
              for k in result["per_seed"][seeds[0]] if k.startswith(("copies_", "repeated_"))]]
    rows = [("arm", *[f"seed {s}" for s in seeds], "mean", "std")]
    for key, label in arms:
        acc = [result["per_seed"][s][key]["dev_accuracy"] for s in seeds]
        rows.append((label, *[f"{a:.4f}" for a in acc], f"{statistics.fmean(acc):.4f}",
                     f"{statistics.stdev(acc):.4f}" if len(acc) > 1 else "0"))
    d = result["paired_difference"]
    return (
        "augment benchmark: SST-2 dev accuracy\n" + common.table(rows)
        + f"\nratio (with/without, {result['ours']['what']}): {result['ratio']:.4f}; "
        + f"paired difference {d['mean']:+.4f} +- {d['std']:.4f} ({d['seeds_better']} better, {d['seeds_worse']} worse)"
        + f"\nvs the repeated-rows control: {result['extra_arms']['augmented_vs_control']['paired_difference']['mean']:+.4f} "
        + f"+- {result['extra_arms']['augmented_vs_control']['paired_difference']['std']:.4f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="Write the result here.")
    parser.add_argument("--config", default=str(CONFIG), help="Recipe (default configs/sst2.yaml).")
    parser.add_argument("--rows", type=int, default=2000, help="Train rows sampled per seed.")
    parser.add_argument("--seeds", type=int, nargs="+", default=[13, 14, 15, 16, 17], help="One run per seed and arm.")
    parser.add_argument("--copies", type=int, default=4, help="Augmented copies per row (the 'ours' arm).")
    parser.add_argument("--extra-copies", type=int, nargs="*", default=[2], help="Further copies values, reported as extra arms.")
    parser.add_argument("--p", type=float, default=0.1, help="Fraction of words each operation touches.")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1 is fastest for this model on a shared machine).")
    args = parser.parse_args(argv)
    result = run_benchmark(Path(args.config), args.rows, tuple(args.seeds), args.copies, tuple(args.extra_copies),
                           args.p, args.threads)
    common.write_result(args.json, result)
    print(report(result))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
