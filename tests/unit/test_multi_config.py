"""Multi-task recipes: every task validated as its own kind's recipe, shared sections, clear errors."""

from __future__ import annotations

import json

import pytest

from tasks.core.config import RecipeError
from tasks.multi.config import MultiRecipe
from tasks.registry import recipe_from_dict
from tasks.text.config import TextRecipe

SST2 = {"train_path": "data/sst2/train.parquet", "test_path": "data/sst2/dev.parquet", "text_column": "sentence",
        "label_column": "label", "labels": ["0", "1"]}
TREC = {"train_path": "data/trec/train_5500.label", "format": "tsv", "has_header": False, "delimiter": " ",
        "columns": ["label", "text"], "label_pattern": "^([A-Z]+):"}


def raw(**changes):
    recipe = {"name": "mt", "task": "multi-task",
              "tasks": {"sst2": {"task": "text-classification", "data": SST2, "evaluate": {"min_score": 0.8}},
                        "trec": {"task": "text-classification", "data": TREC, "loss_weight": 0.5,
                                 "clean": {"lowercase": True}}}}
    recipe.update(changes)
    return recipe


def test_union_picks_the_multi_recipe_and_each_task_is_its_kinds_recipe() -> None:
    recipe = recipe_from_dict(raw())
    assert isinstance(recipe, MultiRecipe)
    subs = recipe.sub_recipes()
    assert list(subs) == ["sst2", "trec"] and all(isinstance(s, TextRecipe) for s in subs.values())
    assert subs["sst2"].evaluate.min_score == 0.8 and subs["trec"].evaluate.min_score == 0.5  # its own gate
    assert subs["trec"].clean.lowercase is True and subs["sst2"].clean.lowercase is False
    assert recipe.loss_weights() == {"sst2": 1.0, "trec": 0.5}


def test_shared_model_train_and_tokenizer_reach_every_task() -> None:
    recipe = recipe_from_dict(raw(model={"arch": "scratch", "d_model": 64}, train={"epochs": 7},
                                  tokenizer={"vocab_size": 5000, "max_length": 40}))
    for sub in recipe.sub_recipes().values():
        assert sub.model == recipe.model and sub.model.d_model == 64
        assert sub.train.epochs == 7 and sub.train.lr == recipe.train.lr == 1e-3  # scratch defaults
        assert sub.tokenizer.vocab_size == 5000 and sub.tokenizer.max_length == 40


def test_a_task_sets_its_own_batch_size_head_lr_and_with_its_own_optimiser_lr() -> None:
    bad = raw(train={"batch_size": 32, "head_lr": 1e-3})
    bad["tasks"]["trec"]["train"] = {"batch_size": 16, "head_lr": 3e-3}
    subs = recipe_from_dict(bad).sub_recipes()
    assert (subs["trec"].train.batch_size, subs["trec"].train.head_lr) == (16, 3e-3)
    assert (subs["sst2"].train.batch_size, subs["sst2"].train.head_lr) == (32, 1e-3)  # the shared values
    assert subs["trec"].train.lr == subs["sst2"].train.lr == 1e-4  # one shared optimiser: one encoder rate
    bad["tasks"]["trec"]["train"] = {"lr": 1e-3}
    with pytest.raises(RecipeError, match=r"tasks\.trec\.train\.lr: an encoder rate per task needs multitask\.optimizer: per_task"):
        recipe_from_dict(bad)
    bad["multitask"] = {"optimizer": "per_task"}
    subs = recipe_from_dict(bad).sub_recipes()
    assert (subs["trec"].train.lr, subs["sst2"].train.lr) == (1e-3, 1e-4)
    bad["multitask"]["step"] = "joint"
    with pytest.raises(RecipeError, match="optimizer: per_task needs step: single"):
        recipe_from_dict(bad)


def test_pretrained_is_the_default_with_its_train_defaults() -> None:
    recipe = recipe_from_dict(raw())
    assert recipe.model.arch == "pretrained"
    assert recipe.train.head_lr == 1e-3 and recipe.tokenizer.max_length == 128


