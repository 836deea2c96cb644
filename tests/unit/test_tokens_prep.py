"""Token validate, clean and split on hand-made sentences: BIO repair vs reject (counted either way),
unknown types, empty tokens, leakage, thresholds; per-token cleaning keeps alignment; the split is
seeded, stratified and leakage-free; rows in = rows out + rejected."""

from __future__ import annotations

import pyarrow as pa
import pytest

from tasks.core.store import DataError
from tasks.registry import recipe_from_dict
from tasks.tokens.clean import clean_table, clean_token
from tasks.tokens.config import TokenCleanConfig
from tasks.tokens.ingest import LIST, SCHEMA
from tasks.tokens.split import split_tables, strata
from tasks.tokens.validate import validate_tables


def table(rows: list[tuple[list[str], list[str]]], prefix: str = "r") -> pa.Table:
    return pa.table({"id": [f"{prefix}{i}" for i in range(len(rows))], "tokens": pa.array([r[0] for r in rows], LIST),
                     "tags": pa.array([r[1] for r in rows], LIST)}, schema=SCHEMA)


def recipe(**validate):
    return recipe_from_dict({"name": "t", "task": "token-classification", "data": {"train_path": "x"},
                             "model": {"arch": "scratch"}, "validate": {"max_reject_fraction": 1.0, **validate}})


GOOD = [(["Ann", "runs"], ["B-PER", "O"]), (["in", "Paris"], ["O", "B-LOC"]), (["Bob", "Lee"], ["B-PER", "I-PER"])]
BROKEN = [(["the", "Lee"], ["O", "I-PER"]), (["Rome", "Lee"], ["B-LOC", "I-PER"])]


def run_validate(train, test=None, **cfg):
    r = recipe(max_bio_error_fraction=1.0, **cfg)
    return validate_tables(table(train), table(test, "t") if test else None, r, {"input": len(train) + len(test or [])})


def test_bio_repair_counts_and_fixes() -> None:
    result = run_validate(GOOD + BROKEN)
    assert result.train.num_rows == 5 and result.rejects.num_rows == 0
    assert result.train.column("tags").to_pylist()[3:] == [["O", "B-PER"], ["B-LOC", "B-PER"]]
    assert result.report["splits"]["train"]["bio"] == {"bio_error_rows": 2, "bio_error_tags": 2, "bio_repaired_rows": 2}


def test_bio_reject_drops_the_sentences_with_a_reason() -> None:
    result = run_validate(GOOD + BROKEN, bio_errors="reject")
    assert result.train.num_rows == 3
    assert result.rejects.column("reason").to_pylist() == ["BIO error (token 2): I-PER after O",
                                                           "BIO error (token 2): I-PER after B-LOC"]
    assert result.report["rows"]["train"] + result.report["rows"]["rejected"] == result.report["rows"]["input"]


def test_bio_error_threshold_fails_when_rejecting_and_warns_when_repairing() -> None:
    r = recipe(max_bio_error_fraction=0.1, bio_errors="reject")
    result = validate_tables(table(GOOD + BROKEN), None, r, {"input": 5})
    assert [c.name for c in result.failed] == ["bio_error_fraction"]
    r = recipe(max_bio_error_fraction=0.1)
    result = validate_tables(table(GOOD + BROKEN), None, r, {"input": 5})
    assert result.failed == [] and any("data.tag_scheme: iob1" in w for w in result.warnings)


def test_unknown_types_empty_tokens_and_leakage() -> None:
    r = recipe_from_dict({"name": "t", "task": "token-classification", "model": {"arch": "scratch"},
                          "data": {"train_path": "x", "labels": ["B-PER", "I-PER", "LOC"]},
                          "validate": {"max_reject_fraction": 1.0, "max_leakage_fraction": 1.0, "max_empty_fraction": 1.0}})
    train = table(GOOD + [(["Acme", "Inc"], ["B-ORG", "I-ORG"]), (["a", " "], ["O", "O"])])
    test = table([(["ann", "RUNS"], ["B-PER", "O"]), (["Zed"], ["B-PER"])], "t")
    result = validate_tables(train, test, r, {"input": 7})
    reasons = result.rejects.column("reason").to_pylist()
    assert reasons == ["unknown entity type 'ORG' (allowed: LOC, PER)", "empty token (token 2)"]
    assert result.report["leakage"]["test_rows_leaked"] == 1  # "ann RUNS" is "Ann runs" normalised
    assert result.report["splits"]["train"]["labels"]["counts"] == {"LOC": 1, "PER": 2}


