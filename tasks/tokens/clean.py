"""Clean stage (tokens): Unicode normalisation per token, then sentence filters.

Every token is normalised on its own (``clean.normalize``: NFKC by default; ``clean.lowercase``), so
the token count and the token-tag alignment never change; a token that would normalise to nothing
(a lone zero-width character) keeps its original spelling. Sentences longer than
``clean.max_tokens`` are dropped (``"too many tokens (812 > 512)"``); with ``clean.dedupe`` an exact
repeat of an earlier sentence (same normalised tokens and tags) is dropped (``"duplicate of <id>"``);
with ``clean.drop_conflicts`` every sentence whose normalised tokens occur with other tags is
dropped (``"conflicting tags for the same tokens as <id>"``). Duplicates and conflicts are dropped from
train only: the test split is scored as published (validate reports them there). Every dropped sentence goes to
``rejects.parquet`` with its reason; rows in = rows out + rejected, per split.

Run alone: part of ``python -m flows.prepare_data --config configs/wnut17.yaml``.
"""

from __future__ import annotations

import time
import unicodedata
from collections import Counter
from collections.abc import Sequence

import pyarrow as pa

from tasks.core.cleaning import STAGE, CleanResult, store_result
from tasks.core.store import ArtifactStore, StageRef, read_splits, stage_key
from tasks.tokens.config import TokenCleanConfig, TokenRecipe
from tasks.tokens.ingest import LIST, REJECTS_SCHEMA, SCHEMA
from tasks.tokens.tags import entity_spans


def clean_token(token: str, cfg: TokenCleanConfig) -> str:
    """One token normalised as ``cfg`` says; never empty when the input was not (the served predictor uses it too)."""
    out = token if cfg.normalize == "none" else unicodedata.normalize(cfg.normalize, token)
    out = out.lower() if cfg.lowercase else out
    out = "".join(out.split())  # NFKC can turn a character into spaces; a token stays one word
    return out or token


def clean_tokens(tokens: Sequence[str], cfg: TokenCleanConfig) -> list[str]:
    """A sentence's tokens cleaned one by one (same count, same order)."""
    return [clean_token(t, cfg) for t in tokens]


def clean_table(table: pa.Table, split: str, cfg: TokenCleanConfig) -> tuple[pa.Table, pa.Table, dict[str, int]]:
    """(kept rows, rejects, counts) of one split."""
    ids, tokens, tags = (table.column(c).to_pylist() for c in ("id", "tokens", "tags"))
    cleaned = [clean_tokens(t, cfg) for t in tokens]
    changed = sum(a != b for s, c in zip(tokens, cleaned) for a, b in zip(s, c))
    first_pair: dict[tuple, str] = {}
    first_key: dict[tuple, tuple[str, tuple]] = {}
    conflicted: set[tuple] = set()
    for row_id, toks, tgs in zip(ids, cleaned, tags):
        key = tuple(toks)
        if key in first_key and first_key[key][1] != tuple(tgs):
            conflicted.add(key)
        first_key.setdefault(key, (row_id, tuple(tgs)))
    keep, bad, reasons = [], [], []
    for i, (row_id, toks, tgs) in enumerate(zip(ids, cleaned, tags)):
        key, pair = tuple(toks), (tuple(toks), tuple(tgs))
        if len(toks) > cfg.max_tokens:
            bad.append(i), reasons.append(f"too many tokens ({len(toks)} > {cfg.max_tokens})")
        elif cfg.drop_conflicts and key in conflicted and split == "train":
            bad.append(i), reasons.append(f"conflicting tags for the same tokens as {first_key[key][0]}")
        elif cfg.dedupe and pair in first_pair and split == "train":
            bad.append(i), reasons.append(f"duplicate of {first_pair[pair]}")
        else:
            first_pair.setdefault(pair, row_id)
            keep.append(i)
    kept = pa.table({"id": pa.array([ids[i] for i in keep], pa.string()),
                     "tokens": pa.array([cleaned[i] for i in keep], LIST),
                     "tags": pa.array([tags[i] for i in keep], LIST)}, schema=SCHEMA)
    rejects = pa.table({"id": pa.array([ids[i] for i in bad], pa.string()), "split": pa.array([split] * len(bad), pa.string()),
                        "reason": pa.array(reasons, pa.string()), "tokens": pa.array([tokens[i] for i in bad], LIST),
                        "tags": pa.array([tags[i] for i in bad], LIST), "raw": pa.nulls(len(bad), pa.string())},
                       schema=REJECTS_SCHEMA)
    return kept, rejects, {"tokens_changed": changed, "rows_rejected": len(bad)}


def run(recipe: TokenRecipe, validated: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Clean every split (cached by fingerprint)."""
    started = time.perf_counter()
    key = stage_key(STAGE, recipe.clean.model_dump(mode="json"), [validated.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    splits = read_splits(validated)
    results = {split: CleanResult(*clean_table(table, split, recipe.clean)) for split, table in splits.items()}
    return store_result(results, splits, validated, key, store, started=started, count_labels=entity_counts,
                        lost_warning="train: entity type {!r} has no sentence left after cleaning",
                        counts_name="entity_counts")


def entity_counts(table: pa.Table) -> dict[str, int]:
    """Entity mentions per type in a split's ``tags``."""
    return dict(sorted(Counter(k for t in table.column("tags").to_pylist() for k, _, _ in entity_spans(t)).items()))
