"""The scheduled deployments (``flows/deployments.py``), without a server: what would be registered."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from flows import deployments
from flows.deployments import (
    DEFAULT_CRON,
    NEEDS_SERVER,
    deployment_for,
    form_schema,
    main,
)
from tasks.registry import load_recipe, recipe_from_dict

ROOT = Path(__file__).resolve().parents[2]
SST2 = ROOT / "configs" / "sst2.yaml"
MNIST = ROOT / "configs" / "mnist.yaml"


@pytest.fixture(scope="module")
def sst2() -> Any:
    return deployment_for(SST2)


@pytest.fixture(scope="module")
def schema(sst2) -> dict[str, Any]:
    """The parameter schema as it is sent to the server."""
    return sst2._parameter_openapi_schema.model_dump(exclude_unset=True)


def test_one_deployment_of_the_pipeline_per_recipe(sst2) -> None:
    assert (sst2.flow_name, sst2.name) == ("nightshift-pipeline", "sst2")
    assert sst2.entrypoint == "flows.pipeline.pipeline"
    assert sst2.tags == ["nightshift", "recipe:sst2"]
    assert "sst2" in sst2.description and "text-classification" in sst2.description
    assert sst2.work_pool_name is None  # served by `nightshift schedule`, not a worker


def test_cron_schedule_with_timezone(sst2) -> None:
    [schedule] = sst2.schedules
    assert schedule.active
    assert (schedule.schedule.cron, schedule.schedule.timezone) == (DEFAULT_CRON, "UTC") == ("0 2 * * *", "UTC")
    other = deployment_for(SST2, "30 1 * * 1-5", "Europe/Berlin")
    assert (other.schedules[0].schedule.cron, other.schedules[0].schedule.timezone) == ("30 1 * * 1-5", "Europe/Berlin")


def test_parameters_default_to_the_yaml_recipe(sst2) -> None:
    assert set(sst2.parameters) == {"recipe", "force"} and sst2.parameters["force"] is False
    recipe = sst2.parameters["recipe"]
    assert recipe == load_recipe(SST2).as_dict()
    raw = yaml.safe_load(SST2.read_text())
    assert recipe["name"] == raw["name"] and recipe["data"]["train_path"] == raw["data"]["train_path"]
    assert recipe["validate"]["max_conflict_fraction"] == raw["validate"]["max_conflict_fraction"]  # the YAML key name
    assert recipe["train"]["epochs"] == raw["train"]["scratch"]["epochs"]
    # what a run receives validates back to the same recipe, so it hits the same caches as `nightshift run`
    assert recipe_from_dict(recipe).config_hash() == load_recipe(SST2).config_hash()


def test_schema_enforced_and_one_run_at_a_time(sst2) -> None:
    from prefect.client.schemas.objects import ConcurrencyLimitStrategy

    assert sst2.enforce_parameter_schema is True
    assert sst2.concurrency_limit == 1
    assert sst2.concurrency_options.collision_strategy == ConcurrencyLimitStrategy.ENQUEUE


def test_run_form_is_the_recipe_class_with_descriptions_bounds_and_choices(schema) -> None:
    recipe = schema["properties"]["recipe"]
    assert recipe["$ref"] == "#/definitions/TextRecipe" and "oneOf" not in recipe and "anyOf" not in recipe
    assert recipe["description"] and schema["required"] == ["recipe"]
    assert schema["properties"]["force"]["type"] == "boolean" and schema["properties"]["force"]["default"] is False
    defs = schema["definitions"]
    assert "ImageRecipe" not in defs
    sections = defs["TextRecipe"]["properties"]
    for section in ("name", "task", "data", "validate", "clean", "split", "tokenizer", "augment", "model", "train",
                    "evaluate", "deploy"):
        assert section in sections, section
    epochs = defs["TrainConfig"]["properties"]["epochs"]
    assert epochs["description"].startswith("Maximum number of epochs")
    assert (epochs["type"], epochs["minimum"], epochs["maximum"]) == ("integer", 1, 1000)
    assert defs["TrainConfig"]["properties"]["device"]["enum"] == ["auto", "cpu", "cuda"]
    assert defs["EvaluateConfig"]["properties"]["primary_metric"]["enum"] == ["accuracy", "macro_f1"]
    assert defs["DataConfig"]["properties"]["max_rows"]["description"]
    undocumented = [f"{name}.{field}" for name, model in defs.items() for field, spec in model["properties"].items()
                    if not spec.get("description")]
    # sections without a Field(description=...) in the recipe class show their class docstring instead
    assert all(defs[name.split(".")[0]]["properties"][name.split(".")[1]].get("$ref") for name in undocumented), undocumented


def test_run_form_keeps_the_declaration_order_through_jsonb(schema) -> None:
    """PostgreSQL JSONB sorts object keys shortest first; the UI orders a section's fields by ``position``."""
    from tasks.text.config import TextRecipe

    def form_order(properties: dict) -> list[str]:
        shuffled = dict(sorted(properties.items(), key=lambda kv: (len(kv[0]), kv[0])))  # what JSONB hands back
        return sorted(shuffled, key=lambda key: shuffled[key]["position"])

    defs = schema["definitions"]
    assert form_order(defs["TextRecipe"]["properties"]) == ["name", "task", "data", "validate", "clean", "split",
                                                            "tokenizer", "augment", "model", "train", "evaluate",
                                                            "deploy"]
    train = form_order(defs["TrainConfig"]["properties"])
    assert train == [f.alias or k for k, f in TextRecipe.model_fields["train"].annotation.model_fields.items()]
    data = form_order(defs["DataConfig"]["properties"])
    assert data[:2] == ["train_path", "test_path"]


