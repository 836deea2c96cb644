"""Validate stage (tokens): check the ingested sentences, report on them, reject the unusable ones.

Input: the ingest output (canonical ``id, tokens, tags`` IOB2 sentences). Per sentence:

* **BIO grammar**: an ``I-X`` after ``O``, at the start, or after another type. ``validate.bio_errors:
  repair`` turns it into ``B-X`` (counted), ``reject`` drops the sentence (``"BIO error (token 3):
  I-person after O"``). Either way the count is reported and checked (``max_bio_error_fraction``:
  above it ``reject`` fails; ``repair`` warns, since a repaired IOB1 file is exactly its IOB2 form).
* **tag set**: with ``data.labels`` (entity types, or B-/I- tags) a sentence with another type is
  rejected (``"unknown entity type 'x' (allowed: ...)"``); without it, test types never seen in
  train are a warning (they can only be missed).
* **empty**: a sentence without tokens, or with an empty / whitespace token, is rejected
  (``max_empty_fraction``).
* **sub-word length** against ``tokenizer.max_length`` (the pretrained tokenizer's real pieces; a
  scratch recipe counts words and punctuation, a lower bound): the fraction of sentences longer than
  one window (``max_truncation_rate``: they are windowed, not cut), the entities plain truncation
  would cut and those no window holds whole (``max_cut_entity_fraction``).
* **entity counts** per type and split; **duplicate** (same tokens and tags) and **conflicting**
  (same tokens, other tags) sentences (``max_conflict_fraction``); **leakage**: test sentences whose
  normalised tokens (NFKC, lower case) also occur in train (``max_leakage_fraction``).

Checks fail above their threshold and warn on any nonzero value at or below it (as text validation).
Run alone: part of ``python -m flows.prepare_data --config configs/wnut17.yaml``.
"""

from __future__ import annotations

import re
import time
import unicodedata
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.core.checks import (
    FAIL,
    WARN,
    Check,
    ValidationResult,
    checks_markdown,
    fmt,
    max_check,
    md_escape,
    overall_status,
    store_result,
)
from tasks.core.rejects import metric_name, reason_kind
from tasks.core.store import ArtifactStore, StageRef, read_splits, stage_key
from tasks.tokens.config import TokenRecipe, TokenValidateConfig
from tasks.tokens.ingest import LIST, REJECTS_SCHEMA, SCHEMA
from tasks.tokens.loader import plan_windows
from tasks.tokens.tags import bio_errors, entity_spans, entity_types, repair_bio

STAGE = "validate"
_PIECE = re.compile(r"[\w]+|[^\w\s]")


def normalised_key(tokens: list[str]) -> str:
    """What counts as "the same sentence" for leakage and grouping: NFKC, lower case, single spaces."""
    return " ".join(unicodedata.normalize("NFKC", t).lower() for t in tokens)


def allowed_types(labels: list[str] | None) -> list[str] | None:
    """``data.labels`` as entity types (``B-X`` / ``I-X`` / ``X`` -> ``X``; ``O`` dropped)."""
    if labels is None:
        return None
    return sorted({label[2:] if label[:2] in ("B-", "I-") else label for label in labels if label != "O"})


def piece_counter(recipe: TokenRecipe):
    """Sub-word pieces per word: the pretrained tokenizer's, or a word/punctuation lower bound (scratch)."""
    if recipe.model.arch == "pretrained":
        from tasks.tokens.encode import fit_tokenizer
        from tasks.tokens.loader import word_pieces

        tokenizer, special = fit_tokenizer(recipe, [])

        def count(sentences: list[list[str]]) -> list[np.ndarray]:
            return [np.bincount(np.asarray(w, np.int64), minlength=len(s)) if s else np.zeros(0, np.int64)
                    for s, (_, w) in zip(sentences, word_pieces(tokenizer, sentences, special["unk_id"]))]
        return count
    return lambda sentences: [np.asarray([max(1, len(_PIECE.findall(t))) for t in s], np.int64) for s in sentences]


def length_stats(sentences: list[list[str]], tags: list[list[str]], pieces: list[np.ndarray], max_length: int,
                 stride: int) -> dict[str, Any]:
    """Pieces per sentence, sentences longer than one window, entities truncation would cut / windows cut."""
    budget = max_length - 2
    totals = np.asarray([int(p.sum()) for p in pieces], np.int64)
    entities = beyond = cut = 0
    for p, t in zip(pieces, tags):
        ends = np.cumsum(p)
        windows = plan_windows(p.tolist(), budget, stride) if len(p) else []
        for _, a, b in entity_spans(t):
            entities += 1
            beyond += int(ends[b - 1] > budget)
            cut += int(not any(s <= a and b <= e for s, e in windows))
    n = len(totals)
    return {"max_length": max_length, "p50": float(np.percentile(totals, 50)) if n else 0.0,
            "p99": float(np.percentile(totals, 99)) if n else 0.0, "max": int(totals.max()) if n else 0,
            "windowed_rows": int(np.count_nonzero(totals > budget)),
            "truncation_rate": float(np.count_nonzero(totals > budget) / n) if n else 0.0,
            "entities": entities, "entities_beyond_max_length": beyond, "entities_cut_by_windows": cut,
            "cut_entity_fraction": cut / entities if entities else 0.0}


