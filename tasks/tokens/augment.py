"""Augment stage (tokens): Dai & Adel (2020) copies of the train split; originals kept, copies flagged.

* **mention replacement**: each entity is, with probability ``augment.p``, swapped for a mention of
  the same type drawn from the train split (any length); its tags are rebuilt (``B-X I-X ...``).
* **label-wise token replacement**: each token is, with probability ``augment.p``, swapped for a
  train token that carries the same tag (an ``I-person`` token for an ``I-person`` token), so the
  tags stay as they are.

Each original sentence gets ``augment.copies`` copies, each made by one operation drawn from
``augment.operations``; a draw that changes nothing (no entity to replace) tries the other
operation, and a copy that still equals its original is not added (counted as ``unchanged``).
Everything is drawn from one generator seeded by ``augment.seed`` in row order, and the pools come
from train only, so nothing of validation or test enters. Copies are re-encoded with the encode
stage's tokenizer and get ids ``<orig id>#aug<k>``. Validation and test are not copied: later stages
read them from the encode directory. With ``augment.enabled`` false train passes through
(``augmented`` all false). Samples go to ``augmentation_samples.json`` (logged to MLflow).

Run alone: part of ``python -m flows.prepare_data --config configs/wnut17.yaml``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
from tokenizers import Tokenizer

from tasks.core.rejects import rejects_schema
from tasks.core.store import ArtifactStore, StageRef, stage_key
from tasks.tokens.config import TokenAugmentConfig, TokenRecipe
from tasks.tokens.encode import encode_rows
from tasks.tokens.tags import OUTSIDE, entity_spans

STAGE = "augment"
SAMPLES_FILE = "augmentation_samples.json"
N_SAMPLES = 20
REJECTS_SCHEMA = rejects_schema(("tokens", pa.list_(pa.string())), ("tags", pa.list_(pa.string())))
_PASSED_THROUGH = ("vocab_size", "num_labels", "labels", "pad_id", "unk_id", "cls_id", "sep_id", "mask_id",
                   "max_length", "stride", "arch")


def mention_pool(tokens: Sequence[Sequence[str]], tags: Sequence[Sequence[str]]) -> dict[str, list[tuple[str, ...]]]:
    """Every entity mention of the sentences by type, in order of appearance (repeats kept: frequent names weigh more)."""
    pool: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for toks, tgs in zip(tokens, tags):
        for kind, a, b in entity_spans(tgs):
            pool[kind].append(tuple(toks[a:b]))
    return dict(pool)


def token_pool(tokens: Sequence[Sequence[str]], tags: Sequence[Sequence[str]]) -> dict[str, list[str]]:
    """Every token by the tag it carries."""
    pool: dict[str, list[str]] = defaultdict(list)
    for toks, tgs in zip(tokens, tags):
        for tok, tag in zip(toks, tgs):
            pool[tag].append(tok)
    return dict(pool)


def mention_replacement(tokens: Sequence[str], tags: Sequence[str], pool: dict[str, list[tuple[str, ...]]], p: float,
                        rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Swap each entity, with probability ``p``, for a random same-type mention of ``pool``; tags rebuilt."""
    out_tokens: list[str] = []
    out_tags: list[str] = []
    position = 0
    for kind, a, b in entity_spans(tags):
        out_tokens += tokens[position:a]
        out_tags += tags[position:a]
        mention: Sequence[str] = tokens[a:b]
        if pool.get(kind) and rng.random() < p:
            mention = pool[kind][int(rng.integers(len(pool[kind])))]
        out_tokens += list(mention)
        out_tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(mention) - 1)
        position = b
    out_tokens += tokens[position:]
    out_tags += tags[position:]
    return out_tokens, out_tags


def token_replacement(tokens: Sequence[str], tags: Sequence[str], pool: dict[str, list[str]], p: float,
                      rng: np.random.Generator) -> tuple[list[str], list[str]]:
    """Swap each token, with probability ``p``, for a random train token of the same tag; tags unchanged."""
    out = list(tokens)
    for i, tag in enumerate(tags):
        if pool.get(tag) and rng.random() < p:
            out[i] = pool[tag][int(rng.integers(len(pool[tag])))]
    return out, list(tags)


