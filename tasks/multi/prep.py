"""The prep slots of ``task: multi-task``: each task's own kind runs each stage on its own data, and the
per-task outputs are combined into one reference.

A combined stage output (``artifacts/<stage>/<fingerprint>/``) holds no data: its manifest lists the
per-task references (``extra["tasks"]``), its fingerprint is keyed by theirs, its rows are the sums over
the tasks (so rows in = rows out + rows rejected holds in total as it does per task), its metrics are
the tasks' own as ``<task>.<metric>`` (and ``<task>.rows_<split>``), and ``tasks/<task>/`` holds copies of
each task's report files, logged to MLflow as ``<stage>/<task>/...``. Every per-task stage keeps its own
fingerprint and cache entry, so a change to one task's data re-prepares only that task; the other
tasks' stages are cache hits (``extra["tasks"][<task>]["cache_hit"]``).

The encode slot is where the tasks meet: there is one tokenizer. Pretrained, it is the checkpoint's, and
each kind's own encode stage uses it. Scratch, ``shared_tokenizer`` trains one tokenizer on the union of
the tasks' train splits (stage ``tokenizer``) and stores it as a tokenizer-only checkpoint folder, which
each kind's encode stage is then handed as its ``model.pretrained`` tokenizer: every task is encoded with
the same vocabulary, by its own kind's code.

Run alone: ``python -m flows.prepare_data --config configs/multitask.yaml``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import pyarrow.parquet as pq
import tokenizers

from tasks.core.lineage import KEY_METRICS
from tasks.core.store import ArtifactStore, DataError, StageRef, stage_key
from tasks.multi.config import MultiRecipe
from tasks.registry import kind_of

TOKENIZER_STAGE = "tokenizer"
TASKS_DIR = "tasks"


def task_refs(ref: StageRef) -> dict[str, StageRef]:
    """The per-task references a combined stage output lists, by task name."""
    return {name: StageRef.model_validate(value) for name, value in ref.extra["tasks"].items()}


def _per_task(name: str, work: Callable[[], StageRef]) -> StageRef:
    try:
        return work()
    except DataError as exc:  # the user's to fix: say which task
        raise DataError(f"tasks.{name}: {exc}") from None


def combine(stage: str, subs: dict[str, StageRef], store: ArtifactStore, force: bool = False) -> StageRef:
    """One reference for the per-task outputs ``subs`` of ``stage``: rows summed, metrics and files per task."""
    key = stage_key(stage, {"tasks": list(subs)}, [ref.fingerprint for ref in subs.values()], __name__)
    hit = store.cached(key, force)
    if hit is None:
        rows: dict[str, int] = {}
        for ref in subs.values():
            for split, n in ref.rows.items():
                rows[split] = rows.get(split, 0) + int(n)
        with store.writer(key) as w:
            logged = False
            for name, ref in subs.items():
                for file in ref.extra.get("log_files", []):
                    source = ref.file(file)
                    target = w.path / TASKS_DIR / name / file
                    target.parent.mkdir(parents=True, exist_ok=True)
                    if source.is_dir():
                        shutil.copytree(source, target)
                    elif source.exists():
                        shutil.copyfile(source, target)
                    logged = True
            hit = w.write_manifest(rows=rows, extra={"tasks": {n: r.model_dump(mode="json") for n, r in subs.items()},
                                                     "log_files": [TASKS_DIR] if logged else []})
    return hit.model_copy(update={"extra": {**hit.extra, **_live_extra(stage, subs)}})


def _live_extra(stage: str, subs: dict[str, StageRef]) -> dict[str, Any]:
    """What this run's per-task references say (cache status included): the tasks, metrics and key metrics."""
    metrics: dict[str, float] = {}
    key_metrics: list[str] = []
    for name, ref in subs.items():
        for metric, value in ref.extra.get("metrics", {}).items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                metrics[f"{name}.{metric}"] = value
        for split, n in ref.rows.items():
            metrics[f"{name}.rows_{split}"] = n
        metrics[f"{name}.cache_hit"] = float(ref.cache_hit)
        key_metrics += [f"{name}.{m}" for m in ref.extra.get("key_metrics", KEY_METRICS.get(stage, ()))]
        key_metrics += [f"{name}.rows_{split}" for split in ref.rows] + [f"{name}.cache_hit"]
    return {"tasks": {n: r.model_dump(mode="json") for n, r in subs.items()}, "metrics": metrics,
            "key_metrics": [m for m in key_metrics if m in metrics]}


def ingest(recipe: MultiRecipe, store: ArtifactStore, force: bool = False) -> StageRef:
    """Every task's own ingest, combined."""
    subs = {name: _per_task(name, lambda sub=sub: kind_of(sub).ingest(sub, store, force))
            for name, sub in recipe.sub_recipes().items()}
    return combine("ingest", subs, store, force)


