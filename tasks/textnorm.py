"""Text normalisation shared by validate, clean and split.

``match_key`` is the form under which two texts count as "the same" for duplicate, conflict and
leakage checks: NFKC, case-folded, punctuation dropped, whitespace collapsed. It is vectorised on
pyarrow so it costs little on 70k rows.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc


def match_key(texts: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Normalised matching key of each text (NFKC, lower-case, no punctuation, single spaces)."""
    out = pc.utf8_normalize(texts, form="NFKC")
    out = pc.utf8_lower(out)
    out = pc.replace_substring_regex(out, pattern=r"[\pP\pS]+", replacement=" ")
    out = pc.replace_substring_regex(out, pattern=r"\s+", replacement=" ")
    return pc.utf8_trim_whitespace(out)
