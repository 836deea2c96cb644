"""Tokenize stage: WordPiece trained on train only, [CLS]/[SEP], truncation, label ids, fast encode."""

from __future__ import annotations

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from tokenizers import Tokenizer

from tasks.core.store import ArtifactStore, DataError, StageKey, StageRef
from tasks.registry import Recipe, recipe_from_dict
from tasks.text import encode as tokenize
from tasks.text.config import TokenizerConfig

WORDS = "the a movie film plot actor scene story music was is very quite good bad dull great boring fun".split()
ONLY_IN_TEST = "xylophonequartz"
ONLY_IN_VALIDATION = "zeppelinvortex"
SCHEMA = pa.schema([("id", pa.string()), ("text", pa.string()), ("label", pa.string())])


def rows(n: int, prefix: str, seed: int, extra_word: str | None = None) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(3, 12))]
        if extra_word:
            words.insert(1, extra_word)
        out.append({"id": f"{prefix}{i}", "text": " ".join(words), "label": rng.choice(["pos", "neg"])})
    return out


def split_dir(store: ArtifactStore, train: list[dict], validation: list[dict], test: list[dict], fp: str = "split-fp") -> StageRef:
    """A fake split stage directory."""
    with store.writer(StageKey("split", fp, {}, [], 'test')) as w:
        for name, data in (("train", train), ("validation", validation), ("test", test)):
            w.write_table(f"{name}.parquet", pa.Table.from_pylist(data, schema=SCHEMA))
        return w.write_manifest(rows={})


def recipe(labels: list[str] | None = None, **tok) -> Recipe:
    tok = {"vocab_size": 200, "min_frequency": 1, "max_length": 16, **tok}
    return recipe_from_dict({"name": "t", "data": {"train_path": "x.csv", "labels": labels}, "tokenizer": tok})


LONG = " ".join(["great"] * 40)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[ArtifactStore, StageRef, StageRef]:
    store = ArtifactStore(tmp_path_factory.mktemp("tok") / "artifacts")
    train = rows(300, "tr", 1) + [{"id": "long", "text": LONG, "label": "pos"}]
    source = split_dir(store, train, rows(40, "va", 2, ONLY_IN_VALIDATION), rows(40, "te", 3, ONLY_IN_TEST))
    return store, source, tokenize.run(recipe(), source, store)


def read(ref: StageRef, name: str) -> pa.Table:
    return pq.read_table(ref.file(f"{name}.parquet"))


def test_vocabulary_comes_from_train_only(built):
    _, _, ref = built
    tok = Tokenizer.from_file(str(ref.file("tokenizer.json")))
    vocab = tok.get_vocab()
    assert "movie" in vocab and "boring" in vocab  # train words are whole-word entries
    assert ONLY_IN_TEST not in vocab and ONLY_IN_VALIDATION not in vocab
    test = read(ref, "test")
    assert ONLY_IN_TEST in test.column("text")[0].as_py()
    assert tok.encode(ONLY_IN_TEST).ids != [2, vocab.get(ONLY_IN_TEST, -1), 3]


