"""Augment stage: EDA-style copies of the train split (random swap, deletion, insertion).

No external resources: insertion draws from the tokenizer's own vocabulary, restricted to whole
words (alphabetic, at least two characters, not special tokens, not ``##`` continuation pieces),
so every inserted word is a single in-vocabulary token and nothing outside the train split (the
vocabulary is trained on train only) enters the data.

Each original row gets ``augment.copies`` copies; each copy applies one operation drawn from
``augment.operations`` that touches about ``augment.p`` of the words (at least one); a one-word
text, which can be neither swapped nor shortened, gets an insertion when that is allowed. Everything is
drawn from one :class:`numpy.random.Generator` seeded with ``augment.seed`` and walked in row
order, so the output is a function of the input rows and the config.

Output: ``train.parquet`` (the tokenize columns plus ``augmented: bool``; originals first, then the
copies with ids ``<orig id>#aug<k>``, k = 1..copies, re-encoded with the stage's tokenizer),
``augmentation_samples.json`` and an empty ``rejects.parquet``. Validation and test are not
copied: later stages read them from the tokenize directory, ``extra["source_path"]``. With
``augment.enabled`` false the stage passes train through (all ``augmented=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tokenizers
from tokenizers import Tokenizer

from tasks.core.rejects import rejects_schema
from tasks.core.store import ArtifactStore, StageRef, stage_key
from tasks.text import encode as tokenize
from tasks.text.config import AugmentConfig, TextRecipe

STAGE = "augment"
OPERATIONS = ("swap", "delete", "insert")
SAMPLES_FILE = "augmentation_samples.json"
N_SAMPLES = 20
REJECTS_SCHEMA = rejects_schema(("text", pa.string()), ("label", pa.string()))
# facts of the tokenize stage that later stages need, passed through so train can read one ref
_PASSED_THROUGH = (
    "vocab_size", "num_labels", "labels", "pad_id", "unk_id", "cls_id", "sep_id", "mask_id", "max_length",
    "lowercase", "tokenizer_file", "labels_file",
)


def random_swap(words: Sequence[str], n: int, rng: np.random.Generator) -> list[str]:
    """Swap two distinct random positions, ``n`` times (a copy; unchanged when fewer than 2 words)."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i = int(rng.integers(len(out)))
        j = int(rng.integers(len(out) - 1))
        j += j >= i  # a position other than i, uniformly
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Sequence[str], p: float, rng: np.random.Generator) -> list[str]:
    """Drop each word with probability ``p``; at least one word is dropped and one is kept.

    A single word (or none) is returned unchanged: deleting it would leave no text.
    """
    if len(words) < 2:
        return list(words)
    drop = rng.random(len(words)) < p
    if drop.all():
        drop[rng.integers(len(words))] = False
    elif not drop.any():
        drop[rng.integers(len(words))] = True
    return [w for w, d in zip(words, drop) if not d]


def random_insertion(words: Sequence[str], n: int, vocab: Sequence[str], rng: np.random.Generator) -> list[str]:
    """Insert ``n`` words drawn uniformly from ``vocab`` at random positions (a copy)."""
    out = list(words)
    if not vocab:
        return out
    for _ in range(n):
        word = vocab[int(rng.integers(len(vocab)))]
        out.insert(int(rng.integers(len(out) + 1)), word)
    return out


def insertion_vocab(tokenizer: Tokenizer) -> list[str]:
    """Whole-word entries of the tokenizer vocabulary, in id order.

    Alphabetic, at least two characters, not a special token, not a ``##`` continuation piece.
    """
    specials = set(tokenize.SPECIAL_TOKENS)
    vocab = tokenizer.get_vocab()
    return [
        word
        for word, _ in sorted(vocab.items(), key=lambda item: item[1])
        if word not in specials and not word.startswith("##") and len(word) >= 2 and word.isalpha()
    ]


def words_to_touch(n_words: int, p: float) -> int:
    """About ``p`` of ``n_words``, at least 1."""
    return max(1, int(round(p * n_words)))


def augment_with_ops(texts: Sequence[str], cfg: AugmentConfig, vocab: Sequence[str]) -> list[tuple[int, str, str]]:
    """Like :func:`augment_texts`, also naming the operation: ``(source_index, operation, text)``."""
    rng = np.random.default_rng(cfg.seed)
    ops = list(cfg.operations)
    out: list[tuple[int, str, str]] = []
    for index, text in enumerate(texts):
        words = text.split()
        n = words_to_touch(len(words), cfg.p)
        for _ in range(cfg.copies):
            op = ops[int(rng.integers(len(ops)))]
            if len(words) < 2 and op != "insert" and "insert" in ops:
                op = "insert"  # one word cannot be swapped or deleted: insert instead
            if op == "swap":
                new = random_swap(words, n, rng)
            elif op == "delete":
                new = random_deletion(words, cfg.p, rng)
            else:
                new = random_insertion(words, n, vocab, rng)
            out.append((index, op, " ".join(new)))
    return out


