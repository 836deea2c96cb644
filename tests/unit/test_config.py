"""Recipes: every file in configs/ loads, overrides parse as YAML, unknown keys fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest

from tasks.config import Recipe, RecipeError, apply_overrides, flatten, load_recipe

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_recipe_loads(path: Path) -> None:
    recipe = load_recipe(path)
    assert recipe.name == path.stem
    assert recipe.model_name == recipe.name


def test_design_keys_exist() -> None:
    recipe = load_recipe(CONFIGS[0])
    flat = flatten(recipe.as_dict())
    for key in ("data.train_path", "data.test_path", "data.format", "data.has_header", "data.columns",
                "data.text_column", "data.label_column", "data.labels", "data.encoding", "data.max_rows",
                "train.epochs", "train.batch_size", "train.seed", "train.device", "evaluate.min_score",
                "evaluate.max_regression", "deploy.model_name"):
        assert key in flat or any(k.startswith(key + ".") for k in flat), key


def test_minimal_recipe_has_defaults() -> None:
    recipe = Recipe.model_validate({"name": "tiny", "task": "text-classification", "data": {"train_path": "x.csv"}})
    assert recipe.train.epochs >= 1 and recipe.tokenizer.max_length > 0


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
        load_recipe(CONFIGS[0], ["train.epochz=3"])


def test_bounds_are_checked() -> None:
    with pytest.raises(RecipeError, match="split.validation_fraction"):
        load_recipe(CONFIGS[0], ["split.validation_fraction=0.9"])


def test_missing_file_is_named() -> None:
    with pytest.raises(RecipeError, match="nope.yaml: recipe file not found"):
        load_recipe("nope.yaml")