def check_rows(table: pa.Table, split: str, cfg: TokenValidateConfig, allowed: list[str] | None
               ) -> tuple[pa.Table, list[int], list[str], dict[str, int]]:
    """Kept rows (tags repaired when asked), rejected row indices and reasons, counts."""
    ids, tokens, tags = (table.column(c).to_pylist() for c in ("id", "tokens", "tags"))
    keep_ids, keep_tokens, keep_tags, bad, reasons = [], [], [], [], []
    counts = Counter()
    allowed_set = set(allowed) if allowed is not None else None
    for i, (toks, tgs) in enumerate(zip(tokens, tags)):
        if not toks:
            bad.append(i), reasons.append("empty sentence (no tokens)")
            counts["empty"] += 1
            continue
        empty = next((k for k, t in enumerate(toks) if not t.strip()), None)
        if empty is not None:
            bad.append(i), reasons.append(f"empty token (token {empty + 1})")
            counts["empty"] += 1
            continue
        if allowed_set is not None:
            unknown = [t for t in entity_types(tgs) if t not in allowed_set]
            if unknown:
                bad.append(i), reasons.append(f"unknown entity type {unknown[0]!r} (allowed: {', '.join(allowed)})")
                continue
        errors = bio_errors(tgs)
        if errors:
            counts["bio_error_rows"] += 1
            counts["bio_error_tags"] += len(errors)
            if cfg.bio_errors == "reject":
                k = errors[0]
                before = tgs[k - 1] if k else "the start"
                bad.append(i), reasons.append(f"BIO error (token {k + 1}): {tgs[k]} after {before}")
                continue
            tgs = repair_bio(tgs)
            counts["bio_repaired_rows"] += 1
        keep_ids.append(ids[i]), keep_tokens.append(toks), keep_tags.append(tgs)
    kept = pa.table({"id": pa.array(keep_ids, pa.string()), "tokens": pa.array(keep_tokens, LIST),
                     "tags": pa.array(keep_tags, LIST)}, schema=SCHEMA)
    return kept, bad, reasons, dict(counts)


def split_stats(table: pa.Table, lengths: dict[str, Any]) -> dict[str, Any]:
    """Entity counts per type, duplicates and conflicts of one split's kept rows."""
    tokens, tags = table.column("tokens").to_pylist(), table.column("tags").to_pylist()
    entity_counts = Counter(kind for t in tags for kind, _, _ in entity_spans(t))
    first_tags: dict[tuple, tuple] = {}
    seen_pairs: set[tuple] = set()
    duplicates = 0
    conflicted: set[tuple] = set()
    for toks, tgs in zip(tokens, tags):
        key, pair = tuple(toks), (tuple(toks), tuple(tgs))
        duplicates += pair in seen_pairs
        seen_pairs.add(pair)
        if key in first_tags and first_tags[key] != tuple(tgs):
            conflicted.add(key)
        first_tags.setdefault(key, tuple(tgs))
    conflict_rows = sum(tuple(t) in conflicted for t in tokens)
    n = table.num_rows
    total = sum(entity_counts.values())
    counts = dict(sorted(entity_counts.items()))
    return {"rows": n, "tokens": sum(len(t) for t in tokens), "entities": total,
            "sentences_without_entities": sum(1 for t in tags if all(x == "O" for x in t)),
            "labels": {"counts": counts, "fractions": {k: v / total for k, v in counts.items()} if total else {},
                       "num_labels": len(counts)},
            "duplicates": {"exact_rows": duplicates}, "conflicts": {"rows": conflict_rows, "keys": len(conflicted),
                                                                    "fraction": conflict_rows / n if n else 0.0},
            "length": lengths}


