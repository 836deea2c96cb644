"""Releasing against a real MLflow registry (SQLite in tmp_path): promote, rollback, release, restore_aliases,
smoke_test, and register's rule that a version's gate decision is written once.

Creating a fresh MLflow database costs ~4 s of migrations, so one is built per module and copied into
each test's ``home``; model versions are registered from a dummy source (the registry never reads it).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import mlflow
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from tasks import deploy, register
from tasks.core import tracking
from tasks.core.store import StageRef

URI_VARS = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")


def _isolate_uri_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset the MLflow URI variables for this test and restore them afterwards.

    ``mlflow.set_tracking_uri`` / ``set_registry_uri`` export these variables, so without this an earlier
    ``configure()`` would pin this test to another test's database (see test_configure_follows_home).
    ``setenv`` first makes monkeypatch remember the outside value, so what MLflow exports is undone.
    """
    for var in URI_VARS:
        monkeypatch.setenv(var, "placeholder")
        monkeypatch.delenv(var)


@pytest.fixture(scope="module")
def empty_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with every migration applied and nothing in it."""
    path = tmp_path_factory.mktemp("mlflow-template") / "mlflow.db"
    uri = f"sqlite:///{path}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_experiments()
    client.search_registered_models()
    return path


@pytest.fixture
def registry(home: Path, empty_db: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> MlflowClient:
    """MLflow configured on a fresh registry under ``home`` (the embedded default)."""
    _isolate_uri_env(monkeypatch)
    monkeypatch.chdir(tmp_path)  # a stray relative artifact root would land here, not in the project
    home.mkdir(parents=True)
    shutil.copyfile(empty_db, home / "mlflow.db")
    uri = tracking.configure()
    assert uri == f"sqlite:///{home.resolve() / 'mlflow.db'}"
    assert mlflow.get_registry_uri() == uri
    client = MlflowClient()
    assert client.search_registered_models() == []
    return client


NAME = "clf"


def versions(client: MlflowClient, n: int, name: str = NAME) -> list[str]:
    """Register ``n`` versions of ``name`` from a dummy source."""
    client.create_registered_model(name)
    return [str(client.create_model_version(name, f"file:///nowhere/{name}/{i}").version) for i in range(n)]


def aliases(name: str = NAME) -> dict[str, str | None]:
    return {alias: tracking.alias_version(name, alias) for alias in ("champion", "previous")}


# ---------------------------------------------------------------------------------------------- promote / rollback


def test_first_promotion_has_no_previous(registry: MlflowClient) -> None:
    versions(registry, 2)
    assert deploy.promote(NAME, "1") is None
    assert aliases() == {"champion": "1", "previous": None}


def test_promotion_keeps_the_replaced_champion_as_previous(registry: MlflowClient) -> None:
    versions(registry, 3)
    deploy.promote(NAME, "1")
    assert deploy.promote(NAME, "2") == "1"
    assert aliases() == {"champion": "2", "previous": "1"}
    assert deploy.promote(NAME, "3") == "2"
    assert aliases() == {"champion": "3", "previous": "2"}


def test_promoting_the_champion_again_changes_nothing(registry: MlflowClient) -> None:
    versions(registry, 2)
    deploy.promote(NAME, "1")
    deploy.promote(NAME, "2")
    assert deploy.promote(NAME, "2") == "2"
    assert aliases() == {"champion": "2", "previous": "1"}  # previous is not overwritten with the champion


def test_rollback_walks_back_along_the_history(registry: MlflowClient) -> None:
    versions(registry, 3)
    deploy.promote(NAME, "1")
    deploy.promote(NAME, "2")
    deploy.promote(NAME, "3")
    assert deploy.rollback(NAME) == ("3", "2")
    assert aliases() == {"champion": "2", "previous": "3"}
    assert deploy.rollback(NAME) == ("2", "1")  # a second rollback goes one further back, not to 3 again
    assert aliases() == {"champion": "1", "previous": "2"}
    with pytest.raises(deploy.ReleaseError, match="first version in its alias history"):
        deploy.rollback(NAME)
    assert aliases() == {"champion": "1", "previous": "2"}


def test_rollback_to_a_version_then_one_step_returns(registry: MlflowClient) -> None:
    versions(registry, 3)
    deploy.promote(NAME, "1")
    deploy.promote(NAME, "3")
    assert deploy.rollback(NAME, to="2") == ("3", "2")
    assert deploy.rollback(NAME) == ("2", "3")  # --to is a forward jump in the history; one step undoes it
    with pytest.raises(deploy.ReleaseError, match="already the champion"):
        deploy.rollback(NAME, to="3")


def test_rollback_without_history_falls_back_to_previous(registry: MlflowClient) -> None:
    versions(registry, 2)
    tracking.set_alias(NAME, "champion", "2")  # moved outside Nightshift: no history
    tracking.set_alias(NAME, "previous", "1")
    assert deploy.rollback(NAME) == ("2", "1")
    assert aliases() == {"champion": "1", "previous": "2"}


def test_rollback_without_previous_fails_and_keeps_the_champion(registry: MlflowClient) -> None:
    versions(registry, 1)
    deploy.promote(NAME, "1")
    with pytest.raises(deploy.ReleaseError, match="nothing to roll back to"):
        deploy.rollback(NAME)
    assert aliases() == {"champion": "1", "previous": None}


def test_restore_aliases_sets_and_removes(registry: MlflowClient) -> None:
    versions(registry, 3)
    deploy.promote(NAME, "2")
    deploy.promote(NAME, "3")
    deploy.restore_aliases(NAME, {"champion": "1", "previous": None})
    assert aliases() == {"champion": "1", "previous": None}
    deploy.restore_aliases(NAME, {"previous": None})  # removing an absent alias is fine
    deploy.restore_aliases(NAME, {"champion": None, "previous": "3"})
    assert aliases() == {"champion": None, "previous": "3"}


# ---------------------------------------------------------------------------------------------- release


class Check:
    """A validation (or live-server) check that records the champion alias when it ran."""

    def __init__(self, fail: bool = False, result: Any = None):
        self.fail, self.result, self.calls = fail, result, []

    def __call__(self, version: str) -> Any:
        self.calls.append((version, tracking.alias_version(NAME, "champion")))
        if self.fail:
            raise RuntimeError("infra validation failed: predictions: served predictions differ at canary rows [3]")
        return self.result


def test_release_validates_before_moving_the_alias(registry: MlflowClient) -> None:
    versions(registry, 2)
    deploy.promote(NAME, "1")
    check = Check(result={"p99_ms": 12.0})
    outcome = deploy.release(NAME, "2", True, "accuracy 0.91 >= 0.80", validate=check)
    assert (outcome.promoted, outcome.reason, outcome.champion_before, outcome.champion_after, outcome.canary) == (
        True, "accuracy 0.91 >= 0.80", "1", "2", {"p99_ms": 12.0})
    assert check.calls == [("2", "1")]  # the challenger was validated while champion still held v1
    assert aliases() == {"champion": "2", "previous": "1"}


def test_first_release_without_checks(registry: MlflowClient) -> None:
    versions(registry, 1)
    outcome = deploy.release(NAME, "1", True, "no champion yet")
    assert (outcome.promoted, outcome.champion_before, outcome.champion_after, outcome.canary) == (
        True, None, "1", None)
    assert aliases() == {"champion": "1", "previous": None}


def test_release_is_a_no_op_when_the_gate_failed(registry: MlflowClient) -> None:
    versions(registry, 3)
    deploy.promote(NAME, "1")
    deploy.promote(NAME, "2")
    check = Check()
    outcome = deploy.release(NAME, "3", False, "accuracy 0.40 < 0.50", validate=check)
    assert outcome.promoted is False
    assert outcome.reason == "gate failed: accuracy 0.40 < 0.50"
    assert (outcome.champion_before, outcome.champion_after) == ("2", "2")
    assert check.calls == []
    assert aliases() == {"champion": "2", "previous": "1"}


def test_release_is_a_no_op_for_the_current_champion(registry: MlflowClient) -> None:
    versions(registry, 2)
    deploy.promote(NAME, "1")
    deploy.promote(NAME, "2")
    check = Check()
    outcome = deploy.release(NAME, "2", True, "accuracy 0.9", validate=check)
    assert outcome.promoted is False and "already the champion" in outcome.reason
    assert (outcome.champion_before, outcome.champion_after) == ("2", "2")
    assert check.calls == []
    assert aliases() == {"champion": "2", "previous": "1"}


def test_a_stale_gate_does_not_promote(registry: MlflowClient) -> None:
    """Another run promoted v2 after this run's gate compared v3 with v1: v3 must not replace v2 unjudged."""
    versions(registry, 3)
    deploy.promote(NAME, "1")
    deploy.promote(NAME, "2")
    outcome = deploy.release(NAME, "3", True, "accuracy 0.95 within 0.01 of champion v1", gate_champion="1")
    assert outcome.promoted is False and "stale" in outcome.reason and "from v1 to v2" in outcome.reason
    assert aliases() == {"champion": "2", "previous": "1"}


