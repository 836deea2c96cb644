"""Sub-word alignment, windows and batches for token classification; inference-safe (torch, numpy,
``tokenizers`` only), so training, evaluation and the served predictor cut sentences the same way.

A sentence is a list of words. :func:`word_pieces` tokenizes the words (pre-split, ``word_ids``) into
sub-token ids and the word of each piece. :func:`align_labels` gives the first piece of a word its
tag and every other piece -100 (ignored by the loss), or, with ``label_all_tokens``, the tag with
``B-`` turned into ``I-``. A sentence longer than ``max_length - 2`` pieces is cut into windows at
word boundaries (:func:`plan_windows`), each window repeating up to ``stride`` pieces of context from
the one before; a word's prediction is read from the window where it sits farthest from an edge
(:func:`merge_windows`). Nothing is silently truncated; only a single word longer than a whole
window keeps just its first pieces (its first piece carries its label).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tokenizers import Tokenizer

from tasks.core.batching import Loader

IGNORE = -100


def word_pieces(tokenizer: Tokenizer, sentences: Sequence[Sequence[str]], unk_id: int) -> list[tuple[list[int], list[int]]]:
    """``(piece ids, word index of each piece)`` per sentence, without special tokens.

    ``tokenizer`` must not truncate. A word that yields no piece (a lone control character) gets one
    ``unk_id`` piece, so every word has a first piece to carry its tag.
    """
    # not encode_batch_fast: it skips the offsets, and word_ids come back None without them
    encodings = tokenizer.encode_batch([list(s) for s in sentences], is_pretokenized=True, add_special_tokens=False) if sentences else []
    out = []
    for words, enc in zip(sentences, encodings):
        ids, owners = enc.ids, enc.word_ids
        pieces: list[int] = []
        piece_words: list[int] = []
        j = 0
        for w in range(len(words)):
            start = len(pieces)
            while j < len(ids) and owners[j] == w:
                pieces.append(ids[j])
                piece_words.append(w)
                j += 1
            if len(pieces) == start:
                pieces.append(unk_id)
                piece_words.append(w)
        out.append((pieces, piece_words))
    return out


def align_labels(piece_words: Sequence[int], tag_ids: Sequence[int], label_all_tokens: bool = False,
                 continuation: Sequence[int] | None = None) -> list[int]:
    """The training label of each piece: the word's tag on its first piece; -100 on the others, or with
    ``label_all_tokens`` the tag again with ``continuation[tag]`` (B-X -> I-X) applied."""
    out = []
    previous = -1
    for w in piece_words:
        if w != previous:
            out.append(int(tag_ids[w]))
        elif label_all_tokens:
            tag = int(tag_ids[w])
            out.append(int(continuation[tag]) if continuation is not None else tag)
        else:
            out.append(IGNORE)
        previous = w
    return out


def continuation_map(labels: Sequence[str]) -> list[int]:
    """For each tag id, the id a continuation piece gets with ``label_all_tokens``: B-X -> I-X, others unchanged."""
    index = {t: i for i, t in enumerate(labels)}
    return [index.get("I-" + t[2:], i) if t.startswith("B-") else i for i, t in enumerate(labels)]


def plan_windows(word_lengths: Sequence[int], budget: int, stride: int) -> list[tuple[int, int]]:
    """Word ranges ``[start, end)`` covering the sentence, each at most ``budget`` pieces (a word counts
    at most ``budget``); every next window starts early enough to repeat up to ``stride`` pieces of the
    previous one, and always at least one word later. One window when the sentence fits."""
    n = len(word_lengths)
    if n == 0:
        return [(0, 0)]
    lengths = [min(int(x), budget) for x in word_lengths]
    windows: list[tuple[int, int]] = []
    start = 0
    while True:
        end, used = start, 0
        while end < n and (used + lengths[end] <= budget or end == start):
            used += lengths[end]
            end += 1
        windows.append((start, end))
        if end >= n:
            return windows
        nxt, overlap = end, 0
        while nxt - 1 > start and overlap + lengths[nxt - 1] <= stride:
            nxt -= 1
            overlap += lengths[nxt]
        start = nxt


@dataclass(frozen=True)
class Windows:
    """Every window of a set of sentences as model inputs: piece ids with [CLS]/[SEP], piece labels
    (-100 on specials and ignored pieces), and where each word's first piece sits."""

    sentence: np.ndarray  # (W,) sentence of each window
    word_start: np.ndarray  # (W,) first word of each window
    ids: list[np.ndarray]  # per window (T_w,) int64
    labels: list[np.ndarray]  # per window (T_w,) int64
    first_piece: list[np.ndarray]  # per window (words in it,) position of each word's first piece
    n_words: np.ndarray  # (S,) words per sentence

    def __len__(self) -> int:
        return len(self.ids)