def test_image_recipe_gets_its_own_form() -> None:
    schema = deployment_for(MNIST)._parameter_openapi_schema.model_dump(exclude_unset=True)
    assert schema["properties"]["recipe"]["$ref"] == "#/definitions/ImageRecipe"
    assert "TextRecipe" not in schema["definitions"]


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (("train", "epochs"), 0, "0 is less than the minimum of 1"),
        (("train", "epochs"), "two", "'two' is not of type 'integer'"),
        (("train", "device"), "tpu", "'tpu' is not one of ['auto', 'cpu', 'cuda']"),
    ],
)
def test_server_validation_names_the_field(sst2, schema, path, value, reason) -> None:
    """The validation the server runs on a flow run's parameters (``enforce_parameter_schema``)."""
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    validate(sst2.parameters, schema, raise_on_error=True)
    bad = copy.deepcopy(sst2.parameters)
    bad["recipe"][path[0]][path[1]] = value
    with pytest.raises(ValidationError) as error:
        validate(bad, schema, raise_on_error=True)
    assert str(error.value) == f"Validation failed for field 'recipe.{'.'.join(path)}'. Failure reason: {reason}"


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        (("tasks", "wnut17", "train", "batch_size"), 0, "0 is less than the minimum of 1"),
        (("tasks", "wnut17", "data", "tag_scheme"), "bilou", "'bilou' is not one of ['iob1', 'iob2', 'bioes']"),
        (("tasks", "sst2", "evaluate", "min_score"), 2, "2 is greater than the maximum of 1"),
    ],
)
def test_multi_task_form_types_each_task_as_its_kind(path, value, reason) -> None:
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    multi = deployment_for(ROOT / "configs" / "multitask.yaml")
    schema = multi._parameter_openapi_schema.model_dump(exclude_unset=True)
    tasks = schema["definitions"]["MultiRecipe"]["properties"]["tasks"]
    assert {name: ref["$ref"] for name, ref in tasks["properties"].items()} == {
        "sst2": "#/definitions/TextTask", "wnut17": "#/definitions/TokenTask"}
    validate(multi.parameters, schema, raise_on_error=True)
    bad = copy.deepcopy(multi.parameters)
    section = bad["recipe"]
    for key in path[:-1]:
        section = section[key]
    section[path[-1]] = value
    with pytest.raises(ValidationError) as error:
        validate(bad, schema, raise_on_error=True)
    assert str(error.value) == f"Validation failed for field 'recipe.{'.'.join(path)}'. Failure reason: {reason}"