def test_failed_validation_leaves_the_aliases_and_the_history_alone(registry: MlflowClient) -> None:
    from tasks.core import history

    versions(registry, 3)
    deploy.promote(NAME, "1")
    deploy.promote(NAME, "2")  # champion 2, previous 1
    moves_before = history.moves(NAME)
    check = Check(fail=True)
    with pytest.raises(deploy.ReleaseError) as err:
        deploy.release(NAME, "3", True, "accuracy 0.95", validate=check)
    assert check.calls == [("3", "2")]
    assert aliases() == {"champion": "2", "previous": "1"}
    assert history.moves(NAME) == moves_before  # nothing moved, so nothing to record
    message = str(err.value)
    assert "v3 not promoted" in message and "predictions" in message and "rows [3]" in message
    assert isinstance(err.value.__cause__, RuntimeError)


def test_failed_switch_reverts_champion_and_previous(registry: MlflowClient) -> None:
    from tasks.core import history

    versions(registry, 3)
    deploy.promote(NAME, "1")
    deploy.promote(NAME, "2")
    switch = Check(fail=True)
    with pytest.raises(deploy.ReleaseError, match="reverted, champion back to v2"):
        deploy.release(NAME, "3", True, "accuracy 0.95", validate=Check(), switch=switch)
    assert switch.calls == [("3", "3")]  # the live server was checked after the move
    assert aliases() == {"champion": "2", "previous": "1"}  # not previous=2, as the promotion had left it
    last = history.moves(NAME)[-2:]
    assert [(m.alias, m.from_version, m.to_version, m.action) for m in last] == [
        ("champion", "3", "2", "revert"), ("previous", "2", "1", "revert")]
    assert deploy.rollback_target(NAME) == "1"  # the reverted release is no step of the lineage


