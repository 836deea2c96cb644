"""Benchmark: data-prep speed on SST-2 train, ours against what a user would otherwise write.

Run from the repository root (offline; a few minutes on 2 cores)::

    python bench/prep.py --json /tmp/nightshift-bench/prep.json [--rows N] [--repeat K]

Three comparisons on the same texts, in one process, on the same machine:

(a) clean + tokenize: :func:`tasks.text.clean.clean_texts` then :func:`tasks.text.encode.encode`, against
    HF ``datasets.Dataset.from_dict(...).map(batched=True)`` running an equivalent pure-Python
    cleaning function and the same tokenizer's ``encode_batch`` (output: cleaned text plus
    ``input_ids``; both outputs are checked identical). ``speedup_vs_hf_datasets`` = HF / ours.
(b) tokenization alone: :func:`tasks.text.encode.encode` against a bare ``tokenizer.encode_batch``
    on the cleaned texts. ``tokenize_vs_raw`` = ours / raw.
(c) the whole prep, ingest -> validate -> clean -> split -> tokenize -> augment, through each
    stage's ``run(..., force=True)`` into a temporary artifact store (validation, Parquet writes,
    tokenizer training and augmentation as the recipe has it). ``prep_vs_raw`` = whole / (b)'s raw.

In (a) and (b) the tokenizer is trained once beforehand on the cleaned texts and shared by both
sides: training is excluded from both. In (c) it is included, because the tokenize stage trains it.
Each measurement is warmed up once, then run ``--repeat`` times with ours and the baselines
alternating inside the same loop (the order flips every repeat), so machine noise from other
processes hits both sides. Seconds are medians over repeats; each ratio is the median over repeats
of the ratio within a repeat, because the load of a shared machine drifts over a run and the two
sides of a repeat ran back to back (the ratios of the medians are reported too, with CPU-time ratios).
"""

from __future__ import annotations

import argparse
import html
import os
import re
import statistics
import tempfile
import time
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from tokenizers import Tokenizer

from tasks.core.store import ArtifactStore
from tasks.registry import Recipe, load_recipe
from tasks.text import augment, clean, ingest, split, validate
from tasks.text import encode as tokenize
from tasks.text.config import CleanConfig

try:  # python -m bench.prep
    from bench import common
except ModuleNotFoundError:  # python bench/prep.py: bench/ itself is on the path
    import common  # type: ignore[no-redef]

CONFIG = common.ROOT / "configs" / "sst2.yaml"
TARGETS = {"speedup_vs_hf_datasets": (">=", 1.5), "tokenize_vs_raw": ("<=", 1.3), "prep_vs_raw": ("<=", 3.0)}
HF_BATCH_SIZE = 1000  # datasets' default for map(batched=True)
PREP_STAGES = ("ingest", "validate", "clean", "split", "encode", "augment")

# ------------------------------------------------------------------------------------------------
# the baseline a user would write: pure-Python cleaning equivalent to tasks.text.clean.clean_texts

# clean.HTML_BLOCK in Python syntax; RE2's ASCII ``\b`` and ``\s`` spelled out
BLOCK_RE = re.compile(r"(?is)<(?:script|style)(?![A-Za-z0-9_]).*?</(?:script|style)[\t\n\f\r ]*>|<!--.*?-->")
TAG_RE = re.compile(r"</?[A-Za-z][^<>]*>|<![A-Za-z][^<>]*>")
CONTROL_RE = re.compile("[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\xad\u200b\u2060\ufeff]+")
OTHER_SPACE_RE = re.compile("[\t\n\x0b\x0c\r\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]")
SPACE_RUN_RE = re.compile("  +")


def clean_text_py(text: str, cfg: CleanConfig) -> str:
    """One text cleaned the plain-Python way: HTML strip + unescape, NFKC, controls, spaces."""
    if cfg.strip_html:
        text = html.unescape(TAG_RE.sub(" ", BLOCK_RE.sub(" ", text)))
    text = unicodedata.normalize("NFKC", text)
    text = SPACE_RUN_RE.sub(" ", OTHER_SPACE_RE.sub(" ", CONTROL_RE.sub("", text))).strip(" ")
    return text.lower() if cfg.lowercase else text


