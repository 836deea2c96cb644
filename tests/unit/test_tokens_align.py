"""Sub-word alignment and windows on hand-made sentences: first-piece labels, label_all_tokens,
windows at word boundaries with overlap, and window predictions merged back per word."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers

from tasks.tokens.loader import (
    IGNORE,
    align_labels,
    build_windows,
    continuation_map,
    merge_windows,
    plan_windows,
    word_pieces,
)
from tasks.tokens.tags import tag_list

LABELS = tag_list(["LOC", "PER"])  # O, B-LOC, I-LOC, B-PER, I-PER
CLS, SEP, UNK = 2, 3, 1


def piece_tokenizer() -> Tokenizer:
    """A WordPiece tokenizer whose splits are known: 'washington' -> wash ##ing ##ton."""
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "wash": 4, "##ing": 5, "##ton": 6, "in": 7, "lives": 8,
             "ann": 9, "##a": 10, "!": 11, "paris": 12}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return tok


def test_word_pieces_map_every_piece_to_its_word() -> None:
    words = ["anna", "lives", "in", "washington", "!!", "\u200b"]
    [(ids, owners)] = word_pieces(piece_tokenizer(), [[w.lower() for w in words]], UNK)
    assert ids == [9, 10, 8, 7, 4, 5, 6, 11, 11, UNK]
    assert owners == [0, 0, 1, 2, 3, 3, 3, 4, 4, 5]  # "!!" is two pieces of one word; the empty word gets [UNK]


def test_first_piece_carries_the_label_and_the_rest_are_ignored() -> None:
    owners = [0, 0, 1, 2, 3, 3, 3]
    tags = [LABELS.index(t) for t in ["B-PER", "O", "O", "B-LOC"]]
    assert align_labels(owners, tags) == [3, IGNORE, 0, 0, 1, IGNORE, IGNORE]


def test_label_all_tokens_turns_b_into_i_on_continuation_pieces() -> None:
    owners = [0, 0, 1, 2, 2]
    tags = [LABELS.index(t) for t in ["B-PER", "I-PER", "B-LOC"]]
    cont = continuation_map(LABELS)
    assert [LABELS[i] for i in align_labels(owners, tags, True, cont)] == ["B-PER", "I-PER", "I-PER", "B-LOC", "I-LOC"]
    assert align_labels([], [], True, cont) == []


@pytest.mark.parametrize(("lengths", "budget", "stride", "expected"), [
    ([1, 1, 1], 6, 2, [(0, 3)]),                                   # fits: one window
    ([2, 2, 2, 2, 2], 6, 2, [(0, 3), (2, 5)]),                     # overlap of one word (2 pieces)
    ([2, 2, 2, 2, 2], 6, 0, [(0, 3), (3, 5)]),                     # no overlap asked
    ([1, 9, 1], 6, 4, [(0, 1), (1, 2), (2, 3)]),                   # a word longer than a window stands alone
    ([], 6, 2, [(0, 0)]),
])
def test_plan_windows(lengths, budget, stride, expected) -> None:
    windows = plan_windows(lengths, budget, stride)
    assert windows == expected
    covered = set().union(*(range(a, b) for a, b in windows))
    assert covered == set(range(len(lengths)))
    for a, b in windows:  # every window fits its budget (a lone long word counts as the budget)
        assert sum(min(x, budget) for x in lengths[a:b]) <= budget or b - a == 1


def test_windows_split_long_sentences_at_word_boundaries_with_labels() -> None:
    owners = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]  # five words of two pieces
    piece_ids = list(range(10, 20))
    tags = [LABELS.index(t) for t in ["B-PER", "I-PER", "O", "B-LOC", "O"]]
    labels = align_labels(owners, tags)
    w = build_windows([(piece_ids, owners)], [labels], [5], max_length=8, stride=2, cls_id=CLS, sep_id=SEP)
    assert len(w) == 2 and list(w.word_start) == [0, 2]
    assert w.ids[0].tolist() == [CLS, 10, 11, 12, 13, 14, 15, SEP]
    assert w.ids[1].tolist() == [CLS, 14, 15, 16, 17, 18, 19, SEP]
    assert w.labels[0].tolist() == [IGNORE, 3, IGNORE, 4, IGNORE, 0, IGNORE, IGNORE]
    assert w.labels[1].tolist() == [IGNORE, 0, IGNORE, 1, IGNORE, 0, IGNORE, IGNORE]
    assert w.first_piece[1].tolist() == [1, 3, 5]
    assert all(len(x) <= 8 for x in w.ids)


def test_a_word_longer_than_a_window_keeps_its_first_pieces() -> None:
    owners = [0] + [1] * 12 + [2]
    w = build_windows([(list(range(14)), owners)], None, [3], max_length=6, stride=0, cls_id=CLS, sep_id=SEP)
    assert [len(x) for x in w.ids] == [3, 6, 3]
    assert w.ids[1].tolist() == [CLS, 1, 2, 3, 4, SEP] and w.first_piece[1].tolist() == [1]


def test_merge_takes_each_word_from_the_window_where_it_is_most_central() -> None:
    owners = [i for i in range(6) for _ in range(2)]
    w = build_windows([(list(range(12)), owners)], None, [6], max_length=8, stride=4, cls_id=CLS, sep_id=SEP)
    assert [(int(a), int(a) + len(f)) for a, f in zip(w.word_start, w.first_piece)] == [(0, 3), (1, 4), (2, 5), (3, 6)]
    # window k says "k" for every word it holds
    scores = [np.full((len(f), 1), float(k)) for k, f in enumerate(w.first_piece)]
    merged = merge_windows(w, scores)[0][:, 0].tolist()
    # word 0 only in window 0; word 1 central in window 0 (position 1 of 3); ... word 5 only in window 3
    assert merged == [0.0, 0.0, 1.0, 2.0, 3.0, 3.0]


def test_merge_of_several_sentences_keeps_them_apart() -> None:
    pieces = [([5, 6], [0, 1]), ([7], [0]), ([], [])]
    w = build_windows(pieces, None, [2, 1, 0], max_length=8, stride=2, cls_id=CLS, sep_id=SEP)
    merged = merge_windows(w, [np.ones((2, 3)), np.zeros((1, 3)), np.zeros((0, 3))])
    assert [m.shape for m in merged] == [(2, 3), (1, 3), (0, 3)] and merged[0].sum() == 6
