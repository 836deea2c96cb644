"""The whole pipeline on a token-classification recipe, by configuration alone: a hand-made
CoNLL-2003-style file (IOB1 tags, -DOCSTART- lines, four columns) with some malformed lines, a tiny
scratch encoder, Prefect's test harness and MLflow in tmp_path. The second run of the same recipe
re-scores the first as champion through the registry."""

from __future__ import annotations

import mlflow
import numpy as np
import pandas as pd
import pytest

from tasks.registry import load_recipe

pytestmark = pytest.mark.slow

PEOPLE = ["Ann", "Bob", "Carla", "Dmitri", "Eve", "Farid", "Gina", "Hugo", "Ines", "Jon", "Kai", "Lena"]
SURNAMES = ["Smith", "Lee", "Moreau", "Kowalski", "Tanaka"]
PLACES = ["Paris", "Berlin", "Lagos", "Quito", "Osaka", "Perth", "Oslo", "Cairo", "Lima", "Hanoi"]
TEMPLATES = [["{p}", "flew", "to", "{l}", "."], ["{p}", "lives", "in", "{l}", "now"], ["yesterday", "{p}", "met", "{q}"],
             ["we", "love", "{l}", "and", "{m}"], ["nothing", "happened", "today", "."]]


def conll2003(rng: np.random.Generator, sentences: int, malformed: bool) -> str:
    """Sentences in CoNLL-2003 layout: token POS chunk NER, IOB1 (I- opens an entity), document markers."""
    lines = ["-DOCSTART- -X- -X- O", ""]
    for n in range(sentences):
        template = TEMPLATES[int(rng.integers(len(TEMPLATES)))]
        for word in template:
            if word in ("{p}", "{q}"):
                name = [PEOPLE[int(rng.integers(len(PEOPLE)))]]
                if rng.random() < 0.5:
                    name.append(SURNAMES[int(rng.integers(len(SURNAMES)))])
                lines += [f"{w} NNP I-NP I-PER" for w in name]
            elif word in ("{l}", "{m}"):
                lines.append(f"{PLACES[int(rng.integers(len(PLACES)))]} NNP I-NP I-LOC")
            else:
                lines.append(f"{word} XX O O")
        lines.append("")
        if n % 50 == 49:
            lines += ["-DOCSTART- -X- -X- O", ""]
    if malformed:
        lines += ["broken NN", "", "bad NN I-NP X-PER", ""]  # field count; a tag of no scheme
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    home = tmp_path_factory.mktemp("home")
    data = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    (data / "train.txt").write_text(conll2003(rng, 400, malformed=True))
    (data / "test.txt").write_text(conll2003(rng, 120, malformed=False))
    recipe_file = data / "ner.yaml"
    recipe_file.write_text(f"""name: tiny-ner
task: token-classification
data:
  train_path: {data / 'train.txt'}
  test_path: {data / 'test.txt'}
  format: conll
  columns: [token, pos, chunk, ner]
  label_column: ner
  tag_scheme: iob1
model: {{arch: scratch, d_model: 32, n_layers: 1, n_heads: 2, d_ff: 64}}
tokenizer: {{vocab_size: 300, min_frequency: 1, max_length: 16, stride: 4}}
augment: {{enabled: true}}
train: {{epochs: 6, batch_size: 16, lr: 0.003}}
validate: {{max_leakage_fraction: 1.0, max_conflict_fraction: 1.0}}
evaluate: {{min_score: 0.5}}
""")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIGHTSHIFT_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        recipe = load_recipe(recipe_file)
        first = pipeline(recipe)
        second = pipeline(recipe)
        yield {"home": home, "recipe": recipe, "first": first, "second": second}


def test_trains_by_configuration_alone_and_beats_chance(runs) -> None:
    s = runs["first"]
    assert s["status"] == "completed" and s["decision"]["promoted"] is True
    assert set(s["metrics"]["test"]) == {"f1", "precision", "recall"}
    # an all-O tagger scores 0; names and places in templates are easy for a model that learned anything
    assert s["metrics"]["test"]["f1"] > 0.8


def test_malformed_lines_are_rejected_and_rows_accounted_for(runs) -> None:
    rows = runs["first"]["data"]["rows"]
    assert rows["input"] == rows["accepted"] + rows["rejected"]
    assert rows["accepted"] == rows["train"] + rows["validation"] + rows["test"]
    assert rows["input"] == 400 + 2 + 120 and rows["rejected"] >= 2


def test_served_model_returns_entities_with_offsets(runs) -> None:
    mlflow.set_tracking_uri(runs["first"]["mlflow"]["tracking_uri"])
    model = mlflow.pyfunc.load_model("models:/tiny-ner@champion")
    texts = ["  Gina Tanaka flew to  Osaka .", "we love Lima and Perth"]
    out = model.predict(pd.DataFrame({"text": texts}))
    for text, entities in zip(texts, out["entities"]):
        for e in entities:
            assert text[e["start"]:e["end"]] == e["text"]
    assert {(e["text"], e["type"]) for e in out["entities"][0]} == {("Gina Tanaka", "PER"), ("Osaka", "LOC")}


def test_second_run_rescores_the_champion(runs) -> None:
    second = runs["second"]
    assert second["cache"]["train"] == "hit" and second["cache"]["evaluate"] == "miss"
    assert second["model"]["version"] == runs["first"]["model"]["version"]
