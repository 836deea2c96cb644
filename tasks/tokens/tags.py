"""Tag schemes and entity spans, pure and inference-safe (the served predictor uses them too).

Canonical tags are IOB2: ``O``, ``B-<type>`` opening an entity, ``I-<type>`` continuing it. IOB1
(``I-`` opens an entity unless it follows the same type; ``B-`` only between two adjacent entities
of one type) and BIOES (``S-`` single, ``E-`` end) are converted on ingest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np

OUTSIDE = "O"
_TAG = re.compile(r"^([BIESL])-(\S+)$")
SCHEME_PREFIXES = {"iob1": "BI", "iob2": "BI", "bioes": "BIESL"}  # L (last) is BILOU's E, U its S


def split_tag(tag: str) -> tuple[str, str | None]:
    """``"B-person"`` -> ``("B", "person")``, ``"O"`` -> ``("O", None)``; ValueError for anything else."""
    if tag == OUTSIDE:
        return OUTSIDE, None
    match = _TAG.match(tag)
    if match is None:
        raise ValueError(f"tag {tag!r} matches no scheme (O, B-X, I-X, E-X, S-X)")
    return match.group(1), match.group(2)


def bad_tag(tag: str, scheme: str) -> str | None:
    """Why ``tag`` is not a tag of ``scheme`` (None when it is)."""
    try:
        prefix, _ = split_tag(tag)
    except ValueError as exc:
        return str(exc)
    allowed = SCHEME_PREFIXES[scheme]
    if prefix != OUTSIDE and prefix not in allowed:
        return f"tag {tag!r} is not {scheme} (prefixes {', '.join(allowed)} and O)"
    return None


def to_iob2(tags: Sequence[str], scheme: str) -> list[str]:
    """Convert one sentence's tags from ``scheme`` (iob1, iob2, bioes) to IOB2 (tags already checked).

    IOB1: an ``I-X`` that does not continue an ``X`` entity opens one (``B-X``). BIOES: ``S-X`` is
    ``B-X``, ``E-X`` is ``I-X``. IOB2 passes through as is (its grammar is validate's business).
    """
    out: list[str] = []
    previous_type: str | None = None
    for tag in tags:
        prefix, kind = split_tag(tag)
        if prefix == OUTSIDE:
            out.append(OUTSIDE)
        elif scheme == "iob1":
            out.append(f"B-{kind}" if prefix == "B" or previous_type != kind else f"I-{kind}")
        elif scheme == "bioes":
            out.append(f"B-{kind}" if prefix in ("B", "S", "U") else f"I-{kind}")
        else:
            out.append(tag)
        previous_type = kind
    return out


def bio_errors(tags: Sequence[str]) -> list[int]:
    """Positions of ``I-X`` tags that follow ``O``, the start, or a tag of another type (IOB2)."""
    bad = []
    previous: str | None = None
    for i, tag in enumerate(tags):
        prefix, kind = split_tag(tag)
        if prefix == "I" and previous != kind:
            bad.append(i)
        previous = kind
    return bad


def repair_bio(tags: Sequence[str]) -> list[str]:
    """IOB2 with every stray ``I-X`` (after O, the start or another type) turned into ``B-X``."""
    out = list(tags)
    for i in bio_errors(tags):
        out[i] = "B-" + tags[i][2:]
    return out


def entity_spans(tags: Sequence[str]) -> list[tuple[str, int, int]]:
    """Entities of IOB2 tags as ``(type, first word, one past the last word)``; a stray I- opens one."""
    spans: list[tuple[str, int, int]] = []
    start, kind = -1, None
    for i, tag in enumerate([*tags, OUTSIDE]):
        prefix, this = split_tag(tag)
        if kind is not None and not (prefix == "I" and this == kind):
            spans.append((kind, start, i))
            kind = None
        if prefix in ("B", "I") and kind is None:
            start, kind = i, this
    return spans


def entity_types(tags: Sequence[str]) -> list[str]:
    """The distinct entity types of a tag list, sorted."""
    return sorted({tag[2:] for tag in tags if tag != OUTSIDE})


def tag_list(types: Sequence[str]) -> list[str]:
    """The IOB2 tag set of entity types: ``O`` then ``B-X``, ``I-X`` per type (sorted types)."""
    return [OUTSIDE, *(f"{p}-{t}" for t in sorted(types) for p in "BI")]


def allowed_transitions(labels: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """IOB2 grammar as masks: ``start[j]`` (tag j may open a sentence), ``trans[i, j]`` (j may follow i)."""
    parsed = [split_tag(t) for t in labels]
    start = np.array([p != "I" for p, _ in parsed])
    trans = np.ones((len(labels), len(labels)), dtype=bool)
    for j, (pj, kj) in enumerate(parsed):
        if pj == "I":
            trans[:, j] = [ki == kj and pi in ("B", "I") for pi, ki in parsed]
    return start, trans


def constrained_decode(log_probs: np.ndarray, labels: Sequence[str]) -> list[int]:
    """The most probable tag path (Viterbi over per-word log probabilities, (n, K)) that is valid IOB2."""
    n = len(log_probs)
    if n == 0:
        return []
    start, trans = allowed_transitions(labels)
    penalty = np.where(trans, 0.0, -np.inf)  # (K, K)
    score = np.where(start, log_probs[0], -np.inf)
    back = np.zeros((n, len(labels)), dtype=np.int64)
    for i in range(1, n):
        total = score[:, None] + penalty  # (K from, K to)
        back[i] = total.argmax(0)
        score = total.max(0) + log_probs[i]
    path = [int(score.argmax())]
    for i in range(n - 1, 0, -1):
        path.append(int(back[i, path[-1]]))
    return path[::-1]
