"""Encode stage (tokens): the tag map, the sub-word tokenizer and every split's pieces.

The tokenizer is the pretrained checkpoint's own (``model.arch: pretrained``; its content hash enters
the fingerprint) or a BERT-style WordPiece trained on the train split's tokens only (scratch). Words
are tokenized pre-split (``is_pretokenized``, ``word_ids``) without truncation: windows are cut
later, at word boundaries, by :mod:`tasks.tokens.loader`, never by the tokenizer.

Output: ``tokenizer.json`` (truncation off), ``labels.json`` (the IOB2 tag list: ``O``, then ``B-X``,
``I-X`` per type), ``train/validation/test.parquet`` with ``id, tokens, tags, tag_ids, piece_ids,
piece_words, n_pieces, windows`` and ``token_stats.json``; ``rejects.parquet`` holds test or
validation sentences with a tag outside the tag map (an entity type never seen in train).

Run alone: part of ``python -m flows.prepare_data --config configs/wnut17.yaml``.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tokenizers
from tokenizers import Tokenizer

from models.encoders import checkpoint_digest, resolve_pretrained
from tasks.core.encoding import LABELS_FILE, STATS_FILE, TOKENIZER_FILE, store_encoded
from tasks.core.rejects import rejects_schema, rejects_table
from tasks.core.store import ArtifactStore, DataError, StageRef, stage_key
from tasks.text.config import TokenizerConfig
from tasks.text.encode import pretrained_tokenizer, train_tokenizer
from tasks.tokens.config import TokenRecipe
from tasks.tokens.loader import plan_windows, word_pieces
from tasks.tokens.tags import entity_types, tag_list

STAGE = "encode"
SPLITS = ("train", "validation", "test")
LIST = pa.list_(pa.string())
INTS = pa.list_(pa.int32())
SCHEMA = pa.schema([("id", pa.string()), ("tokens", LIST), ("tags", LIST), ("tag_ids", INTS), ("piece_ids", INTS),
                    ("piece_words", INTS), ("n_pieces", pa.int32()), ("windows", pa.int32())])
REJECTS_SCHEMA = rejects_schema(("tokens", LIST), ("tags", LIST))


def tokenizer_config(recipe: TokenRecipe) -> dict[str, Any]:
    """What the pieces depend on: the checkpoint's hash (pretrained) or the scratch tokenizer settings."""
    if recipe.model.arch == "pretrained":
        return {"pretrained": checkpoint_digest(resolve_pretrained(recipe.model.pretrained))}
    return recipe.tokenizer.model_dump(mode="json", include={"model", "vocab_size", "min_frequency", "lowercase"})


