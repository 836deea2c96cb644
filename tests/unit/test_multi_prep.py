"""Multi-task prep: each task runs its own kind's stages and caches them on its own; the combined
references sum the rows, prefix the metrics and keep each task's report files."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tasks.core.store import ArtifactStore
from tasks.multi.prep import task_refs
from tasks.registry import kind_of, recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]
PREP = ("ingest", "validate", "clean", "split", "encode", "augment")

pytestmark = pytest.mark.slow  # tokenizes real data with MiniLM's tokenizer (a few seconds)


def recipe(arch: str = "pretrained", wnut_rows: int = 300, sst2_rows: int = 400):
    model = {"arch": arch} if arch == "pretrained" else {"arch": "scratch", "d_model": 32, "n_heads": 2}
    return recipe_from_dict({
        "name": "mt", "task": "multi-task", "model": model, "tokenizer": {"vocab_size": 2000},
        "tasks": {
            "sst2": {"task": "text-classification",
                     "data": {"train_path": str(ROOT / "data/sst2/train.parquet"), "text_column": "sentence",
                              "label_column": "label", "labels": ["0", "1"], "max_rows": sst2_rows}},
            "wnut17": {"task": "token-classification",
                       "data": {"train_path": str(ROOT / "data/wnut17/wnut17train.conll"), "format": "conll",
                                "max_rows": wnut_rows}}}})


def prepare(r, store: ArtifactStore) -> dict:
    kind = kind_of(r)
    refs = {"ingest": kind.ingest(r, store, False)}
    for previous, stage in itertools.pairwise(PREP):
        refs[stage] = getattr(kind, stage)(r, refs[previous], store, False)
    return refs


def cache(refs: dict) -> dict[str, dict[str, bool]]:
    return {task: {stage: task_refs(ref)[task].cache_hit for stage, ref in refs.items()} for task in ("sst2", "wnut17")}


def test_a_change_to_one_task_reprepares_only_that_task(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    first = prepare(recipe(), store)
    assert not any(hit for stages in cache(first).values() for hit in stages.values())
    second = prepare(recipe(wnut_rows=250), store)  # only WNUT-17's data changes
    hits = cache(second)
    assert hits["sst2"] == dict.fromkeys(PREP, True)  # every SST-2 stage, encode included: the checkpoint's tokenizer
    assert hits["wnut17"] == dict.fromkeys(PREP, False)
    assert not any(second[stage].cache_hit for stage in PREP)  # the combined outputs are new
    third = prepare(recipe(wnut_rows=250), store)
    assert all(third[stage].cache_hit for stage in PREP) and all(all(v.values()) for v in cache(third).values())


def test_combined_rows_metrics_and_files(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    refs = prepare(recipe(), store)
    for stage, ref in refs.items():
        subs = task_refs(ref)
        for split in ref.rows:
            assert ref.rows[split] == sum(sub.rows.get(split, 0) for sub in subs.values()), (stage, split)
        if "input" in ref.rows and "rejected" in ref.rows and stage != "augment":
            splits = sum(ref.rows.get(s, 0) for s in ("train", "validation", "test"))
            assert ref.rows["input"] == splits + ref.rows["rejected"], stage
        assert ref.extra["metrics"]["sst2.rows_train"] == subs["sst2"].rows["train"]
        assert set(ref.extra["key_metrics"]) <= set(ref.extra["metrics"])
    assert refs["ingest"].rows["input"] == 400 + task_refs(refs["ingest"])["wnut17"].rows["input"]
    validate = refs["validate"]
    logged = {p.relative_to(validate.file("tasks")).as_posix() for p in validate.file("tasks").rglob("*") if p.is_file()}
    for task, sub in task_refs(validate).items():
        assert {f"{task}/{name}" for name in sub.extra["log_files"]} <= logged
    assert refs["encode"].extra["task_kinds"] == {"sst2": "text-classification", "wnut17": "token-classification"}


def test_scratch_trains_one_tokenizer_on_the_union_of_the_train_splits(tmp_path: Path) -> None:
    store = ArtifactStore(tmp_path)
    refs = prepare(recipe("scratch"), store)
    encoded = task_refs(refs["encode"])
    vocab = {name: json.loads(ref.file("tokenizer.json").read_text())["model"]["vocab"] for name, ref in encoded.items()}
    assert vocab["sst2"] == vocab["wnut17"]
    shared = refs["encode"].extra["tokenizer"]
    assert shared["rows"]["train_texts"] == sum(task_refs(refs["split"])[t].rows["train"] for t in encoded)
    # words only one task has are in the one vocabulary (wnut17's tweets: user names, hashtags)
    assert "@" in vocab["sst2"] and vocab["sst2"]["[PAD]"] == 0
    second = prepare(recipe("scratch", wnut_rows=250), store)
    hits = cache(second)
    assert {s: hits["sst2"][s] for s in ("ingest", "validate", "clean", "split")} == dict.fromkeys(
        ("ingest", "validate", "clean", "split"), True)
    assert hits["sst2"]["encode"] is False  # the union changed, so the one tokenizer did
