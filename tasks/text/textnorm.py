"""Text normalisation shared by validate, clean and split.

``match_key`` is the form under which two texts count as "the same" for duplicate, conflict and
leakage checks: NFKC, case-folded, punctuation and symbols dropped, whitespace collapsed. A text
made only of punctuation or symbols (``":)"``, ``"..."``) would normalise to ``""`` and so match
every other such text; it is keyed by its exact text instead (behind a NUL, so it never equals a
real key). Vectorised on pyarrow: ~60 ms for SST-2's 67k phrases.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def match_key(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """Normalised matching key of each text (NFKC, lower-case, no punctuation, single spaces)."""
    if isinstance(texts, pa.ChunkedArray):
        texts = texts.combine_chunks()
    out = pc.utf8_normalize(texts, form="NFKC")
    out = pc.utf8_lower(out)
    out = pc.replace_substring_regex(out, pattern=r"[\pP\pS]+", replacement=" ")
    # two cheap passes instead of one \s+ regex: same keys, half the time on SST-2
    out = pc.replace_substring_regex(out, pattern=r"[\t\n\v\f\r]", replacement=" ")
    out = pc.replace_substring_regex(out, pattern=r"  +", replacement=" ")
    out = pc.utf8_trim_whitespace(out)
    raw = pc.binary_join_element_wise("\x00", texts, "")
    return pc.if_else(pc.equal(out, ""), raw, out)