def test_lengths_windows_and_cut_entities() -> None:
    long = (["w"] * 10 + ["Ann", "Lee"], ["O"] * 10 + ["B-PER", "I-PER"])
    r = recipe_from_dict({"name": "t", "task": "token-classification", "model": {"arch": "scratch"},
                          "data": {"train_path": "x"}, "tokenizer": {"max_length": 8, "stride": 0},
                          "validate": {"max_truncation_rate": 1.0}})
    result = validate_tables(table([long] + GOOD), None, r, {"input": 4})
    length = result.report["splits"]["train"]["length"]
    assert length["windowed_rows"] == 1 and length["entities_beyond_max_length"] == 1
    # windows of 6 words: [0, 6) [6, 12): the entity at words 10-11 is whole in the second one
    assert length["entities_cut_by_windows"] == 0


def test_clean_normalises_each_token_and_keeps_alignment() -> None:
    cfg = TokenCleanConfig(lowercase=True)
    assert clean_token("Ｆｕｌｌ", cfg) == "full" and clean_token("\u200b", cfg) == "\u200b"
    assert clean_token("a\u00a0b", cfg) == "ab"  # NFKC makes the no-break space a space; a token stays one word
    rows = [(["Ｐａｒｉｓ", "!"], ["B-LOC", "O"]), (["paris", "!"], ["B-LOC", "O"]), (["PARIS", "!"], ["O", "O"]),
            (["x"] * 5, ["O"] * 5), (["ok"], ["O"])]
    kept, rejects, _ = clean_table(table(rows), "train", cfg.model_copy(update={"max_tokens": 4}))
    assert kept.column("tokens").to_pylist() == [["ok"]]
    assert rejects.column("reason").to_pylist() == ["conflicting tags for the same tokens as r0"] * 3 + ["too many tokens (5 > 4)"]
    assert kept.num_rows + rejects.num_rows == len(rows)
    # the test split is scored as published: no dedupe, no conflict drops
    kept_test, rejects_test, _ = clean_table(table(rows[:3], "t"), "test", cfg)
    assert kept_test.num_rows == 3 and rejects_test.num_rows == 0


def test_split_is_seeded_stratified_and_leakage_free() -> None:
    rows = [([f"p{i}", "x"], ["B-PER", "O"]) for i in range(40)] + [([f"l{i}"], ["B-LOC"]) for i in range(20)]
    rows += [(["same", "words"], ["O", "O"])] * 4 + [([f"o{i}"], ["O"]) for i in range(20)]
    train = table(rows)
    test = table([(["P3", "X"], ["B-PER", "O"])], "t")
    parts, rejects, _, _ = split_tables(train, test, 0.25, 0.1, seed=5)
    assert rejects.column("reason").to_pylist() == ["leaks into test: same normalised tokens as t0"]
    assert sum(p.num_rows for k, p in parts.items() if k != "test") + rejects.num_rows == train.num_rows
    val_strata = strata(parts["validation"].column("tags").to_pylist())
    assert 8 <= val_strata.count("PER") <= 11 and 4 <= val_strata.count("LOC") <= 6
    groups = {k: {" ".join(t) for t in p.column("tokens").to_pylist()} for k, p in parts.items() if k != "test"}
    assert not groups["train"] & groups["validation"]  # the four "same words" stay together
    again, _, _, _ = split_tables(train, test, 0.25, 0.1, seed=5)
    assert again["validation"].column("id").to_pylist() == parts["validation"].column("id").to_pylist()
    with pytest.raises(DataError, match="no sentences left"):
        split_tables(table([(["a"], ["O"])]), table([(["A"], ["O"])], "t"), 0.2, 0.1, 1)