def test_special_tokens_and_template(built):
    _, _, ref = built
    tok = Tokenizer.from_file(str(ref.file("tokenizer.json")))
    assert [tok.token_to_id(t) for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")] == [0, 1, 2, 3, 4]
    assert ref.extra["pad_id"] == 0
    for name in tokenize.SPLITS:
        for ids in read(ref, name).column("input_ids").to_pylist():
            assert ids[0] == 2 and ids[-1] == 3 and 0 not in ids
    assert tok.encode("The MOVIE").tokens == ["[CLS]", "the", "movie", "[SEP]"]  # lower-cased


def test_truncation_to_max_length(built):
    _, _, ref = built
    train = read(ref, "train")
    row = train.filter(pa.compute.equal(train.column("id"), "long")).to_pylist()[0]
    assert row["length"] == 16 == len(row["input_ids"])
    assert row["input_ids"][-1] == 3
    assert max(train.column("length").to_pylist()) == 16
    assert ref.extra["max_length"] == 16
    assert ref.extra["truncation_rate"]["train"] == pytest.approx(1 / 301)
    assert ref.extra["truncation_rate"]["test"] == 0.0
    assert ref.extra["metrics"]["train_truncation_rate"] == pytest.approx(1 / 301)


def test_output_schema_lengths_and_label_ids(built):
    _, _, ref = built
    labels = json.loads(ref.file("labels.json").read_text())
    assert labels == ref.extra["labels"] == ["neg", "pos"]
    assert ref.extra["num_labels"] == 2
    for name in tokenize.SPLITS:
        table = read(ref, name)
        assert table.schema == tokenize.SCHEMA
        for row in table.to_pylist():
            assert labels[row["label_id"]] == row["label"]
            assert row["length"] == len(row["input_ids"])
    assert ref.rows == {"input": 381, "train": 301, "validation": 40, "test": 40, "rejected": 0}
    assert set(ref.extra["log_files"]) >= {"tokenizer.json", "labels.json"}
    assert all(isinstance(v, float) for v in ref.extra["metrics"].values())
    assert ref.extra["length_percentiles"]["train"]["max"] == 16


def test_stored_ids_round_trip_through_tokenizer_json(built):
    _, _, ref = built
    tok = Tokenizer.from_file(str(ref.file("tokenizer.json")))
    table = read(ref, "validation")
    expected = [e.ids for e in tok.encode_batch(table.column("text").to_pylist())]
    assert table.column("input_ids").to_pylist() == expected
    again = Tokenizer.from_str(tok.to_str())
    assert again.encode("a boring plot").ids == tok.encode("a boring plot").ids


@pytest.mark.parametrize("chunk_size", [None, 7, 1000])
def test_encode_equals_encode_batch(chunk_size):
    texts = [r["text"] for r in rows(50, "x", 9)] + ["", "unseen wordzz", LONG]
    tok = tokenize.train_tokenizer(iter(texts), TokenizerConfig(vocab_size=150, min_frequency=1, max_length=12))
    arr = tokenize.encode(tok, texts, chunk_size=chunk_size)
    assert arr.type == pa.list_(pa.int32())
    assert arr.to_pylist() == [e.ids for e in tok.encode_batch(texts)]
    assert tokenize.encode(tok, []).to_pylist() == []
    assert tokenize._plain_template(tok) == (2, 3, 12)  # the specials were added in numpy, not by the tokenizer


@pytest.mark.parametrize("change", ["left_truncation", "no_template", "padding", "no_truncation"])
def test_encode_keeps_the_tokenizers_own_specials_when_it_cannot_add_them_itself(change):
    texts = [r["text"] for r in rows(30, "x", 4)] + ["", LONG]
    tok = tokenize.train_tokenizer(iter(texts), TokenizerConfig(vocab_size=150, min_frequency=1, max_length=12))
    if change == "left_truncation":
        tok.enable_truncation(max_length=12, direction="left")
    elif change == "no_template":
        tok.post_processor = None
    elif change == "padding":
        tok.enable_padding(pad_id=0, length=12)
    else:
        tok.no_truncation()
    assert tokenize._plain_template(tok) is None
    assert tokenize.encode(tok, texts, chunk_size=7).to_pylist() == [e.ids for e in tok.encode_batch(texts)]


def test_label_map_order_and_errors():
    assert tokenize.label_map(["b", "a", "b"]) == ["a", "b"]
    assert tokenize.label_map(["b", "a"], ["b", "a", "c"]) == ["b", "a", "c"]
    with pytest.raises(DataError):
        tokenize.label_map(["a", "z"], ["a", "b"])


def test_configured_label_order_and_unknown_test_label_rejected(tmp_path):
    store = ArtifactStore(tmp_path)
    test = rows(10, "te", 3) + [{"id": "odd", "text": "a good film", "label": "neutral"}]
    source = split_dir(store, rows(60, "tr", 1), rows(10, "va", 2), test)
    ref = tokenize.run(recipe(labels=["pos", "neg"]), source, store)
    assert json.loads(ref.file("labels.json").read_text()) == ["pos", "neg"]
    train = read(ref, "train").to_pylist()
    assert all(r["label_id"] == (0 if r["label"] == "pos" else 1) for r in train)
    rejects = read(ref, "rejects")
    assert rejects.column("id").to_pylist() == ["odd"]
    assert "neutral" in rejects.column("reason")[0].as_py()
    assert ref.rows["test"] == 10 and ref.rows["rejected"] == 1
    assert sum(ref.rows[n] for n in tokenize.SPLITS) + ref.rows["rejected"] == ref.rows["input"]


def test_cache_hit_and_fingerprint_inputs(built):
    store, source, ref = built
    again = tokenize.run(recipe(), source, store)
    assert again.cache_hit and again.fingerprint == ref.fingerprint
    assert again.extra["vocab_size"] == ref.extra["vocab_size"]
    assert tokenize.run(recipe(max_length=20), source, store).fingerprint != ref.fingerprint
    assert not tokenize.run(recipe(labels=["neg", "pos"]), source, store).cache_hit


def test_training_is_deterministic():
    texts = [r["text"] for r in rows(200, "d", 4)] + ["unbelievably wonderful storytelling", "interminable"]
    cfg = TokenizerConfig(vocab_size=120, min_frequency=1, max_length=32)
    trained = {tokenize.train_tokenizer(texts, cfg).to_str() for _ in range(6)}
    assert len(trained) == 1
    tok = Tokenizer.from_str(trained.pop())
    assert [t.content for t in tok.get_added_tokens_decoder().values()] == tokenize.SPECIAL_TOKENS
    assert "##e" in tok.get_vocab() and "##e" not in tok.encode("a ##e").tokens  # a piece, not an added token


def test_word_level_tokenizer_maps_rare_and_unseen_words_to_unk():
    texts = ["what is a walrus ?", "what is a cat ?", "who is the walrus ?", "how many cats ?"] * 2 + ["what is zebu ?"]
    cfg = TokenizerConfig(model="wordlevel", vocab_size=100, min_frequency=2, max_length=8)
    tok = tokenize.train_tokenizer(texts, cfg)
    assert [tok.token_to_id(t) for t in tokenize.SPECIAL_TOKENS] == [0, 1, 2, 3, 4]
    assert tok.encode("What is amitriptyline ?").tokens == ["[CLS]", "what", "is", "[UNK]", "?", "[SEP]"]
    assert tok.encode("what is zebu ?").tokens[3] == "[UNK]"  # seen once: below min_frequency
    assert tok.encode("the walrus").tokens == ["[CLS]", "the", "walrus", "[SEP]"]
    long = " ".join(["cat"] * 20)
    assert tokenize.encode(tok, [long, "", "who ?"]).to_pylist() == [e.ids for e in tok.encode_batch([long, "", "who ?"])]


def test_word_level_vocabulary_is_deterministic_when_the_size_cuts_ties():
    texts = [" ".join(f"w{i}" for i in range(j, j + 30)) for j in range(0, 400, 3)]  # many words, equal counts
    cfg = TokenizerConfig(model="wordlevel", vocab_size=100, min_frequency=1, max_length=32)
    trained = {tokenize.train_tokenizer(texts, cfg).to_str() for _ in range(6)}
    assert len(trained) == 1
    assert Tokenizer.from_str(trained.pop()).get_vocab_size() == 100


def test_pretrained_encoder_brings_its_own_tokenizer(tmp_path) -> None:
    """model.arch=pretrained: the checkpoint's WordPiece (never trained, so an unseen word still splits into
    its real pieces), its special ids, truncation at max_length, and its content hash in the fingerprint."""
    from transformers import AutoTokenizer

    from models.encoders import checkpoint_digest, resolve_pretrained

    store = ArtifactStore(tmp_path / "artifacts")
    source = split_dir(store, rows(60, "tr", 1), rows(10, "va", 2), rows(10, "te", 3, ONLY_IN_TEST))
    pretrained = recipe_from_dict({"name": "t", "data": {"train_path": "x.csv"}, "model": {"arch": "pretrained"},
                                   "tokenizer": {"max_length": 16}})
    ref = tokenize.run(pretrained, source, store)
    folder = resolve_pretrained(pretrained.model.pretrained)
    hf = AutoTokenizer.from_pretrained(str(folder))
    assert ref.extra["vocab_size"] == hf.vocab_size and ref.extra["pad_id"] == hf.pad_token_id
    assert ref.extra["cls_id"] == hf.cls_token_id and ref.extra["arch"] == "pretrained"
    test = read(ref, "test")
    text = test.column("text")[0].as_py()
    assert test.column("input_ids")[0].as_py() == hf(text, truncation=True, max_length=16)["input_ids"]
    manifest = json.loads(ref.file("manifest.json").read_text())
    assert manifest["config"]["tokenizer"] == {"pretrained": checkpoint_digest(folder), "max_length": 16}
    scratch = tokenize.run(recipe(), source, store)
    assert scratch.fingerprint != ref.fingerprint and scratch.extra["vocab_size"] < hf.vocab_size
