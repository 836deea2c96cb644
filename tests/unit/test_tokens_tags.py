"""Tag schemes on hand-made sentences: IOB1/BIOES -> IOB2, BIO repair, entity spans, constrained decoding."""

from __future__ import annotations

import numpy as np
import pytest

from tasks.tokens.tags import (
    bad_tag,
    bio_errors,
    constrained_decode,
    entity_spans,
    repair_bio,
    tag_list,
    to_iob2,
)


def test_iob1_to_iob2_opens_entities_and_keeps_adjacent_same_type_apart() -> None:
    # CoNLL-2003 style: I- opens an entity; B- only separates two adjacent entities of one type
    tags = ["I-PER", "I-PER", "O", "I-LOC", "B-LOC", "I-LOC", "I-ORG", "O", "I-MISC"]
    assert to_iob2(tags, "iob1") == ["B-PER", "I-PER", "O", "B-LOC", "B-LOC", "I-LOC", "B-ORG", "O", "B-MISC"]
    assert entity_spans(to_iob2(tags, "iob1")) == [("PER", 0, 2), ("LOC", 3, 4), ("LOC", 4, 6), ("ORG", 6, 7),
                                                   ("MISC", 8, 9)]


def test_iob1_type_change_without_b_starts_a_new_entity() -> None:
    assert to_iob2(["I-PER", "I-LOC", "I-LOC"], "iob1") == ["B-PER", "B-LOC", "I-LOC"]
    assert to_iob2(["O", "O"], "iob1") == ["O", "O"] and to_iob2([], "iob1") == []


def test_bioes_to_iob2() -> None:
    tags = ["S-PER", "O", "B-LOC", "I-LOC", "E-LOC", "S-LOC", "B-ORG", "E-ORG"]
    assert to_iob2(tags, "bioes") == ["B-PER", "O", "B-LOC", "I-LOC", "I-LOC", "B-LOC", "B-ORG", "I-ORG"]


def test_bad_tags_are_named() -> None:
    assert bad_tag("B-person", "iob2") is None and bad_tag("O", "iob1") is None
    assert "matches no scheme" in bad_tag("PER", "iob2")
    assert "not iob2" in bad_tag("S-PER", "iob2")  # a BIOES tag in an IOB2 file
    assert bad_tag("S-PER", "bioes") is None and "matches no scheme" in bad_tag("B_PER", "bioes")


@pytest.mark.parametrize(("tags", "errors", "repaired"), [
    (["I-PER"], [0], ["B-PER"]),                                   # at the start
    (["O", "I-PER", "I-PER"], [1], ["O", "B-PER", "I-PER"]),       # after O: the run becomes one entity
    (["B-PER", "I-LOC"], [1], ["B-PER", "B-LOC"]),                 # after another type
    (["B-PER", "I-PER", "O", "B-LOC"], [], ["B-PER", "I-PER", "O", "B-LOC"]),  # valid: untouched
])
def test_bio_repair(tags, errors, repaired) -> None:
    assert bio_errors(tags) == errors
    assert repair_bio(tags) == repaired
    assert bio_errors(repaired) == []
    assert len(repaired) == len(tags)


def test_constrained_decode_never_emits_invalid_iob2() -> None:
    labels = tag_list(["LOC", "PER"])  # O, B-LOC, I-LOC, B-PER, I-PER
    rng = np.random.default_rng(0)
    for _ in range(50):
        log_probs = np.log(rng.dirichlet(np.ones(len(labels)), size=int(rng.integers(1, 8))))
        path = [labels[i] for i in constrained_decode(log_probs, labels)]
        assert bio_errors(path) == []
    # argmax would say O I-PER; the best valid path opens the entity instead
    lp = np.log(np.array([[0.9, 0.02, 0.02, 0.02, 0.04], [0.1, 0.05, 0.05, 0.3, 0.5]]))
    assert [labels[i] for i in constrained_decode(lp, labels)] == ["O", "B-PER"]