def test_failed_switch_of_the_first_release_leaves_no_champion(registry: MlflowClient) -> None:
    versions(registry, 1)
    with pytest.raises(deploy.ReleaseError, match="champion back to none"):
        deploy.release(NAME, "1", True, "no champion yet", switch=Check(fail=True))
    assert aliases() == {"champion": None, "previous": None}


def test_promotion_reason_refuses_a_failed_gate_unless_forced(registry: MlflowClient) -> None:
    registry.create_registered_model(NAME)
    for gate, reason in (("pass", "accuracy 0.81 >= 0.75"), ("fail", "accuracy 0.68 is below min_score 0.75")):
        registry.create_model_version(NAME, "file:///nowhere", tags={"nightshift.gate": gate,
                                                                     "nightshift.gate_reason": reason})
    assert "gate pass" in deploy.promotion_reason(NAME, "1", False, None)
    with pytest.raises(deploy.PromotionRefused, match=r"v2 failed its release gate \(accuracy 0.68 is below"):
        deploy.promotion_reason(NAME, "2", False, "hotfix")
    forced = deploy.promotion_reason(NAME, "2", True, "hotfix for ticket 12")
    assert forced == "forced past failed gate (accuracy 0.68 is below min_score 0.75): hotfix for ticket 12"


# ---------------------------------------------------------------------------------------------- smoke_test


class FakeModel:
    def __init__(self, labels: list[str]):
        self.labels, self.frames = labels, []

    def predict(self, frame: pd.DataFrame) -> pd.DataFrame:
        self.frames.append(frame)
        return pd.DataFrame({"label": self.labels})


