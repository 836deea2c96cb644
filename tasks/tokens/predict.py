"""Inference-only predictor for token classification (NER): what the served model runs.

Input: a DataFrame with a ``text`` column (raw strings, split into words on whitespace or, with the
recipe's ``tokenizer.word_split: punctuation``, also at punctuation on word edges) or a ``tokens``
column (pre-split words). Each word goes through the training data's per-token cleaning and the
bundled tokenizer; sentences longer than a window are cut into windows and merged back per word, as
in training. Output columns:

* ``entities``: a list of ``{"text", "type", "start", "end", "score"}`` per row. For ``text`` input
  ``start``/``end`` are character offsets into the original string and ``text[start:end] ==
  entity["text"]``; for ``tokens`` input they index ``" ".join(tokens)``. ``score`` is the mean
  probability of the entity's tags.
* ``tags``: the IOB2 tag of every word; ``label``: those tags joined by single spaces (what the
  offline evaluation, the gate and the deploy smoke test compare); ``score``: the mean probability
  of the chosen tags.

Imports no Prefect, no MLflow and no pipeline settings.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tokenizers import Tokenizer

from models.multitask import MultiTaskModel
from tasks.tokens.clean import clean_tokens
from tasks.tokens.config import TokenCleanConfig
from tasks.tokens.loader import build_windows, word_log_probs, word_pieces
from tasks.tokens.tags import constrained_decode, entity_spans

WORD_PATTERNS = {
    "whitespace": re.compile(r"\S+"),
    # URLs, @mentions / #hashtags and words with inner ' - . stay whole; other punctuation is its own word
    "punctuation": re.compile(r"https?://\S+|[@#]?\w+(?:['’\-.]\w+)*|[^\w\s]"),
}


def split_words(text: str, mode: str = "whitespace") -> list[tuple[str, int, int]]:
    """``(word, start, end)`` of every word of ``text``, with ``text[start:end] == word``."""
    return [(m.group(0), m.start(), m.end()) for m in WORD_PATTERNS[mode].finditer(text)]


def entities_of(tags: list[str], spans: list[tuple[int, int]], source: str, word_scores: np.ndarray) -> list[dict[str, Any]]:
    """Entities of one sentence's tags with character offsets into ``source``."""
    out = []
    for kind, a, b in entity_spans(tags):
        start, end = spans[a][0], spans[b - 1][1]
        out.append({"text": source[start:end], "type": kind, "start": int(start), "end": int(end),
                    "score": float(np.mean(word_scores[a:b]))})
    return out


class TokenPredictor:
    """A trained tagger with its tokenizer, tag list and cleaning rules."""

    input_column = "text"

    def __init__(self, model: MultiTaskModel, tokenizer: Tokenizer, labels: list[str], serving: dict[str, Any]):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.labels = labels
        self.serving = serving
        self.clean = TokenCleanConfig(**serving["clean"])
        self.head: str = serving["head"]
        self.special = serving["special_ids"]

    @classmethod
    def from_bundle(cls, bundle: Path) -> TokenPredictor:
        """Load from a bundle folder: ``model.pt``, ``tokenizer.json``, ``labels.json``, ``serving.json``."""
        ckpt = torch.load(bundle / "model.pt", map_location="cpu", weights_only=False)
        return cls(MultiTaskModel.from_checkpoint(ckpt), Tokenizer.from_file(str(bundle / "tokenizer.json")),
                   json.loads((bundle / "labels.json").read_text()), json.loads((bundle / "serving.json").read_text()))

    def tag(self, sentences: list[list[str]]) -> tuple[list[list[str]], list[np.ndarray]]:
        """IOB2 tags and the chosen tags' probabilities for sentences of raw words."""
        cleaned = [clean_tokens(words, self.clean) for words in sentences]
        pieces = word_pieces(self.tokenizer, cleaned, int(self.special["unk_id"]))
        windows = build_windows(pieces, None, [len(s) for s in cleaned], int(self.serving["max_length"]),
                                int(self.serving["stride"]), int(self.special["cls_id"]), int(self.special["sep_id"]))
        with torch.inference_mode():
            log_probs = word_log_probs(self.model, windows, self.model.pad_id, self.head, torch.device("cpu"))
        tags, scores = [], []
        for lp in log_probs:
            path = constrained_decode(lp, self.labels) if self.serving.get("constrained_decoding", True) else list(lp.argmax(1))
            tags.append([self.labels[i] for i in path])
            scores.append(np.exp(lp[np.arange(len(path)), path]) if len(path) else np.zeros(0))
        return tags, scores

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        """``entities``, ``tags``, ``label`` and ``score`` for the ``text`` (or ``tokens``) column of ``frame``."""
        if "text" in frame.columns:
            sources = frame["text"].tolist()
            bad = next((i for i, t in enumerate(sources) if not isinstance(t, str)), None)
            if bad is not None:
                raise ValueError(f"row {bad}: 'text' must be a string, got {type(sources[bad]).__name__}")
            split = [split_words(t, self.serving.get("word_split", "whitespace")) for t in sources]
        elif "tokens" in frame.columns:
            split = []
            for i, tokens in enumerate(frame["tokens"].tolist()):
                tokens = list(tokens) if tokens is not None and not isinstance(tokens, str) else None
                if tokens is None or not all(isinstance(t, str) and t and not any(c.isspace() for c in t) for t in tokens):
                    raise ValueError(f"row {i}: 'tokens' must be a list of non-empty strings without whitespace")
                starts = np.cumsum([0] + [len(t) + 1 for t in tokens[:-1]]) if tokens else []
                split.append([(t, int(s), int(s) + len(t)) for t, s in zip(tokens, starts)])
            sources = [" ".join(w for w, _, _ in words) for words in split]
        else:
            raise ValueError(f"input needs a 'text' (or 'tokens') column; got {list(frame.columns)}")
        if not split:
            return pd.DataFrame({"entities": [], "tags": [], "label": [], "score": []})
        tags, scores = self.tag([[w for w, _, _ in words] for words in split])
        entities = [entities_of(t, [(s, e) for _, s, e in words], source, sc)
                    for t, words, source, sc in zip(tags, split, sources, scores)]
        return pd.DataFrame({"entities": entities, "tags": tags, "label": [" ".join(t) for t in tags],
                             "score": [float(np.mean(s)) if len(s) else 1.0 for s in scores]})
