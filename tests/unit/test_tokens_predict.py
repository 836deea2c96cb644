"""The token predictor from a bundle folder: entity offsets round-trip on odd input (runs of spaces,
tabs, punctuation, unicode), long texts windowed and merged, pre-split tokens, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from models.encoders import EncoderConfig
from models.multitask import build_text_model
from tasks.text.config import TokenizerConfig
from tasks.text.encode import train_tokenizer
from tasks.tokens.config import TokenCleanConfig
from tasks.tokens.predict import TokenPredictor, split_words
from tasks.tokens.tags import tag_list

LABELS = tag_list(["LOC", "PER"])
ODD = ["  Ann   Lee\tflew to  Zürich!!  ", "Ｆｕｌｌ width ＮＡＭＥ and café-au-lait, 東京 🙂 ok",
       "@user #tag http://x.y/z?q=1 (Paris).", "", "   ", "one"]


def bundle(tmp_path: Path, favourite: str, word_split: str = "whitespace", max_length: int = 16) -> Path:
    """A tiny untrained tagger whose head always prefers ``favourite``: every word becomes an entity."""
    tokenizer = train_tokenizer(["ann lee flew to zurich paris tokyo cafe au lait full width name and ok"] * 3,
                                TokenizerConfig(vocab_size=200, min_frequency=1, max_length=max_length))
    tokenizer.no_truncation()
    torch.manual_seed(0)
    model = build_text_model(EncoderConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32), {"tags": ("token", len(LABELS))},
                             vocab_size=tokenizer.get_vocab_size(), max_length=max_length, pad_id=0)
    with torch.no_grad():
        model.heads["tags"].proj.bias[LABELS.index(favourite)] = 50.0
    folder = tmp_path / f"bundle-{favourite}-{word_split}"
    folder.mkdir()
    torch.save(model.checkpoint(labels=LABELS), folder / "model.pt")
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "labels.json").write_text(json.dumps(LABELS))
    special = {"pad_id": 0, "unk_id": 1, "cls_id": 2, "sep_id": 3}
    (folder / "serving.json").write_text(json.dumps({
        "clean": TokenCleanConfig().model_dump(mode="json"), "head": "tags", "max_length": max_length, "stride": 4,
        "word_split": word_split, "constrained_decoding": True, "special_ids": special, "encoder": {"arch": "scratch"}}))
    return folder


@pytest.mark.parametrize("word_split", ["whitespace", "punctuation"])
def test_offsets_round_trip_on_odd_input(tmp_path: Path, word_split: str) -> None:
    predictor = TokenPredictor.from_bundle(bundle(tmp_path, "B-PER", word_split))
    out = predictor.predict(pd.DataFrame({"text": ODD}))
    assert list(out.columns) == ["entities", "tags", "label", "score"] and len(out) == len(ODD)
    for text, entities, tags in zip(ODD, out["entities"], out["tags"]):
        words = split_words(text, word_split)
        assert len(tags) == len(words) and len(entities) == len(words)  # B-PER everywhere: one entity per word
        for entity, (word, start, end) in zip(entities, words):
            assert text[entity["start"]:entity["end"]] == entity["text"] == word
            assert (entity["start"], entity["end"]) == (start, end) and entity["type"] == "PER"
            assert 0.0 < entity["score"] <= 1.0
    assert out["entities"][3] == [] and out["label"][3] == ""


def test_multi_word_entities_span_the_original_gap(tmp_path: Path) -> None:
    predictor = TokenPredictor.from_bundle(bundle(tmp_path, "I-LOC"))  # B-LOC, then I-LOC: one entity per text
    text = "  New \t York   City "
    [entities] = predictor.predict(pd.DataFrame({"text": [text]}))["entities"]
    assert entities == [{"text": "New \t York   City", "type": "LOC", "start": 2, "end": 19, "score": entities[0]["score"]}]
    assert text[2:19] == entities[0]["text"]


def test_long_text_is_windowed_and_merged_per_word(tmp_path: Path) -> None:
    predictor = TokenPredictor.from_bundle(bundle(tmp_path, "I-PER", max_length=8))
    text = " ".join(["anna", "lee", "zurich", "paris"] * 30)  # far more pieces than one window
    out = predictor.predict(pd.DataFrame({"text": [text]}))
    tags = out["tags"][0]
    assert len(tags) == 120 and tags[0] == "B-PER" and set(tags[1:]) == {"I-PER"}
    [entity] = out["entities"][0]
    assert entity["text"] == text and (entity["start"], entity["end"]) == (0, len(text))


def test_pre_split_tokens_and_bad_input(tmp_path: Path) -> None:
    predictor = TokenPredictor.from_bundle(bundle(tmp_path, "B-LOC"))
    out = predictor.predict(pd.DataFrame({"tokens": [["Zürich", "!"], []]}))
    assert out["label"].tolist() == ["B-LOC B-LOC", ""]
    assert [(e["text"], e["start"], e["end"]) for e in out["entities"][0]] == [("Zürich", 0, 6), ("!", 7, 8)]
    with pytest.raises(ValueError, match="row 1: 'text' must be a string"):
        predictor.predict(pd.DataFrame({"text": ["ok", None]}))
    with pytest.raises(ValueError, match="'tokens' must be a list"):
        predictor.predict(pd.DataFrame({"tokens": [["a b"]]}))
    with pytest.raises(ValueError, match="needs a 'text'"):
        predictor.predict(pd.DataFrame({"sentence": ["x"]}))
    assert predictor.predict(pd.DataFrame({"text": []})).empty