def test_smoke_test_compares_served_with_offline_predictions(monkeypatch: pytest.MonkeyPatch) -> None:
    model = FakeModel(["a", "b", "a"])
    loaded = []
    monkeypatch.setattr(tracking, "load_pyfunc", lambda uri: loaded.append(uri) or model)
    assert deploy.smoke_test("models:/m@champion", [[0] * 4] * 3, ["a", "b", "a"], column="pixels") >= 0
    assert loaded == ["models:/m@champion"] and list(model.frames[0].columns) == ["pixels"]
    with pytest.raises(deploy.ReleaseError, match=r"rows \[1\]"):
        deploy.smoke_test("models:/m@champion", ["x", "y", "z"], ["a", "a", "a"])
    with pytest.raises(deploy.ReleaseError):  # fewer answers than inputs
        deploy.smoke_test("models:/m@champion", ["x", "y", "z", "w"], ["a", "b", "a", "a"])


def test_champion_rescoring_smoke_test_and_promote_expectations_predict_alike(monkeypatch: pytest.MonkeyPatch) -> None:
    # one predict_labels behind all three: labels as strings, the input column named as asked
    from tasks import stages

    model = FakeModel([1, 0])  # a model answering non-string labels
    model.metadata = SimpleNamespace(metadata={"task": "image-classification"})
    loaded: list[str] = []
    monkeypatch.setattr(tracking, "load_pyfunc", lambda uri: loaded.append(uri) or model)
    monkeypatch.setattr(tracking, "alias_version", lambda name, alias: "7")
    monkeypatch.setattr(tracking, "input_example", lambda uri: [[0] * 4, [1] * 4])
    version, scorer = stages.champion_scorer("m", "text")
    assert version == "7" and scorer is not None and loaded == []  # loaded on first use only
    assert scorer(("a", "b")) == ["1", "0"] and loaded == ["models:/m/7"]
    assert deploy.smoke_test("models:/m/7", ["a", "b"], ["1", "0"]) >= 0
    inputs, expected, column = deploy.registry_expectations("m", "7")
    assert (inputs, expected, column) == ([[0] * 4, [1] * 4], ["1", "0"], "pixels")
    assert [list(f.columns) for f in model.frames] == [["text"], ["text"], ["pixels"]]
    with pytest.raises(deploy.ReleaseError, match=r"rows \[0\]"):
        deploy.smoke_test("models:/m/7", ["a", "b"], ["0", "0"])


# ---------------------------------------------------------------------------------------------- register