def hf_datasets() -> Any:
    """The ``datasets`` module, imported offline with progress bars off."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import datasets

    datasets.disable_progress_bars()
    return datasets


def hf_clean_and_tokenize(raw: pa.Array, tokenizer: Tokenizer, cfg: CleanConfig, method: str = "encode_batch") -> Any:
    """Baseline (a): an in-memory ``Dataset`` mapped in batches with the Python cleaning and the
    tokenizer's ``encode_batch`` (or ``method``); returns the dataset (columns ``text, input_ids``).

    No cache can help it: the dataset lives in memory, ``load_from_cache_file=False`` and
    ``keep_in_memory=True``. ``new_fingerprint`` spares it hashing the map function, which favours HF.
    """
    datasets = hf_datasets()
    encode_batch = getattr(tokenizer, method)

    def clean_and_encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [clean_text_py(t, cfg) for t in batch["text"]]
        return {"text": texts, "input_ids": [e.ids for e in encode_batch(texts)]}

    dataset = datasets.Dataset.from_dict({"text": raw})
    out = dataset.map(
        clean_and_encode, batched=True, batch_size=HF_BATCH_SIZE, load_from_cache_file=False,
        keep_in_memory=True, new_fingerprint=f"bench-prep-{method}",
    )
    if out.cache_files:  # pragma: no cover - would mean the comparison touched the disk cache
        raise RuntimeError(f"HF datasets wrote cache files: {out.cache_files}")
    return out


# ------------------------------------------------------------------------------------------------
# ours


def ours_clean_and_tokenize(raw: pa.Array, tokenizer: Tokenizer, cfg: CleanConfig) -> pa.Table:
    """Ours (a): the clean stage's text function, then the tokenize stage's encoder."""
    cleaned = clean.clean_texts(raw, cfg)
    return pa.table({"text": cleaned, "input_ids": tokenize.encode(tokenizer, cleaned.to_pylist())})


def raw_encode(tokenizer: Tokenizer, texts: list[str], method: str = "encode_batch") -> int:
    """Baseline (b): the bare tokenizer call; the encodings are dropped (and freed) before returning."""
    return len(getattr(tokenizer, method)(texts))


def prep_recipe(config: Path, rows: int | None, workdir: Path) -> Recipe:
    """The recipe with absolute data paths; with ``rows``, train is its first ``rows`` rows
    (written to ``workdir``)."""
    recipe = load_recipe(config)
    train = common.ROOT / recipe.data.train_path
    if rows is not None:
        sliced = workdir / "train.parquet"
        pq.write_table(pq.read_table(train).slice(0, rows), sliced)
        train = sliced
    update: dict[str, Any] = {"train_path": str(train)}
    if recipe.data.test_path:
        update["test_path"] = str(common.ROOT / recipe.data.test_path)
    return recipe.model_copy(update={"data": recipe.data.model_copy(update=update)})


def whole_prep(recipe: Recipe, store: ArtifactStore) -> dict[str, Any]:
    """(c): every prep stage's ``run(force=True)`` in order; seconds per stage and the refs' rows."""
    seconds: dict[str, float] = {}
    refs = {}

    def stage(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        refs[name] = fn()
        seconds[name] = time.perf_counter() - start
        return refs[name]

    ingested = stage("ingest", lambda: ingest.run(recipe, store, force=True))
    validated = stage("validate", lambda: validate.run(recipe, ingested, store, force=True))
    cleaned = stage("clean", lambda: clean.run(recipe, validated, store, force=True))
    splits = stage("split", lambda: split.run(recipe, cleaned, store, force=True))
    tokenized = stage("encode", lambda: tokenize.run(recipe, splits, store, force=True))
    stage("augment", lambda: augment.run(recipe, tokenized, store, force=True))
    return {"seconds": seconds, "rows": {name: ref.rows for name, ref in refs.items()}}


# ------------------------------------------------------------------------------------------------
# the benchmark


def load_texts(recipe: Recipe, rows: int | None) -> pa.Array:
    """The recipe's train texts (first ``rows`` rows when given) as one string array."""
    path = Path(recipe.data.train_path)
    column = pq.read_table(path if path.is_absolute() else common.ROOT / path, columns=[recipe.data.text_column])
    texts = column.column(0).combine_chunks()
    return texts.slice(0, rows) if rows is not None else texts