def build_windows(pieces: Sequence[tuple[Sequence[int], Sequence[int]]], piece_labels: Sequence[Sequence[int]] | None,
                  n_words: Sequence[int], max_length: int, stride: int, cls_id: int, sep_id: int) -> Windows:
    """Cut every sentence (its pieces and, for training, their labels) into windows of ``max_length``."""
    budget = max_length - 2
    sentence, word_start, ids, labels, first = [], [], [], [], []
    for s, (piece_ids, piece_words) in enumerate(pieces):
        piece_ids, piece_words = np.asarray(piece_ids, np.int64), np.asarray(piece_words, np.int64)
        lab = np.asarray(piece_labels[s], np.int64) if piece_labels is not None else np.full(len(piece_ids), IGNORE)
        count = int(n_words[s])
        starts = np.searchsorted(piece_words, np.arange(count + 1))  # first piece of each word, and the end
        lengths = np.diff(starts)
        # a word longer than a window keeps its first ``budget`` pieces
        rank = np.arange(len(piece_words)) - starts[piece_words] if len(piece_words) else np.zeros(0, np.int64)
        keep_piece = rank < budget
        for a, b in plan_windows(lengths.tolist(), budget, stride):
            sel = np.arange(starts[a], starts[b])
            sel = sel[keep_piece[sel]]
            ids.append(np.concatenate([[cls_id], piece_ids[sel], [sep_id]]))
            labels.append(np.concatenate([[IGNORE], lab[sel], [IGNORE]]))
            firsts = np.flatnonzero(np.r_[True, piece_words[sel][1:] != piece_words[sel][:-1]]) + 1 if len(sel) else np.zeros(0, np.int64)
            first.append(firsts.astype(np.int64))
            sentence.append(s)
            word_start.append(a)
    return Windows(np.asarray(sentence, np.int64), np.asarray(word_start, np.int64), ids, labels, first,
                   np.asarray(n_words, np.int64))


def merge_windows(windows: Windows, word_scores: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Per sentence, one row of ``word_scores`` per word (n_words, K): each word from the window where
    it sits farthest from an edge (ties: the earlier window). ``word_scores[w]`` is window w's rows."""
    k = word_scores[0].shape[1] if len(word_scores) else 0
    out = [np.zeros((int(n), k), np.float32) for n in windows.n_words]
    best = [np.full(int(n), -1, np.int64) for n in windows.n_words]
    for w, scores in enumerate(word_scores):
        s, a = int(windows.sentence[w]), int(windows.word_start[w])
        m = len(scores)
        positions = np.arange(m)
        centrality = np.minimum(positions, m - 1 - positions)
        better = centrality > best[s][a:a + m]
        out[s][a:a + m][better] = scores[better]
        best[s][a:a + m][better] = centrality[better]
    return out


def collate(windows: Windows, index: np.ndarray, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad windows ``index`` to their longest: ids (B, T), mask (B, T), labels (B, T) with -100 padding."""
    width = max(len(windows.ids[i]) for i in index)
    ids = np.full((len(index), width), pad_id, np.int64)
    labels = np.full((len(index), width), IGNORE, np.int64)
    mask = np.zeros((len(index), width), np.int64)
    for row, i in enumerate(index):
        n = len(windows.ids[i])
        ids[row, :n], labels[row, :n], mask[row, :n] = windows.ids[i], windows.labels[i], 1
    return torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels)


def bucketed(lengths: np.ndarray, batch_size: int, rng: np.random.Generator | None) -> list[np.ndarray]:
    """Index batches of similar lengths (shuffled pools of 50 batches when ``rng`` is given)."""
    order = rng.permutation(len(lengths)) if rng is not None else np.arange(len(lengths))
    pool = batch_size * 50
    batches: list[np.ndarray] = []
    for start in range(0, len(order), pool):
        chunk = order[start:start + pool]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches.extend(chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size))
    if rng is not None:
        rng.shuffle(batches)
    return batches


def window_loader(windows: Windows, batch_size: int, pad_id: int, head: str) -> Loader:
    """Length-bucketed, padded window batches: inputs (ids, mask), targets {head: (B, T) labels}."""
    lengths = np.asarray([len(x) for x in windows.ids], np.int64)
    return Loader(size=len(windows), batches=lambda rng: bucketed(lengths, batch_size, rng),
                  inputs=lambda index: collate(windows, index, pad_id)[:2],
                  targets=lambda index: {head: collate(windows, index, pad_id)[2]})


@torch.no_grad()
def word_log_probs(model: torch.nn.Module, windows: Windows, pad_id: int, head: str, device: torch.device,
                   batch_size: int = 64) -> list[np.ndarray]:
    """Per sentence, log-probabilities of every tag for every word (n_words, K), windows merged."""
    model.eval()
    per_window: list[np.ndarray | None] = [None] * len(windows)
    lengths = np.asarray([len(x) for x in windows.ids], np.int64)
    for index in bucketed(lengths, batch_size, None):
        ids, mask, _ = collate(windows, index, pad_id)
        outputs, _ = model(ids.to(device), mask.to(device))
        logits = outputs[head] if isinstance(outputs, dict) else outputs
        logp = torch.log_softmax(logits.float(), -1).cpu().numpy()
        for row, i in enumerate(index):
            per_window[i] = logp[row, windows.first_piece[i]]
    return merge_windows(windows, [x for x in per_window if x is not None])
