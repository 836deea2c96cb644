"""The release loop on a real pipeline run: infra validation in a real `nightshift serve` process, its two
failures (a bundle that cannot load in a fresh process, predictions that differ) leaving the aliases
alone, the alias history, two rollbacks walking two versions back, promote refusing a failed gate,
and the alert webhook receiving the run's news (success and failure) on a loopback listener.

One module-scoped pipeline run of the keyword recipe (tests/flows/test_bundle.py) serves every test.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from tests.flows.test_bundle import _unset_mlflow_uris, keyword_texts
from tests.unit.test_alerts import Listener

pytestmark = pytest.mark.slow
NAME = "kw-release"


def _recipe(base: Path, name: str = NAME, train_path: str | None = None, seed: int = 3):
    from tasks.registry import recipe_from_dict

    return recipe_from_dict({
        "name": name,
        "data": {"train_path": train_path or str(base / "train.csv"), "labels": ["neg", "pos"]},
        "tokenizer": {"vocab_size": 200, "min_frequency": 1},
        "model": {"arch": "scratch", "d_model": 32, "n_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0,
                  "pooling": "max"},
        "train": {"epochs": 2, "batch_size": 16, "lr": 0.005, "seed": seed, "threads": 1},
        "deploy": {"canary_size": 8, "canary_start_timeout_s": 240},
    })


@pytest.fixture(scope="module")
def released(prefect_harness, tmp_path_factory: pytest.TempPathFactory):
    """One pipeline run in a fresh NIGHTSHIFT_HOME, with the alert webhook on a loopback listener."""
    from flows.pipeline import pipeline
    from tasks.core import tracking

    base = tmp_path_factory.mktemp("release")
    pd.DataFrame(keyword_texts(200, seed=1), columns=["text", "label"]).to_csv(base / "train.csv", index=False)
    with pytest.MonkeyPatch.context() as mp, Listener() as hook:
        mp.setenv("NIGHTSHIFT_HOME", str(base / "home"))
        mp.setenv("NIGHTSHIFT_ALERT_WEBHOOK", hook.url)
        _unset_mlflow_uris(mp)
        mp.chdir(base)
        recipe = _recipe(base)
        summary = pipeline(recipe)
        tracking.configure()
        yield SimpleNamespace(base=base, recipe=recipe, summary=summary, hook=hook, mp=mp)


def _aliases() -> dict[str, str | None]:
    from tasks.core import tracking

    return {a: tracking.alias_version(NAME, a) for a in ("champion", "previous")}


def _copy_version(released: SimpleNamespace, drop: str | None = None, gate: str = "pass") -> str:
    """Register a new version from a copy of v1's logged model (``drop``: a bundle file to delete first)."""
    import mlflow

    from tasks.core import tracking

    target = released.base / f"copy-{len(list(released.base.glob('copy-*')))}"
    shutil.copytree(mlflow.artifacts.download_artifacts(f"models:/{NAME}/1"), target)
    if drop is not None:
        (bundle,) = (target / "artifacts").iterdir()  # the bundle folder (named by its fingerprint)
        (bundle / drop).unlink()
    return tracking.register_version(target.as_uri(), NAME, released.summary["mlflow"]["stage_runs"]["train"],
                                     {"nightshift.gate": gate, "nightshift.gate_reason": f"test copy ({gate})"})


def _canary_inputs(released: SimpleNamespace) -> tuple[list[str], list[str]]:
    import mlflow

    texts = [text for text, _ in keyword_texts(8, seed=99)]
    labels = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(pd.DataFrame({"text": texts}))["label"].tolist()
    return texts, [str(label) for label in labels]


def test_the_pipeline_infra_validated_before_promoting(released: SimpleNamespace) -> None:
    from tasks.core import history, tracking

    s = released.summary
    assert s["decision"]["promoted"] is True and s["model"]["version"] == "1"
    deploy_run = tracking.client().get_run(s["mlflow"]["stage_runs"]["deploy"])
    assert deploy_run.data.tags["nightshift.canary.served_version"] == "1"
    assert deploy_run.data.tags["nightshift.canary.result"] == "passed"
    assert {"canary.p50_ms", "canary.p99_ms", "canary.rss_mb", "canary.requests"} <= set(deploy_run.data.metrics)
    assert deploy_run.data.metrics["canary.requests"] == 8 and deploy_run.data.metrics["canary.rss_mb"] > 50
    (move,) = history.moves(NAME)
    assert (move.alias, move.from_version, move.to_version, move.action) == ("champion", None, "1", "pipeline")
    assert move.context.mlflow_run_id == s["mlflow"]["parent_run_id"] and move.context.prefect_flow_run_id


def test_the_alert_carried_the_decision_the_diff_and_both_links(released: SimpleNamespace) -> None:
    (message,) = [m for m in released.hook.received if m["event"] == "nightshift.run.completed"]
    s = released.summary
    assert message["decision"] == s["decision"]
    assert message["metrics"]["accuracy"]["challenger"] == pytest.approx(s["metrics"]["test"]["accuracy"], abs=1e-6)
    assert message["metrics"]["accuracy"]["champion"] is None  # the first run has no champion to diff against
    assert message["validation"]["rows_in"] == 200 and "rejected_by_reason" in message["validation"]
    assert s["mlflow"]["parent_run_id"] in message["links"]["mlflow_run"]
    assert message["links"]["prefect_flow_run"] and "flow" in message["links"]["prefect_flow_run"]