def _slot(stage: str) -> Callable[[MultiRecipe, StageRef, ArtifactStore, bool], StageRef]:
    def run(recipe: MultiRecipe, upstream: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
        inputs = task_refs(upstream)
        subs = {name: _per_task(name, lambda sub=sub, name=name: getattr(kind_of(sub), stage)(sub, inputs[name], store, force))
                for name, sub in recipe.sub_recipes().items()}
        return combine(stage, subs, store, force)

    run.__name__ = stage
    run.__doc__ = f"Every task's own {stage} stage on its own {stage} input, combined."
    return run


validate = _slot("validate")
clean = _slot("clean")
split = _slot("split")
augment = _slot("augment")


# ---------------------------------------------------------------------------------------------- encode


def train_texts(split_ref: StageRef) -> list[str]:
    """The texts of a task's train split, whatever its kind: ``text``, or ``tokens`` joined by spaces."""
    table = pq.read_table(split_ref.file("train.parquet"))
    if "text" in table.column_names:
        return [str(t) for t in table.column("text").to_pylist()]
    if "tokens" in table.column_names:
        return [" ".join(tokens) for tokens in table.column("tokens").to_pylist()]
    raise DataError(f"{split_ref.file('train.parquet')}: no text or tokens column to train the shared tokenizer on")


def shared_tokenizer(recipe: MultiRecipe, splits: dict[str, StageRef], store: ArtifactStore, force: bool = False) -> StageRef:
    """Scratch: one tokenizer trained on the union of the tasks' train splits, as a tokenizer-only checkpoint folder.

    The folder (``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and a
    ``config.json`` that names no weights) loads with ``AutoTokenizer``, so every kind's encode stage
    reads it as it reads a pretrained checkpoint's tokenizer; its content hash keys their fingerprints.
    """
    from tasks.text.encode import CLS, MASK, PAD, SEP, UNK, train_tokenizer

    cfg = recipe.tokenizer
    key = stage_key(TOKENIZER_STAGE, {"tokenizer": cfg.model_dump(mode="json")},
                    [ref.fingerprint for ref in splits.values()], __name__,
                    extra_code=f"tokenizers-{tokenizers.__version__}")
    if (hit := store.cached(key, force)) is not None:
        return hit
    texts = [text for ref in splits.values() for text in train_texts(ref)]
    if not texts:
        raise DataError("every task's train split is empty: nothing to train the shared tokenizer on")
    tokenizer = train_tokenizer(texts, cfg)
    tokenizer.no_truncation()  # each kind truncates (or windows) at its own tokenizer.max_length
    specials = {"pad_token": PAD, "unk_token": UNK, "cls_token": CLS, "sep_token": SEP, "mask_token": MASK}
    with store.writer(key) as w:
        tokenizer.save(str(w.path / "tokenizer.json"))
        w.write_json("tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast",
                                               "do_lower_case": cfg.lowercase, "model_max_length": 1_000_000,
                                               **specials})
        w.write_json("special_tokens_map.json", specials)
        # resolve_pretrained looks for config.json; this one names no model: the encoder is trained from scratch
        w.write_json("config.json", {"nightshift": "tokenizer-only checkpoint of a multi-task scratch recipe",
                                     "vocab_size": tokenizer.get_vocab_size()})
        return w.write_manifest(rows={"train_texts": len(texts)}, extra={
            "vocab_size": tokenizer.get_vocab_size(), "pad_id": tokenizer.token_to_id(PAD),
            "metrics": {"vocab_size": float(tokenizer.get_vocab_size()), "train_texts": float(len(texts))},
            "log_files": []})


def encode_recipe(sub: Any, tokenizer_ref: StageRef | None) -> Any:
    """The task's recipe as its encode stage sees it: scratch recipes read the shared tokenizer folder."""
    if tokenizer_ref is None:
        return sub
    model = sub.model.model_copy(update={"arch": "pretrained", "pretrained": tokenizer_ref.path})
    return sub.model_copy(update={"model": model})


def encode(recipe: MultiRecipe, split_ref: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Every task's own encode stage with the one shared tokenizer, combined.

    ``extra["task_kinds"]`` records each task's kind (what ``KIND.examples`` reads); ``extra["tokenizer"]``
    the shared scratch tokenizer's stage.
    """
    splits = task_refs(split_ref)
    tokenizer_ref = shared_tokenizer(recipe, splits, store, force) if recipe.model.arch == "scratch" else None
    subs = {name: _per_task(name, lambda sub=sub, name=name: kind_of(sub).encode(encode_recipe(sub, tokenizer_ref),
                                                                                 splits[name], store, force))
            for name, sub in recipe.sub_recipes().items()}
    ref = combine("encode", subs, store, force)
    extra = {**ref.extra, "task_kinds": {name: kind_of(sub).task for name, sub in recipe.sub_recipes().items()}}
    if tokenizer_ref is not None:
        extra["tokenizer"] = tokenizer_ref.model_dump(mode="json")
    return ref.model_copy(update={"extra": extra})

