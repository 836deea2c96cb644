"""Encode stage (text): tokenize every split, with a tokenizer trained on the train split (scratch
encoders) or the pretrained checkpoint's own (``model.arch: pretrained``; never trained, its content
hash enters the fingerprint).

The scratch tokenizer is BERT-style (``BertNormalizer``, ``BertPreTokenizer``, WordPiece with ``[UNK]``,
``[CLS] $A [SEP]``) and is trained on the train split only, so nothing of validation or test leaks
into the vocabulary. ``tokenizer.model: wordlevel`` keeps whole words instead: a word seen fewer
than ``min_frequency`` times in train, or never, becomes ``[UNK]``. On small data that generalises
better than WordPiece, whose pieces of an unseen word carry the labels of unrelated words that share
them (TREC: "What is amitriptyline ?" -> ``am ##it ##rip ...``; see docs/benchmarks.md). Special tokens have fixed ids: ``[PAD]=0, [UNK]=1, [CLS]=2, [SEP]=3,
[MASK]=4``. Sequences are truncated to ``tokenizer.max_length`` tokens ([CLS] and [SEP] included)
and stored unpadded (``input_ids: list<int32>``): padding is dynamic, per batch, at training time.

Output: ``tokenizer.json``, ``labels.json`` (the list index -> label), ``train/validation/test
.parquet`` with ``id, text, label, label_id, input_ids, length``, ``token_stats.json`` and
``rejects.parquet`` (rows whose label is not in the label map).
"""

from __future__ import annotations

import itertools
import json
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import tokenizers
from tokenizers import (
    Encoding,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from models.encoders import EncoderConfig, checkpoint_digest, resolve_pretrained
from tasks.core.encoding import LABELS_FILE, STATS_FILE, TOKENIZER_FILE, store_encoded
from tasks.core.labels import label_ids, label_map
from tasks.core.rejects import rejects_schema, rejects_table
from tasks.core.store import ArtifactStore, DataError, StageRef, stage_key
from tasks.text.config import TextRecipe, TokenizerConfig
from tasks.text.ingest import canonical_label_list

STAGE = "encode"
SPLITS = ("train", "validation", "test")
PAD, UNK, CLS, SEP, MASK = "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
SPECIAL_TOKENS = [PAD, UNK, CLS, SEP, MASK]  # ids 0..4 in this order
IDS_TYPE = pa.list_(pa.int32())
SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("label", pa.string()),
        ("label_id", pa.int32()),
        ("input_ids", IDS_TYPE),
        ("length", pa.int32()),
    ]
)
REJECTS_SCHEMA = rejects_schema(("text", pa.string()), ("label", pa.string()))
TRAIN_BATCH = 1000
PERCENTILES = (50, 90, 95, 99)


def _batches(texts: Iterable[str], size: int = TRAIN_BATCH) -> Iterator[list[str]]:
    iterator = iter(texts)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    """An untrained BERT-style tokenizer for ``cfg`` (normaliser, pre-tokeniser, decoder): WordPiece,
    or a word-level vocabulary behind the same normaliser and pre-tokeniser."""
    if cfg.model == "wordlevel":
        tokenizer = Tokenizer(models.WordLevel(unk_token=UNK))
    else:
        tokenizer = Tokenizer(models.WordPiece(unk_token=UNK))
        tokenizer.decoder = decoders.WordPiece(prefix="##")
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=cfg.lowercase, lowercase=cfg.lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tokenizer


def _trainer(cfg: TokenizerConfig, texts: Sequence[str], tokenizer: Tokenizer) -> trainers.Trainer:
    if cfg.model == "wordlevel":
        # ties in frequency are broken by the word itself, so the vocabulary is deterministic
        return trainers.WordLevelTrainer(
            vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency, special_tokens=SPECIAL_TOKENS, show_progress=False
        )
    return trainers.WordPieceTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=SPECIAL_TOKENS + continuing_pieces(texts, tokenizer),
        continuing_subword_prefix="##",
        show_progress=False,
    )