def fit_tokenizer(recipe: TokenRecipe, train_tokens: list[list[str]]) -> tuple[Tokenizer, dict[str, int]]:
    """The recipe's tokenizer, truncation off, and its special ids (``pad_id, unk_id, cls_id, sep_id, mask_id``)."""
    cfg = recipe.tokenizer
    if recipe.model.arch == "pretrained":
        tokenizer, ids = pretrained_tokenizer(str(resolve_pretrained(recipe.model.pretrained)), cfg.max_length)
    else:
        text_cfg = TokenizerConfig(model=cfg.model, vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                   lowercase=cfg.lowercase, max_length=cfg.max_length)
        tokenizer = train_tokenizer([" ".join(t) for t in train_tokens], text_cfg)
        ids = {f"{n.strip('[]').lower()}_id": int(tokenizer.token_to_id(n)) for n in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")}
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer, ids


def tag_map(train_tags: list[list[str]], configured: list[str] | None) -> list[str]:
    """The tag list (index = id): ``O`` and B-/I- of every type of ``data.labels`` (types or tags), else of train."""
    if configured:
        types = sorted({label[2:] if label[:2] in ("B-", "I-") else label for label in configured if label != "O"})
    else:
        types = sorted({t for tags in train_tags for t in entity_types(tags)})
    if not types:
        raise DataError("train split has no entity: nothing to learn (every tag is O)")
    return tag_list(types)


def encode_rows(tokenizer: Tokenizer, table: pa.Table, labels: list[str], unk_id: int, max_length: int,
                stride: int, split: str) -> tuple[pa.Table, pa.Table]:
    """Encode canonical ``id, tokens, tags`` rows; rows with a tag outside ``labels`` are rejected."""
    index = {t: i for i, t in enumerate(labels)}
    ids, tokens, tags = (table.column(c).to_pylist() for c in ("id", "tokens", "tags"))
    keep = [i for i, t in enumerate(tags) if all(x in index for x in t)]
    kept = set(keep)
    bad = [i for i in range(len(ids)) if i not in kept]
    rejects = rejects_table([ids[i] for i in bad],
                            [f"tag {next(x for x in tags[i] if x not in index)!r} is not in the tag map (types seen in train: "
                             f"{', '.join(sorted({t[2:] for t in labels if t != 'O'}))})" for i in bad],
                            {"tokens": pa.array([tokens[i] for i in bad], LIST), "tags": pa.array([tags[i] for i in bad], LIST)},
                            split).cast(REJECTS_SCHEMA)
    tokens, tags, ids = [tokens[i] for i in keep], [tags[i] for i in keep], [ids[i] for i in keep]
    pieces = word_pieces(tokenizer, tokens, unk_id)
    n_windows = []
    for (_, words), sentence in zip(pieces, tokens):
        lengths = np.bincount(np.asarray(words, np.int64), minlength=len(sentence)) if words else []
        n_windows.append(len(plan_windows(list(lengths), max_length - 2, stride)))
    out = pa.table({
        "id": pa.array(ids, pa.string()), "tokens": pa.array(tokens, LIST), "tags": pa.array(tags, LIST),
        "tag_ids": pa.array([[index[x] for x in t] for t in tags], INTS),
        "piece_ids": pa.array([p for p, _ in pieces], INTS), "piece_words": pa.array([w for _, w in pieces], INTS),
        "n_pieces": pa.array([len(p) for p, _ in pieces], pa.int32()), "windows": pa.array(n_windows, pa.int32()),
    }, schema=SCHEMA)
    return out, rejects


def run(recipe: TokenRecipe, split_ref: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Fit (or load) the tokenizer, fix the tag map and encode every split (cached by fingerprint)."""
    config = {"tokenizer": tokenizer_config(recipe), "labels": recipe.data.labels,
              "windows": recipe.tokenizer.model_dump(mode="json", include={"max_length", "stride"})}
    key = stage_key(STAGE, config, [split_ref.fingerprint], __name__, extra_code=f"tokenizers-{tokenizers.__version__}")
    if (hit := store.cached(key, force)) is not None:
        return hit
    tables = {name: pq.read_table(split_ref.file(f"{name}.parquet")) for name in SPLITS}
    train_tokens = tables["train"].column("tokens").to_pylist()
    if not train_tokens:
        raise DataError(f"{split_ref.file('train.parquet')}: the train split is empty")
    tokenizer, special = fit_tokenizer(recipe, train_tokens)
    labels = tag_map(tables["train"].column("tags").to_pylist(), recipe.data.labels)
    cfg = recipe.tokenizer
    encoded, rejected = {}, []
    for name in SPLITS:
        encoded[name], rej = encode_rows(tokenizer, tables[name], labels, special["unk_id"], cfg.max_length,
                                         cfg.stride, name)
        rejected.append(rej)
    rejects = pa.concat_tables(rejected)
    n_input = sum(t.num_rows for t in tables.values())
    rows = {"input": n_input, **{n: encoded[n].num_rows for n in SPLITS}, "rejected": rejects.num_rows}
    if sum(rows[n] for n in SPLITS) + rows["rejected"] != n_input:  # pragma: no cover - invariant
        raise RuntimeError(f"{STAGE}: row accounting broken: {rows}")
    metrics: dict[str, float] = {"vocab_size": float(tokenizer.get_vocab_size()), "num_tags": float(len(labels)),
                                 "rows_rejected": float(rows["rejected"])}
    stats: dict[str, Any] = {"rows": rows, "labels": labels}
    for name in SPLITS:
        t = encoded[name]
        pieces = t.column("n_pieces").to_numpy() if t.num_rows else np.zeros(0)
        words = np.asarray([len(x) for x in t.column("tokens").to_pylist()]) if t.num_rows else np.zeros(0)
        windows = t.column("windows").to_numpy() if t.num_rows else np.zeros(0)
        unk = np.mean(np.concatenate([np.asarray(x) for x in t.column("piece_ids").to_pylist()] or [np.zeros(0)]) == special["unk_id"]) if t.num_rows else 0.0
        split_stats = {"pieces_per_word": float(pieces.sum() / max(1, words.sum())), "pieces_p99": float(np.percentile(pieces, 99)) if len(pieces) else 0.0,
                       "pieces_max": float(pieces.max()) if len(pieces) else 0.0, "windowed_fraction": float(np.mean(windows > 1)) if len(windows) else 0.0,
                       "unk_rate": float(unk)}
        stats[name] = split_stats
        metrics.update({f"{name}_{k}": v for k, v in split_stats.items()})
    extra = {"vocab_size": tokenizer.get_vocab_size(), "num_labels": len(labels), "labels": labels, **special,
             "max_length": cfg.max_length, "stride": cfg.stride, "arch": recipe.model.arch, "metrics": metrics,
             "log_files": [TOKENIZER_FILE, LABELS_FILE, STATS_FILE]}
    return store_encoded(store, key, tokenizer=tokenizer, labels=labels, splits={n: encoded[n] for n in SPLITS},
                         rejects=rejects, stats=stats, rows=rows, extra=extra)


def load_labels(ref: StageRef) -> list[str]:
    """The tag list of an encode (or train) stage directory."""
    return json.loads(ref.file(LABELS_FILE).read_text())