def check_same_output(ours: pa.Table, hf: Any) -> None:
    """Raise unless the baseline produced exactly our cleaned texts and token ids."""
    theirs = hf.data.table
    if theirs.column("text").to_pylist() != ours.column("text").to_pylist():
        bad = next(i for i, (a, b) in enumerate(zip(theirs.column("text").to_pylist(), ours.column("text").to_pylist())) if a != b)
        raise RuntimeError(f"baseline cleaning differs from clean_texts at row {bad}")
    if theirs.column("input_ids").combine_chunks().cast(tokenize.IDS_TYPE) != ours.column("input_ids").combine_chunks():
        raise RuntimeError("baseline input_ids differ from tokenize.encode")


def check_target(value: float, target: tuple[str, float]) -> bool:
    op, bound = target
    return value >= bound if op == ">=" else value <= bound


def run_benchmark(config: Path = CONFIG, rows: int | None = None, repeat: int = 5) -> dict[str, Any]:
    """Run (a), (b) and (c) (module doc) and return the result dict that ``--json`` writes."""
    if repeat < 1:
        raise ValueError("repeat must be at least 1")
    hf_datasets()
    with tempfile.TemporaryDirectory(prefix="nightshift-bench-prep-") as tmp:
        workdir = Path(tmp)
        recipe = prep_recipe(Path(config), rows, workdir)
        cfg = recipe.clean
        raw = load_texts(recipe, None)
        texts = clean.clean_texts(raw, cfg).to_pylist()
        tokenizer = tokenize.train_tokenizer(texts, recipe.tokenizer)  # once, shared, outside every timing
        store = ArtifactStore(workdir / "artifacts")

        measures: dict[str, Callable[[], Any]] = {
            "ours_clean_tokenize": lambda: ours_clean_and_tokenize(raw, tokenizer, cfg),
            "hf_datasets_map": lambda: hf_clean_and_tokenize(raw, tokenizer, cfg),
            "hf_datasets_map_fast": lambda: hf_clean_and_tokenize(raw, tokenizer, cfg, "encode_batch_fast"),
            "ours_tokenize": lambda: tokenize.encode(tokenizer, texts),
            "raw_encode_batch": lambda: raw_encode(tokenizer, texts),
            "raw_encode_batch_fast": lambda: raw_encode(tokenizer, texts, "encode_batch_fast"),
            "whole_prep": lambda: whole_prep(recipe, store),
        }
        names = list(measures)
        warm = {name: fn() for name, fn in measures.items()}  # warm-up, and outputs to compare
        check_same_output(warm["ours_clean_tokenize"], warm["hf_datasets_map"])
        check_same_output(warm["ours_clean_tokenize"], warm["hf_datasets_map_fast"])
        prep_rows = warm["whole_prep"]["rows"]
        del warm

        samples: dict[str, list[float]] = {name: [] for name in names}
        cpu_samples: dict[str, list[float]] = {name: [] for name in names}
        stage_samples: dict[str, list[float]] = {name: [] for name in PREP_STAGES}
        for i in range(repeat):
            for name in names if i % 2 == 0 else reversed(names):
                seconds, cpu, out = common.timed(measures[name])
                samples[name].append(seconds)
                cpu_samples[name].append(cpu)
                if name == "whole_prep":
                    for stage, s in out["seconds"].items():
                        stage_samples[stage].append(s)
                del out

    med = {name: statistics.median(s) for name, s in samples.items()}
    cpu_med = {name: statistics.median(s) for name, s in cpu_samples.items()}

    def paired(num: str, den: str) -> float:
        """Median over repeats of num/den within the same repeat (both ran under the same load)."""
        return round(statistics.median(a / b for a, b in zip(samples[num], samples[den])), 4)

    figures = {
        "speedup_vs_hf_datasets": paired("hf_datasets_map", "ours_clean_tokenize"),
        "tokenize_vs_raw": paired("ours_tokenize", "raw_encode_batch"),
        "prep_vs_raw": paired("whole_prep", "raw_encode_batch"),
    }
    extra = {
        "speedup_vs_hf_datasets_fast": paired("hf_datasets_map_fast", "ours_clean_tokenize"),
        "tokenize_vs_raw_fast": paired("ours_tokenize", "raw_encode_batch_fast"),
        "prep_vs_raw_fast": paired("whole_prep", "raw_encode_batch_fast"),
        "per_repeat": {
            "speedup_vs_hf_datasets": [round(b / a, 4) for a, b in zip(samples["ours_clean_tokenize"], samples["hf_datasets_map"])],
            "tokenize_vs_raw": [round(a / b, 4) for a, b in zip(samples["ours_tokenize"], samples["raw_encode_batch"])],
            "prep_vs_raw": [round(a / b, 4) for a, b in zip(samples["whole_prep"], samples["raw_encode_batch"])],
        },
        "cpu_time": {
            "why": "process CPU seconds (all threads); less sensitive than wall time to other processes on the machine",
            "speedup_vs_hf_datasets": round(cpu_med["hf_datasets_map"] / cpu_med["ours_clean_tokenize"], 4),
            "tokenize_vs_raw": round(cpu_med["ours_tokenize"] / cpu_med["raw_encode_batch"], 4),
            "prep_vs_raw": round(cpu_med["whole_prep"] / cpu_med["raw_encode_batch"], 4),
            "median_s": {name: round(v, 6) for name, v in cpu_med.items()},
        },
        "ratio_of_medians": {
            "why": "median seconds of one side over median seconds of the other; mixes repeats run under different load",
            "speedup_vs_hf_datasets": round(med["hf_datasets_map"] / med["ours_clean_tokenize"], 4),
            "tokenize_vs_raw": round(med["ours_tokenize"] / med["raw_encode_batch"], 4),
            "prep_vs_raw": round(med["whole_prep"] / med["raw_encode_batch"], 4),
        },
    }
    n_chars = sum(map(len, texts))
    return {
        "name": "prep",
        "ours": {
            "what": "tasks.text.clean.clean_texts + tasks.text.encode.encode (pyarrow kernels, encode_batch_fast on a helper thread)",
            "seconds": common.summary(samples["ours_clean_tokenize"]),
        },
        "baseline": {
            "what": f"datasets.Dataset.from_dict(...).map(batched=True, batch_size={HF_BATCH_SIZE}) with a pure-Python "
                    "cleaning function and tokenizer.encode_batch, in memory, no cache",
            "seconds": common.summary(samples["hf_datasets_map"]),
        },
        "ratio": figures["speedup_vs_hf_datasets"],
        "ratio_definition": "(a) clean + tokenize speedup = HF seconds / ours seconds, taken within each repeat "
                            "(the two ran back to back) and the median over repeats (= speedup_vs_hf_datasets; "
                            "above 1 means ours is faster). tokenize_vs_raw and prep_vs_raw are paired medians "
                            "too; ratios of the medians are under extra.ratio_of_medians",
        "unit": "s",
        **figures,
        "targets": {name: f"{op} {bound}" for name, (op, bound) in TARGETS.items()},
        "passed": {name: check_target(figures[name], TARGETS[name]) for name in TARGETS},
        "extra": extra,
        "measurements": {name: common.summary(s) for name, s in samples.items()},
        "whole_prep_stages_median_s": {name: round(statistics.median(s), 6) for name, s in stage_samples.items()},
        "whole_prep_rows": prep_rows,
        "data": {
            "config": str(Path(config).resolve().relative_to(common.ROOT)) if Path(config).resolve().is_relative_to(common.ROOT) else str(config),
            "train_path": recipe.data.train_path if rows is None else f"first {rows} rows of {load_recipe(config).data.train_path}",
            "rows": len(texts),
            "mean_chars": round(n_chars / max(1, len(texts)), 2),
            "outputs_identical": True,  # check_same_output raised otherwise
        },
        "settings": {
            "repeat": repeat,
            "warmup_runs": 1,
            "statistic": "seconds: median over repeats; ratios: median over repeats of the within-repeat ratio",
            "order": "all measurements in one loop, order reversed on every other repeat",
            "tokenizer_training": "excluded from (a) and (b): trained once beforehand on the cleaned texts and shared; "
                                  "included in (c) (the tokenize stage trains it)",
            "augment": f"as in the recipe: enabled={recipe.augment.enabled}"
                       + (f", copies={recipe.augment.copies}, p={recipe.augment.p}" if recipe.augment.enabled else " (pass-through)"),
            "hf_datasets": "in memory (from_dict), load_from_cache_file=False, keep_in_memory=True, fixed new_fingerprint, "
                           "progress bars off, HF_DATASETS_OFFLINE=1, HF_HUB_OFFLINE=1",
            "vocab_size": tokenizer.get_vocab_size(),
        },
        "machine": common.machine(),
    }