def validate_tables(train: pa.Table, test: pa.Table | None, recipe: TokenRecipe, ingest_rows: dict[str, int],
                    count_pieces=None) -> ValidationResult:
    """All checks on the ingested splits (see the module docstring)."""
    cfg, allowed = recipe.validate_, allowed_types(recipe.data.labels)
    count_pieces = count_pieces or piece_counter(recipe)
    splits = {"train": train, **({"test": test} if test is not None else {})}
    kept, rejects, counts, stats = {}, [], {}, {}
    for split, table in splits.items():
        kept[split], bad, reasons, counts[split] = check_rows(table, split, cfg, allowed)
        rejected = table.take(pa.array(bad, pa.int64()))
        rejects.append(pa.table({"id": rejected.column("id"), "split": pa.array([split] * len(bad), pa.string()),
                                 "reason": pa.array(reasons, pa.string()), "tokens": rejected.column("tokens"),
                                 "tags": rejected.column("tags"), "raw": pa.nulls(len(bad), pa.string())},
                                schema=REJECTS_SCHEMA))
        toks, tgs = kept[split].column("tokens").to_pylist(), kept[split].column("tags").to_pylist()
        lengths = length_stats(toks, tgs, count_pieces(toks), recipe.tokenizer.max_length, recipe.tokenizer.stride)
        stats[split] = split_stats(kept[split], lengths)
        stats[split]["bio"] = {k: counts[split].get(k, 0) for k in ("bio_error_rows", "bio_error_tags", "bio_repaired_rows")}
    rejects_table = pa.concat_tables(rejects)
    n_input = sum(t.num_rows for t in splits.values())
    by_reason = dict(Counter(reason_kind(r) for r in rejects_table.column("reason").to_pylist()))
    ingest_input, ingest_rejected = ingest_rows.get("input", n_input), ingest_rows.get("rejected", 0)
    reject_fraction = (ingest_rejected + rejects_table.num_rows) / ingest_input if ingest_input else 0.0

    checks = [max_check("reject_fraction", reject_fraction, cfg.max_reject_fraction, None,
                        "malformed or rejected sentences (ingest + validate) over ingest input"),
              max_check("empty_fraction", sum(c.get("empty", 0) for c in counts.values()) / n_input if n_input else 0.0,
                        cfg.max_empty_fraction, None, "sentences without tokens or with an empty token")]
    leak = None
    for split, s in stats.items():
        n = splits[split].num_rows
        bio = max_check("bio_error_fraction", counts[split].get("bio_error_rows", 0) / n if n else 0.0,
                        cfg.max_bio_error_fraction, split,
                        f"sentences with an I-X after O or another type ({cfg.bio_errors}ed)")
        if bio.status == FAIL and cfg.bio_errors == "repair":
            # repaired IOB2 is exactly what IOB1 converts to: the sentences are usable, so say what it looks like
            bio.status = WARN
            bio.message += "; many stray I- tags: IOB1 data? set data.tag_scheme: iob1"
        checks.append(bio)
        checks.append(max_check("conflict_fraction", s["conflicts"]["fraction"], cfg.max_conflict_fraction, split,
                                "sentences whose tokens appear with other tags"))
        checks.append(max_check("truncation_rate", s["length"]["truncation_rate"], cfg.max_truncation_rate, split,
                                f"sentences longer than one window of {recipe.tokenizer.max_length} pieces (windowed, not cut)"))
        checks.append(max_check("cut_entity_fraction", s["length"]["cut_entity_fraction"], cfg.max_cut_entity_fraction,
                                split, "entities no window holds whole"))
    if kept["train"].num_rows == 0:
        checks.append(Check("train_rows", FAIL, 0.0, 1.0, "min", "train", "train: no rows left after validation"))
    elif stats["train"]["labels"]["num_labels"] == 0:
        checks.append(Check("num_labels", FAIL, 0.0, 1.0, "min", "train", "train: no entity at all (every tag is O)"))
    if test is not None:
        train_keys = {normalised_key(t) for t in kept["train"].column("tokens").to_pylist()}
        test_tokens = kept["test"].column("tokens").to_pylist()
        leaked = [i for i, t in enumerate(test_tokens) if normalised_key(t) in train_keys]
        fraction = len(leaked) / len(test_tokens) if test_tokens else 0.0
        leak = {"test_rows_leaked": len(leaked), "fraction": fraction,
                "examples": [{"id": kept["test"].column("id")[i].as_py(), "text": " ".join(test_tokens[i])[:160]} for i in leaked[:10]]}
        checks.append(max_check("leakage_fraction", fraction, cfg.max_leakage_fraction, "test",
                                "test sentences whose normalised tokens also occur in train"))
        unseen = sorted(set(stats["test"]["labels"]["counts"]) - set(stats["train"]["labels"]["counts"]))
        if unseen and allowed is None:
            checks.append(Check("unseen_types", WARN, float(len(unseen)), 0.0, "max", "test",
                                f"test: entity types never seen in train: {unseen}", "test entity types absent from train"))
    status = overall_status(checks)
    report = {"status": status, "rows": {"input": n_input, "train": kept["train"].num_rows,
                                         "test": kept["test"].num_rows if test is not None else 0,
                                         "rejected": rejects_table.num_rows, "reject_fraction": reject_fraction,
                                         "ingest_input": ingest_input, "ingest_rejected": ingest_rejected},
              "rejects_by_reason": by_reason, "splits": stats, "leakage": leak, "allowed_labels": allowed,
              "checks": [asdict(c) for c in checks], "warnings": [c.message for c in checks if c.status == WARN],
              "bio_errors": cfg.bio_errors}
    return ValidationResult(kept["train"], kept.get("test"), rejects_table, report, checks)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as readable markdown."""
    rows = report["rows"]
    out = [f"# Validation report (tokens): {report['status'].upper()}", "",
           (f"Sentences: ingest input {rows['ingest_input']}, ingest rejected {rows['ingest_rejected']}, validate "
            f"input {rows['input']}, passed train {rows['train']} / test {rows['test']}, rejected {rows['rejected']}."), ""]
    out += checks_markdown(report)
    for split, s in report["splits"].items():
        ln, bio = s["length"], s["bio"]
        out += ["", f"## {split} ({s['rows']} sentences, {s['tokens']} tokens, {s['entities']} entities)", "",
                "| entity type | entities | fraction |", "|---|---|---|"]
        out += [f"| {md_escape(k)} | {v} | {fmt(s['labels']['fractions'][k])} |" for k, v in s["labels"]["counts"].items()]
        out += ["", "| statistic | value |", "|---|---|",
                f"| sentences without entities | {s['sentences_without_entities']} |",
                f"| BIO errors: sentences / tags / repaired | {bio['bio_error_rows']} / {bio['bio_error_tags']} / {bio['bio_repaired_rows']} |",
                f"| exact duplicate sentences | {s['duplicates']['exact_rows']} |",
                f"| conflicting sentences | {s['conflicts']['rows']} |",
                f"| pieces p50 / p99 / max | {fmt(ln['p50'])} / {fmt(ln['p99'])} / {ln['max']} |",
                f"| longer than one window ({ln['max_length']}) | {ln['windowed_rows']} ({fmt(ln['truncation_rate'])}) |",
                f"| entities plain truncation would cut / no window holds | {ln['entities_beyond_max_length']} / {ln['entities_cut_by_windows']} |"]
    if report["leakage"]:
        leak = report["leakage"]
        out += ["", "## Leakage", "", f"{leak['test_rows_leaked']} test sentences ({fmt(leak['fraction'])}) also occur in train."]
        out += [f"- {e['id']}: \"{md_escape(e['text'])}\"" for e in leak["examples"]]
    return "\n".join(out) + "\n"


def metrics_of(report: dict[str, Any]) -> dict[str, float]:
    """The numbers logged to MLflow."""
    rows = report["rows"]
    metrics: dict[str, float] = {"rows_input": rows["input"], "rows_train": rows["train"], "rows_test": rows["test"],
                                 "rows_rejected": rows["rejected"], "reject_fraction": rows["reject_fraction"],
                                 "warnings": len(report["warnings"])}
    for kind, count in report["rejects_by_reason"].items():
        metrics[f"rejected.{metric_name(kind)}"] = count
    for split, s in report["splits"].items():
        metrics[f"{split}.entities"] = s["entities"]
        metrics[f"{split}.bio_error_rows"] = s["bio"]["bio_error_rows"]
        metrics[f"{split}.conflict_rows"] = s["conflicts"]["rows"]
        metrics[f"{split}.truncation_rate"] = s["length"]["truncation_rate"]
        metrics[f"{split}.entities_cut_by_windows"] = s["length"]["entities_cut_by_windows"]
        for kind, count in s["labels"]["counts"].items():
            metrics[f"{split}.entities.{metric_name(kind)}"] = count
    if report["leakage"] is not None:
        metrics["leakage_fraction"] = report["leakage"]["fraction"]
    return {k: float(v) for k, v in metrics.items()}


def run(recipe: TokenRecipe, ingested: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Validate the ingested sentences (cached by fingerprint); DataError naming each failed check."""
    started = time.perf_counter()
    from tasks.tokens.encode import tokenizer_config

    config = {"validate": recipe.validate_.model_dump(mode="json"), "labels": recipe.data.labels,
              "tokenizer": tokenizer_config(recipe),
              "windows": recipe.tokenizer.model_dump(mode="json", include={"max_length", "stride"})}
    key = stage_key(STAGE, config, [ingested.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    splits = read_splits(ingested)
    result = validate_tables(splits["train"], splits.get("test"), recipe, ingested.rows)
    return store_result(result, key, store, allowed_labels=result.report["allowed_labels"],
                        metrics=metrics_of(result.report), started=started, render=render_markdown)