def test_the_union_schema_would_name_only_recipe() -> None:
    """Why the form is narrowed: Prefect's schema of the flow itself is a oneOf of both recipe classes."""
    from prefect.utilities.callables import parameter_schema

    from flows.pipeline import pipeline

    union = parameter_schema(pipeline).model_dump()
    refs = [ref["$ref"] for ref in union["properties"]["recipe"]["oneOf"]]
    assert {"#/definitions/TextRecipe", "#/definitions/ImageRecipe"} <= set(refs)  # and any newer kind's recipe
    assert form_schema(dict).model_dump()["properties"]["recipe"]["type"] == "object"


@pytest.fixture
def no_server(monkeypatch: pytest.MonkeyPatch):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    with temporary_settings(restore_defaults={PREFECT_API_URL}):
        yield


def test_schedule_refuses_without_a_server(no_server, capsys, monkeypatch) -> None:
    monkeypatch.setattr(deployments, "serve", lambda *a, **k: pytest.fail("served without a server"))
    assert main(["--config", str(SST2)]) == 2
    out, err = capsys.readouterr()
    assert err == NEEDS_SERVER + "\n" and out == ""
    assert NEEDS_SERVER == ("nightshift schedule needs a Prefect server: run `nightshift stack up` "
                            "(or set PREFECT_API_URL)")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--config", "configs/nope.yaml"], "nightshift: error: configs/nope.yaml: recipe file not found"),
        (["--cron", "0 2 * *"], "nightshift: error: --cron '0 2 * *': not a cron expression"),
        (["--timezone", "Mars/Olympus"], "nightshift: error: --timezone 'Mars/Olympus': not an IANA timezone"),
        (["--config", str(SST2), "--config", str(SST2)], "are both recipe 'sst2'"),
    ],
)
def test_schedule_bad_input_is_one_line(monkeypatch, capsys, args, message) -> None:
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(deployments, "serve", lambda *a, **k: pytest.fail("served bad input"))
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_schedule_serves_every_recipe(monkeypatch, capsys) -> None:
    served: list[Any] = []
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(deployments, "serve", lambda deps, **k: served.extend(deps))
    assert main(["--config", str(SST2), "--config", str(MNIST), "--cron", "*/5 * * * *"]) == 0
    assert [(d.name, d.schedules[0].schedule.cron) for d in served] == [("sst2", "*/5 * * * *"),
                                                                       ("mnist", "*/5 * * * *")]
    assert "nightshift-pipeline/sst2, nightshift-pipeline/mnist" in capsys.readouterr().out


def test_summary_links_the_mlflow_run_pages() -> None:
    """Against a tracking server the run's markdown artifact links the MLflow UI's run pages."""
    from tasks.core.lineage import summary_markdown

    summary = {
        "recipe": "sst2", "metrics": {"test": {"accuracy": 0.8}}, "cache": {"ingest": "hit"},
        "model": {"uri": "models:/sst2/1"}, "data": {"fingerprint": "f" * 64, "rows": {"input": 10}},
        "decision": {"promoted": True, "reason": "first model", "champion_before": None, "champion_after": "1"},
        "mlflow": {"tracking_uri": "http://127.0.0.1:5000", "experiment_id": "3", "parent_run_id": "abc",
                   "stage_runs": {"prep": "p1", "train": "t1"}},
        "timings_s": {"total": 1.0},
    }
    page = "http://127.0.0.1:5000/#/experiments/3/runs/"
    urls = {"pipeline": page + "abc", "prep": page + "p1", "train": page + "t1"}
    linked = summary_markdown(summary, urls)
    assert f"[open the run in MLflow]({page}abc)" in linked and f"[train]({page}t1)" in linked
    embedded = summary_markdown({**summary, "mlflow": {**summary["mlflow"], "tracking_uri": "sqlite:///x.db"}},
                                {"pipeline": "sqlite:///x.db (experiment 3, run abc)"})
    assert "](" not in embedded and "- MLflow: sqlite:///x.db, experiment 3, run `abc`" in embedded
