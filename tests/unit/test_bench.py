"""Benchmarks: bench/prep.py end to end on a 2,000-row slice (the JSON shape), and its baseline's
pure-Python cleaning against tasks.text.clean.clean_texts on hand-made hard cases."""

from __future__ import annotations

import importlib
import json
from pathlib import Path
from types import ModuleType

import pyarrow as pa
import pytest

from tasks.text import clean
from tasks.text.config import CleanConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``bench.prep``: bench/ is a folder of scripts beside the installed packages, imported from the root."""
    monkeypatch.syspath_prepend(str(ROOT))
    return importlib.import_module("bench.prep")


HARD_TEXTS = [
    "plain text",
    "  leading and trailing spaces  ",
    "runs   of    spaces",
    "tab\there, newline\nthere, crlf\r\nend",
    "nbsp\u00a0and\u2003em space and\u3000ideographic",
    "zero\u200bwidth, soft\u00adhyphen, bom\ufeff, word\u2060joiner",
    "controls\x00\x07\x1b\x7f\x9f here, nel\x85there",
    "ligature \ufb01ne, full-width \uff21\uff22, decomposed e\u0301",
    "caf\u00e9 na\u00efve",
    "<b>bold</b> and <i>italic</i>",
    "<script>var x = 1;</script>after <style>p {}</style>style",
    "<!-- a comment --> visible",
    "a < b and c > d, <3 and <!doctype html>",
    "&amp; &lt;b&gt; &#39;quoted&#39; &nbsp;space &eacute;",
    "&lt;script&gt;stays text&lt;/script&gt;",
    "<p>para</p><p>graph</p>",
    "",
    "   ",
]


@pytest.mark.parametrize("cfg", [CleanConfig(), CleanConfig(strip_html=False), CleanConfig(lowercase=True)])
def test_baseline_cleaning_matches_clean_texts(bench: ModuleType, cfg: CleanConfig) -> None:
    ours = clean.clean_texts(pa.array(HARD_TEXTS, pa.string()), cfg).to_pylist()
    assert [bench.clean_text_py(t, cfg) for t in HARD_TEXTS] == ours


@pytest.mark.slow
def test_prep_benchmark_json_shape(bench: ModuleType, tmp_path: Path) -> None:
    result = bench.run_benchmark(rows=2000, repeat=1)
    path = bench.common.write_result(tmp_path / "out" / "prep.json", result)
    data = json.loads(path.read_text())

    assert {"name", "ours", "baseline", "ratio", "unit", "machine"} <= data.keys()
    assert data["name"] == "prep" and data["unit"] == "s" and data["ratio_definition"]
    for key in ("speedup_vs_hf_datasets", "tokenize_vs_raw", "prep_vs_raw"):
        assert isinstance(data[key], float) and data[key] > 0
        assert isinstance(data["passed"][key], bool) and data["targets"][key]
    assert data["ratio"] == data["speedup_vs_hf_datasets"]
    for side in ("ours", "baseline"):
        seconds = data[side]["seconds"]
        assert seconds["median"] > 0 and len(seconds["samples"]) == 1
    assert set(data["measurements"]) >= {"ours_clean_tokenize", "hf_datasets_map", "ours_tokenize",
                                         "raw_encode_batch", "whole_prep"}
    assert set(data["whole_prep_stages_median_s"]) == {"ingest", "validate", "clean", "split", "encode", "augment"}
    assert data["data"]["rows"] == 2000 and data["data"]["outputs_identical"] is True
    assert data["whole_prep_rows"]["ingest"]["train"] == 2000
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and machine["python"] and machine["versions"]["datasets"]
    assert "(a) clean+tokenize" in bench.report(result)