def augment_rows(ids: list[str], tokens: list[list[str]], tags: list[list[str]], cfg: TokenAugmentConfig
                 ) -> tuple[list[str], list[list[str]], list[list[str]], dict[str, int]]:
    """The copies of the train sentences (ids, tokens, tags) and counts per operation."""
    rng = np.random.default_rng(cfg.seed)
    mentions, words = mention_pool(tokens, tags), token_pool(tokens, tags)
    ops = {"mention_replacement": lambda t, g: mention_replacement(t, g, mentions, cfg.p, rng),
           "token_replacement": lambda t, g: token_replacement(t, g, words, cfg.p, rng)}
    new_ids, new_tokens, new_tags = [], [], []
    counts = {op: 0 for op in ops} | {"unchanged": 0}
    for row_id, toks, tgs in zip(ids, tokens, tags):
        for k in range(1, cfg.copies + 1):
            first = cfg.operations[int(rng.integers(len(cfg.operations)))]
            order = [first, *(op for op in cfg.operations if op != first)]
            for op in order:
                out_t, out_g = ops[op](toks, tgs)
                if out_t != toks:
                    counts[op] += 1
                    new_ids.append(f"{row_id}#aug{k}"), new_tokens.append(out_t), new_tags.append(out_g)
                    break
            else:
                counts["unchanged"] += 1
    return new_ids, new_tokens, new_tags, counts


def run(recipe: TokenRecipe, encoded: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Add augmented copies to the encoded train split (cached by fingerprint)."""
    cfg = recipe.augment
    key = stage_key(STAGE, cfg.model_dump(mode="json"), [encoded.fingerprint], __name__,
                    extra_code=f"tokenizers-{tokenizers.__version__}")
    if (hit := store.cached(key, force)) is not None:
        return hit
    train = pq.read_table(encoded.file("train.parquet"))
    train = train.append_column("augmented", pa.array([False] * train.num_rows, pa.bool_()))
    counts: dict[str, int] = {}
    samples = []
    if cfg.enabled and train.num_rows:
        ids, tokens, tags = (train.column(c).to_pylist() for c in ("id", "tokens", "tags"))
        new_ids, new_tokens, new_tags, counts = augment_rows(ids, tokens, tags, cfg)
        labels = encoded.extra["labels"]
        tokenizer = Tokenizer.from_file(str(encoded.file("tokenizer.json")))
        copies, _ = encode_rows(tokenizer, pa.table({"id": pa.array(new_ids, pa.string()),
                                                     "tokens": pa.array(new_tokens, pa.list_(pa.string())),
                                                     "tags": pa.array(new_tags, pa.list_(pa.string()))}),
                                labels, int(encoded.extra["unk_id"]), recipe.tokenizer.max_length, recipe.tokenizer.stride, "train")
        copies = copies.append_column("augmented", pa.array([True] * copies.num_rows, pa.bool_()))
        train = pa.concat_tables([train, copies.cast(train.schema)])
        by_id = dict(zip(ids, zip(tokens, tags)))
        for new_id, toks, tgs in list(zip(new_ids, new_tokens, new_tags))[:N_SAMPLES]:
            orig_t, orig_g = by_id[new_id.rsplit("#aug", 1)[0]]
            samples.append({"id": new_id, "original": " ".join(orig_t), "augmented": " ".join(toks),
                            "original_entities": [[k, " ".join(orig_t[a:b])] for k, a, b in entity_spans(orig_g)],
                            "augmented_entities": [[k, " ".join(toks[a:b])] for k, a, b in entity_spans(tgs)]})
    n_aug = int(sum(train.column("augmented").to_pylist()))
    n_orig = train.num_rows - n_aug  # originals are kept, so they are the input rows
    rows = {"input": n_orig, "original": n_orig, "train": train.num_rows, "augmented": n_aug, "rejected": 0}
    metrics = {"rows_augmented": float(n_aug), "rows_train": float(train.num_rows),
               **{f"copies.{k}": float(v) for k, v in counts.items()}}
    extra = {**{k: encoded.extra[k] for k in _PASSED_THROUGH if k in encoded.extra},
             "source_path": encoded.path, "metrics": metrics, "log_files": [SAMPLES_FILE]}
    with store.writer(key) as w:
        w.write_table("train.parquet", train)
        w.write_table("rejects.parquet", pa.Table.from_batches([], schema=REJECTS_SCHEMA))
        w.write_json(SAMPLES_FILE, {"counts": counts, "samples": samples, "outside_tag": OUTSIDE})
        return w.write_manifest(rows=rows, extra=extra)