def continuing_pieces(texts: Iterable[str], tokenizer: Tokenizer) -> list[str]:
    """Sorted ``##c`` pieces for every character ``c`` of the normalised texts that can continue a word.

    Whitespace and punctuation are left out: the pre-tokeniser makes those words of their own.
    """
    chars: set[str] = set()
    for batch in _batches(texts, 5000):
        chars.update(tokenizer.normalizer.normalize_str("\n".join(batch)))
    return sorted(f"##{c}" for c in chars if not c.isspace() and not unicodedata.category(c).startswith("P"))


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig) -> Tokenizer:
    """Train the tokenizer ``cfg`` asks for on ``texts`` (fed in batches), with ``[CLS] $A [SEP]`` and truncation.

    The result has the special tokens at ids 0..4 (``[PAD]`` = 0) and truncates to
    ``cfg.max_length`` tokens, special tokens included.

    WordPiece training is made deterministic: the stock trainer gives the ``##c`` continuation pieces ids
    in hash-map order, and those ids break ties between equally frequent merges, so the same
    texts gave a different vocabulary on every run (huggingface/tokenizers#1794). Registering
    every ``##c`` up front, in sorted order, fixes their ids; they are then demoted from "added
    tokens" to plain vocabulary entries so they are not matched as special strings in text.
    """
    texts = texts if isinstance(texts, Sequence) else list(texts)
    tokenizer = build_tokenizer(cfg)
    tokenizer.train_from_iterator(_batches(texts), trainer=_trainer(cfg, texts, tokenizer), length=len(texts))
    state = json.loads(tokenizer.to_str())
    state["added_tokens"] = [t for t in state["added_tokens"] if t["content"] in SPECIAL_TOKENS]
    tokenizer = Tokenizer.from_str(json.dumps(state))
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:  # pragma: no cover - trainer contract
            raise RuntimeError(f"{STAGE}: special token {token} got id {tokenizer.token_to_id(token)}, expected {expected_id}")
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{CLS} $A {SEP}",
        pair=f"{CLS} $A {SEP} $B:1 {SEP}:1",
        special_tokens=[(CLS, tokenizer.token_to_id(CLS)), (SEP, tokenizer.token_to_id(SEP))],
    )
    tokenizer.enable_truncation(max_length=cfg.max_length)
    return tokenizer


def _encode_batch(tokenizer: Tokenizer, add_special_tokens: bool = True) -> Callable[[list[str]], list[Encoding]]:
    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets, which we never use.
    encode_batch = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    return encode_batch if add_special_tokens else lambda texts: encode_batch(texts, add_special_tokens=False)


def _plain_template(tokenizer: Tokenizer) -> tuple[int, int, int] | None:
    """``(cls_id, sep_id, max_length)`` when the tokenizer's specials can be added outside it, else None.

    That holds for exactly the ``[CLS] $A [SEP]`` template (as :func:`train_tokenizer` builds it)
    with right-side truncation and no padding: the encoding with specials is then ``[CLS]``, the
    first ``max_length - 2`` ids of the encoding without them, ``[SEP]``. Any other tokenizer
    (a pretrained one, a pair template, left truncation) keeps the tokenizer's own post-processing.
    """
    truncation = tokenizer.truncation
    if truncation is None or truncation["direction"] != "right" or tokenizer.padding is not None:
        return None
    if tokenizer.post_processor is None:
        return None
    # the processor's own JSON (its pickle state), not tokenizer.to_str(), which serialises the whole vocabulary
    processor = json.loads(tokenizer.post_processor.__getstate__())
    single = processor.get("single")
    if processor.get("type") != "TemplateProcessing" or single is None or len(single) != 3:
        return None
    first, middle, last = single
    if "SpecialToken" not in first or "SpecialToken" not in last or "Sequence" not in middle:
        return None
    ids = [processor["special_tokens"][s["SpecialToken"]["id"]]["ids"] for s in (first, last)]
    if any(len(i) != 1 for i in ids) or truncation["max_length"] < 2:
        return None
    return ids[0][0], ids[1][0], truncation["max_length"]


