"""The score deployment: parameters, the trigger after the recipe's pipeline run, one run at a time."""

from __future__ import annotations

from flows.deployments import score_deployment


def test_score_deployment_runs_after_the_pipeline_of_its_model() -> None:
    d = score_deployment("sst2", "data/new.csv", "out/sst2.parquet", cron="0 6 * * *")
    assert d.name == "sst2" and d.flow_name == "nightshift-score"
    assert d.parameters == {"model": "sst2", "input": "data/new.csv", "output": "out/sst2.parquet", "alias": "champion"}
    (trigger,) = d.triggers
    assert trigger.expect == {"prefect.flow-run.Completed"}
    related = [dict(spec.root) if hasattr(spec, "root") else dict(spec) for spec in trigger.match_related]
    assert {"prefect.resource.role": "deployment", "prefect.resource.name": "sst2"} in related
    assert d.concurrency_limit == 1 and d.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert len(d.schedules) == 1
    assert score_deployment("sst2", "a.csv", "b.parquet", after_pipeline=False).triggers == []


def test_schedule_serves_a_score_deployment_after_its_recipes_pipeline(monkeypatch, capsys, tmp_path) -> None:
    from pathlib import Path

    from flows import deployments

    root = Path(__file__).resolve().parents[2]
    served: list = []
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(deployments, "serve", lambda deps, **k: served.extend(deps))
    args = ["--config", str(root / "configs" / "sst2.yaml"), "--config", str(root / "configs" / "mnist.yaml"),
            "--score", "sst2", str(tmp_path / "new.csv"), str(tmp_path / "out.parquet")]
    assert deployments.main(args) == 0
    assert [(d.flow_name, d.name) for d in served] == [("nightshift-pipeline", "sst2"), ("nightshift-pipeline", "mnist"),
                                                      ("nightshift-score", "sst2")]
    scorer = served[-1]
    assert scorer.parameters["input"] == str(tmp_path / "new.csv") and scorer.triggers
    assert "nightshift-score/sst2" in capsys.readouterr().out


def test_score_for_an_unknown_recipe_is_a_one_line_error(monkeypatch, capsys) -> None:
    from pathlib import Path

    from flows import deployments

    root = Path(__file__).resolve().parents[2]
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    monkeypatch.setattr(deployments, "serve", lambda *a, **k: None)
    assert deployments.main(["--config", str(root / "configs" / "sst2.yaml"), "--score", "mnist", "a.csv", "b.pq"]) == 2
    err = capsys.readouterr().err
    assert "--score mnist: no such recipe among --config (sst2)" in err and err.count("\n") == 1


def test_the_trigger_follows_the_recipe_when_the_model_is_named_otherwise() -> None:
    d = score_deployment("reviews-model", "a.csv", "b.parquet", pipeline="sst2")
    related = [dict(spec.root) if hasattr(spec, "root") else dict(spec) for spec in d.triggers[0].match_related]
    assert {"prefect.resource.role": "deployment", "prefect.resource.name": "sst2"} in related
    assert d.name == "reviews-model" and d.parameters["model"] == "reviews-model"