@pytest.fixture
def registering(registry: MlflowClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """register() with a fake packaging.log_model (no pyfunc is logged), a real run, a real recipe, a fake kind."""
    from tasks.core import packaging
    from tasks.registry import recipe_from_dict

    logged: list[tuple[Any, ...]] = []

    def log_model(run_id: str, bundle_dir: Path, input_column: str, examples: list[Any], labels: list[str],
                  task: str) -> str:
        logged.append((run_id, Path(bundle_dir), input_column, list(examples), list(labels), task))
        return f"runs:/{run_id}/model"

    monkeypatch.setattr(packaging, "log_model", log_model)
    recipe = recipe_from_dict({"name": "reg-recipe", "data": {"train_path": "train.csv"}})
    run_id = tracking.start_run(tracking.ensure_experiment(recipe.name), "deploy")
    bundle_ref = StageRef(stage="package", fingerprint="bundle-fp", path=str(tmp_path / "bundle"))
    kind = SimpleNamespace(input_column="text", task="text-classification")

    def trained(fp: str) -> StageRef:
        return StageRef(stage="train", fingerprint=fp, path=str(tmp_path / fp), extra={"labels": ["neg", "pos"]})

    def evaluated(passed: bool, reason: str, accuracy: float) -> StageRef:
        return StageRef(stage="evaluate", fingerprint=f"eval-{reason}", path=str(tmp_path / "eval"),
                        extra={"decision": {"passed": passed, "reason": reason}, "test": {"accuracy": accuracy}})

    def call(train_fp: str, passed: bool, reason: str, accuracy: float = 0.9) -> register.RegisteredModel:
        return register.register(recipe, kind, trained(train_fp), evaluated(passed, reason, accuracy), bundle_ref,
                                 run_id, ["good", "bad", "ok", "extra"], "data-fp")

    return SimpleNamespace(call=call, logged=logged, recipe=recipe, run_id=run_id, client=registry)


def _tags(client: MlflowClient, name: str, version: str) -> dict[str, str]:
    return dict(client.get_model_version(name, version).tags)


def test_register_writes_lineage_and_gate_tags(registering: SimpleNamespace) -> None:
    name = registering.recipe.model_name
    got = registering.call("train-A", True, "accuracy 0.9000 >= 0.5 (no champion)")
    assert got == register.RegisteredModel(name=name, version="1", uri=f"models:/{name}/1", reused=False)
    tags = _tags(registering.client, name, "1")
    assert tags["nightshift.gate"] == "pass"
    assert tags["nightshift.gate_reason"] == "accuracy 0.9000 >= 0.5 (no champion)"
    assert tags[register.TRAIN_FP_TAG] == "train-A"
    assert tags["nightshift.data_fingerprint"] == "data-fp"
    assert tags["nightshift.config_hash"] == registering.recipe.config_hash()
    assert tags["metric.accuracy"] == "0.9"
    assert registering.client.get_model_version(name, "1").run_id == registering.run_id
    assert tracking.alias_version(name, "challenger") == "1"
    assert len(registering.logged) == 1
    run_id, _, column, examples, labels, task = registering.logged[0]
    assert (run_id, column, examples, labels, task) == (
        registering.run_id, "text", ["good", "bad", "ok", "extra"], ["neg", "pos"], "text-classification")


def test_gate_tags_are_not_rewritten_when_the_training_is_registered_again(registering: SimpleNamespace) -> None:
    name = registering.recipe.model_name
    registering.call("train-A", True, "accuracy 0.9000 >= 0.5 (no champion)")
    # same training fingerprint, judged again (now against a champion): the version is reused as it was
    again = registering.call("train-A", False, "accuracy 0.9000 < champion 0.95", accuracy=0.9)
    assert again.version == "1" and again.reused is True
    assert len(registering.logged) == 1  # nothing logged a second time
    tags = _tags(registering.client, name, "1")
    assert (tags["nightshift.gate"], tags["nightshift.gate_reason"]) == ("pass", "accuracy 0.9000 >= 0.5 (no champion)")
    assert [str(v.version) for v in registering.client.search_model_versions(f"name = '{name}'")] == ["1"]


def test_a_new_training_gets_its_own_version_and_gate_and_reuse_moves_the_challenger(
        registering: SimpleNamespace) -> None:
    name = registering.recipe.model_name
    registering.call("train-A", True, "first")
    second = registering.call("train-B", False, "accuracy 0.4000 < 0.5", accuracy=0.4)
    assert (second.version, second.reused) == ("2", False)
    assert (_tags(registering.client, name, "2")["nightshift.gate"],
            _tags(registering.client, name, "2")["nightshift.gate_reason"]) == ("fail", "accuracy 0.4000 < 0.5")
    assert tracking.alias_version(name, "challenger") == "2"
    back = registering.call("train-A", False, "whatever")
    assert (back.version, back.reused) == ("1", True)
    assert tracking.alias_version(name, "challenger") == "1"
    assert _tags(registering.client, name, "1")["nightshift.gate"] == "pass"
    assert _tags(registering.client, name, "2")["nightshift.gate"] == "fail"


# ---------------------------------------------------------------------------------------------- configure


def test_configure_follows_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings are re-read on every call: a new NIGHTSHIFT_HOME means a new embedded store, registry included."""
    _isolate_uri_env(monkeypatch)
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "a"))
    tracking.configure()
    monkeypatch.setenv("NIGHTSHIFT_HOME", str(tmp_path / "b"))
    uri = tracking.configure()
    expected = f"sqlite:///{(tmp_path / 'b').resolve() / 'mlflow.db'}"
    assert (uri, mlflow.get_registry_uri()) == (expected, expected)