def test_score_accounts_for_every_row_and_logs_to_mlflow(released: SimpleNamespace,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    import mlflow
    import pyarrow.parquet as pq

    from flows.cli import main
    from tasks.core import tracking

    rows = keyword_texts(300, seed=7)
    lines = ["id,text"] + [f'r{i},"{text}"' for i, (text, _) in enumerate(rows)] + ['bad1,""', 'bad2,"a","b"']
    (released.base / "new.csv").write_text("\n".join(lines) + "\n")
    out = released.base / "scored" / "new.parquet"
    assert main(["score", "--model", NAME, "--input", str(released.base / "new.csv"), "--output", str(out),
                 "--batch-size", "64"]) == 0
    assert "scored 300 of 302 rows" in capsys.readouterr().out
    scored = pq.read_table(out).to_pandas()
    rejects = pq.read_table(out.with_name("new.rejects.parquet")).to_pandas()
    assert len(scored) + len(rejects) == 302 and sorted(rejects["reason"].str.split(":").str[0]) == [
        "empty text", "malformed row"]
    assert scored["id"].tolist() == [f"r{i}" for i in range(300)]
    assert set(scored["model_version"]) == {"1"}
    offline = mlflow.pyfunc.load_model(f"models:/{NAME}/1").predict(pd.DataFrame({"text": [t for t, _ in rows]}))
    assert scored["prediction"].tolist() == offline["label"].tolist()  # the same answers as the model itself
    assert (scored["prediction"] == pd.Series([label for _, label in rows])).mean() >= 0.7  # and they are right
    (run,) = tracking.client().search_runs([tracking.client().get_experiment_by_name(f"{NAME}-scoring").experiment_id])
    assert (run.data.metrics["rows_in"], run.data.metrics["rows_scored"], run.data.metrics["rows_rejected"]) == (
        302, 300, 2)
    assert run.data.tags["nightshift.model_version"] == "1" and run.info.status == "FINISHED"


def test_predictions_that_differ_fail_infra_validation_and_nothing_moves(released: SimpleNamespace) -> None:
    from tasks import deploy

    version = _copy_version(released)
    texts, labels = _canary_inputs(released)
    wrong = ["neg" if label == "pos" else "pos" for label in labels]
    check = deploy.validator(NAME, texts, wrong, "text", released.recipe.deploy)
    with pytest.raises(deploy.ReleaseError, match=r"not promoted, aliases unchanged.*predictions: served predictions "
                                                  r"differ from the offline ones at canary rows \[0, 1"):
        deploy.release(NAME, version, True, "gate passed", validate=check)
    assert _aliases() == {"champion": "1", "previous": None}


def test_a_bundle_that_cannot_load_in_a_fresh_process_fails_and_nothing_moves(released: SimpleNamespace) -> None:
    from tasks import canary, deploy

    version = _copy_version(released, drop="tokenizer.json")
    texts, labels = _canary_inputs(released)
    with pytest.raises(deploy.ReleaseError, match="not promoted, aliases unchanged.*infra validation failed: load") as err:
        deploy.release(NAME, version, True, "gate passed",
                       validate=deploy.validator(NAME, texts, labels, "text", released.recipe.deploy))
    cause = err.value.__cause__
    assert isinstance(cause, canary.InfraValidationError) and cause.check == "load"
    assert "No such file" in str(cause) and cause.report.served_version is None  # the fresh process could not read it
    assert _aliases() == {"champion": "1", "previous": None}


def test_promote_refuses_a_failed_gate_then_two_rollbacks_walk_two_versions_back(
        released: SimpleNamespace, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main
    from tasks.core import history

    good, failed = _copy_version(released), _copy_version(released, gate="fail")
    assert main(["promote", "--model", NAME, "--version", failed]) == 2
    assert "failed its release gate" in capsys.readouterr().err
    assert _aliases()["champion"] == "1"
    assert main(["promote", "--model", NAME, "--version", good]) == 0  # infra-validated in a real server
    assert f"champion 1 -> {good}; canary p99" in capsys.readouterr().out
    assert main(["promote", "--model", NAME, "--version", failed, "--force", "--reason", "hotfix", "--no-canary"]) == 0
    assert _aliases() == {"champion": failed, "previous": good}
    assert main(["rollback", "--model", NAME]) == 0
    assert _aliases()["champion"] == good
    assert main(["rollback", "--model", NAME]) == 0
    assert _aliases()["champion"] == "1"  # two rollbacks, two versions back
    capsys.readouterr()
    assert main(["history", "--model", NAME]) == 0
    table = capsys.readouterr().out
    champion_moves = [(m.from_version, m.to_version, m.action) for m in history.moves(NAME, "champion")]
    assert champion_moves == [(None, "1", "pipeline"), ("1", good, "promote"), (good, failed, "promote"),
                              (failed, good, "rollback"), (good, "1", "rollback")]
    forced = [m for m in history.moves(NAME, "champion") if m.to_version == failed][0]
    assert forced.reason.startswith("forced past failed gate (test copy (fail)): hotfix")
    assert "promote --model" in forced.context.command or forced.context.command
    assert len(table.strip().splitlines()) == 2 + len(history.moves(NAME)) and "forced past failed gate" in table


def test_a_failed_run_alerts_with_its_stage_and_error(released: SimpleNamespace) -> None:
    from flows.pipeline import pipeline

    before = len(released.hook.received)
    broken = _recipe(released.base, name="kw-broken", train_path=str(released.base / "missing.csv"))
    with pytest.raises(Exception, match="missing.csv"):
        pipeline(broken)
    (message,) = released.hook.received[before:]
    assert message["event"] == "nightshift.run.failed" and message["failed_stage"] == "ingest"
    assert "missing.csv" in message["error"] and "\n" not in message["error"]
    assert message["links"]["mlflow_run"] and message["links"]["prefect_flow_run"]