def report(result: dict[str, Any]) -> str:
    """The short human table printed after a run."""
    m = result["measurements"]

    def s(name: str) -> str:
        return f"{m[name]['median']:.3f}"

    rows = [
        ("figure", "ours (s)", "baseline (s)", "value", "target", "pass"),
        ("(a) clean+tokenize vs HF datasets map", s("ours_clean_tokenize"), s("hf_datasets_map"),
         f"{result['speedup_vs_hf_datasets']:.2f}x", result["targets"]["speedup_vs_hf_datasets"],
         "yes" if result["passed"]["speedup_vs_hf_datasets"] else "NO"),
        ("(b) tokenize vs raw encode_batch", s("ours_tokenize"), s("raw_encode_batch"),
         f"{result['tokenize_vs_raw']:.2f}", result["targets"]["tokenize_vs_raw"],
         "yes" if result["passed"]["tokenize_vs_raw"] else "NO"),
        ("(c) whole prep vs raw encode_batch", s("whole_prep"), s("raw_encode_batch"),
         f"{result['prep_vs_raw']:.2f}", result["targets"]["prep_vs_raw"],
         "yes" if result["passed"]["prep_vs_raw"] else "NO"),
    ]
    stages = ", ".join(f"{k} {v:.3f}" for k, v in result["whole_prep_stages_median_s"].items())
    return (
        f"prep benchmark: {result['data']['rows']} rows, {result['settings']['repeat']} repeats "
        "(seconds: medians; ratios: medians of the within-repeat ratios)\n"
        + common.table(rows)
        + f"\n(c) stages (median s): {stages}\n"
        + f"extra: vs HF with encode_batch_fast {result['extra']['speedup_vs_hf_datasets_fast']:.2f}x, "
        + f"tokenize vs raw encode_batch_fast {result['extra']['tokenize_vs_raw_fast']:.2f}; "
        + "ratio of medians (a) {speedup_vs_hf_datasets:.2f}x (b) {tokenize_vs_raw:.2f} (c) {prep_vs_raw:.2f}; "
          .format(**result["extra"]["ratio_of_medians"])
        + "CPU-time (a) {speedup_vs_hf_datasets:.2f}x (b) {tokenize_vs_raw:.2f} (c) {prep_vs_raw:.2f}"
          .format(**result["extra"]["cpu_time"])
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", required=True, help="Write the result here.")
    parser.add_argument("--config", default=str(CONFIG), help="Recipe (default configs/sst2.yaml).")
    parser.add_argument("--rows", type=int, default=None, help="Use only the first N train rows.")
    parser.add_argument("--repeat", type=int, default=5, help="Timed runs per measurement (median reported).")
    args = parser.parse_args(argv)
    result = run_benchmark(Path(args.config), args.rows, args.repeat)
    common.write_result(args.json, result)
    print(report(result))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