def _flatten(encodings: list[Encoding], specials: tuple[int, int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, concatenated ids) of a batch of encodings, without per-row Arrow objects.

    With ``specials = (cls_id, sep_id, max_length)`` the encodings lack their special tokens:
    each row is clipped to ``max_length - 2`` ids and wrapped in ``[CLS] ... [SEP]`` here, in a
    few vectorised numpy operations instead of one Rust post-processing call per row.
    """
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int32, count=len(ids))
    values = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    if specials is None:
        return lengths, values
    cls_id, sep_id, max_length = specials
    kept = np.minimum(lengths, max_length - 2)
    if (kept < lengths).any():  # rows cut to max_length - 2: keep each row's first ``kept`` ids
        starts = np.cumsum(lengths) - lengths
        position = np.arange(len(values), dtype=np.int64) - np.repeat(starts, lengths)
        values = values[position < np.repeat(kept, lengths)]
    out_lengths = kept + 2
    ends = np.cumsum(out_lengths)  # one past each row's [SEP]
    out = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.int32)
    body = np.ones(len(out), dtype=bool)
    body[ends - out_lengths] = False
    body[ends - 1] = False
    out[ends - out_lengths] = cls_id
    out[ends - 1] = sep_id
    out[body] = values
    return out_lengths, out


def encode(tokenizer: Tokenizer, texts: list[str], chunk_size: int | None = None) -> pa.Array:
    """Token ids of every text as one Arrow ``list<int32>`` array (no padding).

    Texts are encoded in a few large ``encode_batch`` chunks (parallel on the Rust side, which
    releases the GIL) on a helper thread, while this thread turns the previous chunk's encodings
    into flat numpy lengths and ids: the Python-side conversion overlaps the encoding instead of
    adding to it. One concatenation at the end builds the list array from offsets and values.
    For the tokenizer :func:`train_tokenizer` builds, ``[CLS]``/``[SEP]`` are added in numpy during
    that conversion rather than by the tokenizer (same ids, about 8% less CPU; see
    :func:`_plain_template`). ``chunk_size`` defaults to about an eighth of the input (at least 4096 texts).
    """
    texts = list(texts)
    n = len(texts)
    if chunk_size is None:
        chunk_size = max(4096, -(-n // 8))
    specials = _plain_template(tokenizer)
    encode_batch = _encode_batch(tokenizer, add_special_tokens=specials is None)
    if n <= chunk_size:
        parts = [_flatten(encode_batch(texts), specials)] if n else []
    else:
        chunks = [texts[i : i + chunk_size] for i in range(0, n, chunk_size)]
        parts = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="nightshift-encode") as pool:
            pending = pool.submit(encode_batch, chunks[0])
            for following in chunks[1:] + [None]:
                encodings = pending.result()
                if following is not None:
                    pending = pool.submit(encode_batch, following)
                parts.append(_flatten(encodings, specials))
                del encodings
    lengths = np.concatenate([p[0] for p in parts]) if parts else np.zeros(0, np.int32)
    values = np.concatenate([p[1] for p in parts]) if parts else np.zeros(0, np.int32)
    if len(values) > np.iinfo(np.int32).max:
        raise ValueError(f"{STAGE}: {len(values)} token ids overflow list<int32> offsets; encode in smaller parts")
    offsets = np.zeros(n + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(values)).cast(IDS_TYPE)


def untruncated_count(tokenizer: Tokenizer, texts: list[str], lengths: np.ndarray) -> int:
    """How many of ``texts`` were cut by truncation.

    Only texts whose encoding reached the limit can have been cut; those few are re-encoded by
    an untruncated copy of the tokenizer to tell "exactly max_length" from "longer".
    """
    truncation = tokenizer.truncation
    if truncation is None:
        return 0
    limit = truncation["max_length"]
    candidates = np.flatnonzero(lengths >= limit)
    if len(candidates) == 0:
        return 0
    free = Tokenizer.from_str(tokenizer.to_str())
    free.no_truncation()
    full = _encode_batch(free)([texts[i] for i in candidates])
    return sum(len(e.ids) > limit for e in full)


def length_stats(lengths: np.ndarray) -> dict[str, float]:
    """Mean, percentiles and max of token lengths (zeros for an empty split)."""
    if len(lengths) == 0:
        return {"mean": 0.0, **{f"p{q}": 0.0 for q in PERCENTILES}, "max": 0.0}
    stats = {"mean": float(np.mean(lengths))}
    stats.update({f"p{q}": float(np.percentile(lengths, q)) for q in PERCENTILES})
    stats["max"] = float(np.max(lengths))
    return stats


def encode_table(tokenizer: Tokenizer, table: pa.Table, mapping: list[str], split: str = "train") -> tuple[pa.Table, pa.Table]:
    """Encode a canonical ``id, text, label`` table; returns (encoded rows, rejected rows).

    Rows whose label is not in ``mapping`` are rejected (reason says which label).
    """
    table = table.select(["id", "text", "label"]).combine_chunks()
    ids = label_ids(table.column("label"), mapping)
    known = ids.is_valid()
    rejects = pa.Table.from_batches([], schema=REJECTS_SCHEMA)
    if not pc.all(known).as_py() and table.num_rows:
        bad = table.filter(pc.invert(known))
        rejects = rejects_table(
            bad.column("id").to_pylist(),
            [f"label {label!r} is not in the label map {mapping}" for label in bad.column("label").to_pylist()],
            {"text": bad.column("text").to_pylist(), "label": bad.column("label").to_pylist()}, split,
        ).cast(REJECTS_SCHEMA)
        table = table.filter(known)
        ids = ids.filter(known)
    input_ids = encode(tokenizer, table.column("text").to_pylist())
    lengths = pc.cast(pc.list_value_length(input_ids), pa.int32())
    out = pa.Table.from_arrays(
        [table.column("id"), table.column("text"), table.column("label"), ids, input_ids, lengths], schema=SCHEMA
    )
    return out, rejects


def pretrained_tokenizer(folder: str, max_length: int) -> tuple[Tokenizer, dict[str, int]]:
    """The checkpoint's own fast tokenizer, truncating at ``max_length``, and its special-token ids."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(folder)
    tokenizer = Tokenizer.from_str(hf.backend_tokenizer.to_str())
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    ids = {"pad_id": hf.pad_token_id, "unk_id": hf.unk_token_id, "cls_id": hf.cls_token_id,
           "sep_id": hf.sep_token_id, "mask_id": hf.mask_token_id}
    return tokenizer, {k: int(v) if v is not None else 0 for k, v in ids.items()}


def encode_config(recipe: TextRecipe) -> dict:
    """What the encoded splits depend on: the tokenizer (trained settings, or the checkpoint's hash) and the labels."""
    if recipe.model.arch == "pretrained":
        folder = resolve_pretrained(recipe.model.pretrained)
        tokenizer = {"pretrained": checkpoint_digest(folder), "max_length": recipe.tokenizer.max_length}
    else:
        tokenizer = recipe.tokenizer.model_dump(mode="json")
    return {"tokenizer": tokenizer, "labels": recipe.data.labels}


def fit_tokenizer(recipe: TextRecipe, train_texts: list[str]) -> tuple[Tokenizer, dict[str, int]]:
    """The tokenizer of ``recipe``: the pretrained checkpoint's, or one trained on ``train_texts``."""
    model: EncoderConfig = recipe.model
    if model.arch == "pretrained":
        return pretrained_tokenizer(str(resolve_pretrained(model.pretrained)), recipe.tokenizer.max_length)
    tokenizer = train_tokenizer(train_texts, recipe.tokenizer)
    ids = {f"{name.strip('[]').lower()}_id": tokenizer.token_to_id(name) for name in (PAD, UNK, CLS, SEP, MASK)}
    return tokenizer, ids


def run(recipe: TextRecipe, split_ref: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Fit (or load) the tokenizer and encode every split (cached by fingerprint)."""
    key = stage_key(STAGE, encode_config(recipe), [split_ref.fingerprint], __name__,
                    extra_code=f"tokenizers-{tokenizers.__version__}")
    if (hit := store.cached(key, force)) is not None:
        return hit

    tables = {name: pq.read_table(split_ref.file(f"{name}.parquet")) for name in SPLITS}
    train_texts = tables["train"].column("text").to_pylist()
    if not train_texts:
        raise DataError(f"{split_ref.file('train.parquet')}: the train split is empty")
    tokenizer, special_ids = fit_tokenizer(recipe, train_texts)
    # numeric data.labels as ingest writes the data's labels ("1.0" -> "1"), as validate compared them
    mapping = label_map(tables["train"].column("label").to_pylist(), canonical_label_list(recipe.data.labels))

    encoded: dict[str, pa.Table] = {}
    rejected: list[pa.Table] = []
    truncation_rate: dict[str, float] = {}
    lengths: dict[str, dict[str, float]] = {}
    for name in SPLITS:
        out, rej = encode_table(tokenizer, tables[name], mapping, name)
        encoded[name] = out
        rejected.append(rej)
        n = out.num_rows
        lens = out.column("length").to_numpy()
        cut = untruncated_count(tokenizer, out.column("text").to_pylist(), lens) if n else 0
        truncation_rate[name] = cut / n if n else 0.0
        lengths[name] = length_stats(lens)
    rejects = pa.concat_tables(rejected)

    n_input = sum(t.num_rows for t in tables.values())
    rows = {"input": n_input, **{name: encoded[name].num_rows for name in SPLITS}, "rejected": rejects.num_rows}
    if sum(rows[name] for name in SPLITS) + rows["rejected"] != n_input:  # pragma: no cover
        raise RuntimeError(f"{STAGE}: row accounting broken: {rows}")
    unk_id = special_ids["unk_id"]
    train_ids = encoded["train"].column("input_ids").combine_chunks()
    train_values = train_ids.flatten().to_numpy() if len(train_ids) else np.zeros(0, np.int32)
    unk_rate = float(np.mean(train_values == unk_id)) if len(train_values) else 0.0

    metrics: dict[str, float] = {"vocab_size": float(tokenizer.get_vocab_size()), "num_labels": float(len(mapping))}
    metrics["train_unk_rate"] = unk_rate
    metrics["rows_rejected"] = float(rows["rejected"])
    for name in SPLITS:
        metrics[f"{name}_truncation_rate"] = truncation_rate[name]
        for stat, value in lengths[name].items():
            metrics[f"{name}_length_{stat}"] = value
    stats = {"truncation_rate": truncation_rate, "lengths": lengths, "rows": rows, "labels": mapping}
    extra = {
        "vocab_size": tokenizer.get_vocab_size(),
        "num_labels": len(mapping),
        "labels": mapping,
        **special_ids,
        "max_length": recipe.tokenizer.max_length,
        "lowercase": recipe.tokenizer.lowercase,
        "arch": recipe.model.arch,
        "truncation_rate": truncation_rate,
        "length_percentiles": lengths,
        "tokenizer_file": TOKENIZER_FILE,
        "labels_file": LABELS_FILE,
        "metrics": metrics,
        "log_files": [TOKENIZER_FILE, LABELS_FILE, STATS_FILE],
    }
    return store_encoded(store, key, tokenizer=tokenizer, labels=mapping, splits={n: encoded[n] for n in SPLITS},
                         rejects=rejects, stats=stats, rows=rows, extra=extra)


def load_tokenizer(ref: StageRef) -> Tokenizer:
    """The tokenizer a tokenize (or later) stage directory holds."""
    return Tokenizer.from_file(str(ref.file(TOKENIZER_FILE)))


def load_labels(ref: StageRef) -> list[str]:
    """The label list (index = label id) of a tokenize stage directory."""
    return json.loads(ref.file(LABELS_FILE).read_text())