def test_errors_name_the_task_and_key() -> None:
    bad = raw()
    bad["tasks"]["trec"]["data"] = {**TREC, "colour": "red"}
    with pytest.raises(RecipeError, match=r"tasks\.trec\.data\.colour: Extra inputs are not permitted"):
        recipe_from_dict(bad)
    bad = raw()
    bad["tasks"]["sst2"]["evaluate"] = {"min_score": 2}
    with pytest.raises(RecipeError, match=r"tasks\.sst2\.evaluate\.min_score"):
        recipe_from_dict(bad)


def test_vocabulary_keys_are_shared_only() -> None:
    bad = raw()
    bad["tasks"]["sst2"]["tokenizer"] = {"vocab_size": 100}
    with pytest.raises(RecipeError, match=r"tasks\.sst2\.tokenizer: Value error, vocab_size decide the shared vocabulary"):
        recipe_from_dict(bad)


def test_top_level_evaluate_is_refused() -> None:
    with pytest.raises(RecipeError, match=r"gates every task on its own: set tasks.<name>.evaluate"):
        recipe_from_dict(raw(evaluate={"min_score": 0.9}))


def test_selection_weights() -> None:
    with pytest.raises(RecipeError, match="selection_weights: required"):
        recipe_from_dict(raw(multitask={"selection": "weighted"}))
    with pytest.raises(RecipeError, match=r"unknown tasks \['nope'\]"):
        recipe_from_dict(raw(multitask={"selection": "weighted", "selection_weights": {"nope": 1}}))
    ok = recipe_from_dict(raw(multitask={"selection": "weighted", "selection_weights": {"sst2": 2}}))
    assert ok.multitask.selection_weights == {"sst2": 2}


def test_pcgrad_needs_joint_steps() -> None:
    with pytest.raises(RecipeError, match=r"multitask.*gradient: pcgrad needs step: joint"):
        recipe_from_dict(raw(multitask={"gradient": "pcgrad"}))
    ok = recipe_from_dict(raw(multitask={"gradient": "pcgrad", "step": "joint"}))
    assert ok.multitask.gradient == "pcgrad"
    assert recipe_from_dict(raw()).multitask.gradient == "sum"


def test_needs_two_tasks_and_known_kinds() -> None:
    one = raw()
    del one["tasks"]["trec"]
    with pytest.raises(RecipeError, match="tasks"):
        recipe_from_dict(one)
    bad = raw()
    bad["tasks"]["trec"]["task"] = "image-classification"
    with pytest.raises(RecipeError, match=r"tasks\.trec: Input tag 'image-classification' found using 'task'"):
        recipe_from_dict(bad)


def test_a_task_has_only_its_kinds_sections_typed_for_the_form() -> None:
    bad = raw()
    bad["tasks"]["sst2"]["head"] = {"dropout": 0.1}  # a tagging head on a sentence task
    with pytest.raises(RecipeError, match=r"tasks\.sst2\.head: Extra inputs are not permitted"):
        recipe_from_dict(bad)
    # the Prefect form renders the JSON schema: each task is a choice of kinds with typed sections
    schema = json.dumps(MultiRecipe.model_json_schema())
    for key in ('"text_column"', '"tag_scheme"', '"label_all_tokens"', '"max_regression"', '"loss_weight"'):
        assert key in schema, key


def test_round_trips_through_its_dict() -> None:
    recipe = recipe_from_dict(raw(tasks={**raw()["tasks"], "trec": {**raw()["tasks"]["trec"], "tokenizer": {"max_length": 40},
                                                                    "train": {"batch_size": 8}}}))
    assert recipe.sub_recipes()["trec"].tokenizer.max_length == 40
    again = recipe_from_dict(recipe.as_dict())
    assert again == recipe and again.config_hash() == recipe.config_hash()
    assert again.sub_recipes()["trec"] == recipe.sub_recipes()["trec"]