def augment_texts(texts: Sequence[str], cfg: AugmentConfig, vocab: Sequence[str]) -> list[tuple[int, str]]:
    """``cfg.copies`` augmented versions of every text, as ``(source_index, text)`` in source order.

    Words are whitespace-separated; each copy applies one operation drawn from
    ``cfg.operations`` touching about ``cfg.p`` of the words (at least one; one-word texts get
    ``insert`` when it is among the operations). Deterministic for a
    given ``texts``, ``cfg`` and ``vocab``.
    """
    return [(index, text) for index, _, text in augment_with_ops(texts, cfg, vocab)]


def _config(cfg: AugmentConfig) -> dict:
    # when disabled the other knobs do not change the output: keep them out of the fingerprint
    return cfg.model_dump(mode="json") if cfg.enabled else {"enabled": False}


def run(recipe: TextRecipe, tokenized: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Write the (augmented) train split next to the encode output (cached by fingerprint)."""
    cfg = recipe.augment
    config = _config(cfg)
    key = stage_key(STAGE, config, [tokenized.fingerprint], __name__, extra_code=f"tokenizers-{tokenizers.__version__}")
    if (hit := store.cached(key, force)) is not None:
        return hit

    train = pq.read_table(tokenized.file("train.parquet")).select(tokenize.SCHEMA.names).combine_chunks()
    n = train.num_rows
    originals = train.append_column("augmented", pa.array(np.zeros(n, dtype=bool)))
    samples: list[dict[str, str]] = []
    op_counts = {op: 0 for op in OPERATIONS}
    unchanged = 0
    if cfg.enabled and n:
        tokenizer = Tokenizer.from_file(str(tokenized.file(tokenize.TOKENIZER_FILE)))
        vocab = insertion_vocab(tokenizer)
        source_texts = train.column("text").to_pylist()
        made = augment_with_ops(source_texts, cfg, vocab)
        source = np.fromiter((i for i, _, _ in made), dtype=np.int64, count=len(made))
        new_texts = [text for _, _, text in made]
        copy_k = np.tile(np.arange(1, cfg.copies + 1), n)
        base = train.take(pa.array(source))
        ids = pc.binary_join_element_wise(base.column("id"), pa.array([f"#aug{k}" for k in copy_k]), "")
        input_ids = tokenize.encode(tokenizer, new_texts)
        copies = pa.Table.from_arrays(
            [
                ids,
                pa.array(new_texts, pa.string()),
                base.column("label"),
                base.column("label_id"),
                input_ids,
                pc.cast(pc.list_value_length(input_ids), pa.int32()),
                pa.array(np.ones(len(made), dtype=bool)),
            ],
            schema=originals.schema,
        )
        table = pa.concat_tables([originals, copies])
        for (index, op, text) in made:
            op_counts[op] += 1
            unchanged += text == " ".join(source_texts[index].split())
        step = max(1, len(made) // N_SAMPLES)
        samples = [
            {"id": ids[i].as_py(), "operation": made[i][1], "original": source_texts[made[i][0]], "augmented": made[i][2]}
            for i in range(0, len(made), step)
        ][:N_SAMPLES]
    else:
        table = originals

    n_aug = table.num_rows - n
    rows = {"input": n, "original": n, "augmented": n_aug, "train": table.num_rows, "rejected": 0}
    metrics: dict[str, float] = {
        "rows_input": float(n), "rows_augmented": float(n_aug), "rows_train": float(table.num_rows),
        "unchanged_copies": float(unchanged),
    }
    if cfg.enabled:
        metrics.update({f"op_{op}": float(count) for op, count in op_counts.items()})
    extra = {
        "enabled": cfg.enabled,
        "source_path": tokenized.path,
        "source_fingerprint": tokenized.fingerprint,
        **{name: tokenized.extra[name] for name in _PASSED_THROUGH if name in tokenized.extra},
        "metrics": metrics,
        "log_files": [SAMPLES_FILE],
    }
    with store.writer(key) as w:
        w.write_table("train.parquet", table)
        w.write_table("rejects.parquet", pa.Table.from_batches([], schema=REJECTS_SCHEMA))
        w.write_json(SAMPLES_FILE, samples)
        ref = w.write_manifest(rows=rows, extra=extra)
    return ref
