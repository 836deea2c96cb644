"""The pipeline on a tiny multi-task recipe whose SST-2 task distils a single-task teacher
(``tasks.sst2.distill``): Prefect's test harness, MLflow in tmp_path.

The teacher is a scratch text classifier with its own tokenizer (trained on SST-2 alone), the student a
scratch encoder whose tokenizer is trained on both tasks, so the teacher must read the rows' text, not
their ids. Two runs in one NIGHTSHIFT_HOME: the first prepares and trains the teacher, then the student; the
second changes only the teacher's seed, so the teacher's prep and the student's are cache hits while the
teacher and then the student train again.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tasks.registry import recipe_from_dict
from tests.flows.test_multitask_pipeline import ROOT, tiny

pytestmark = pytest.mark.slow

TEACHER = {
    "name": "tiny-teacher",
    "task": "text-classification",
    "data": {"train_path": "data/sst2/train.parquet", "test_path": "data/sst2/dev.parquet", "text_column": "sentence",
             "label_column": "label", "labels": ["0", "1"], "max_rows": 5000},
    "model": {"arch": "scratch", "d_model": 64, "n_layers": 1, "n_heads": 2, "d_ff": 128},
    "tokenizer": {"vocab_size": 2000, "max_length": 64},
    "train": {"epochs": 2, "batch_size": 64, "lr": 0.002},
}


def student(teacher: Path, teacher_set: list[str]) -> dict:
    recipe = tiny()
    recipe["name"] = "tiny-distil"
    recipe["tasks"]["sst2"]["distill"] = {"teacher": str(teacher), "teacher_set": teacher_set, "weight": 0.8}
    return recipe


@pytest.fixture(scope="module")
def runs(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    home = tmp_path_factory.mktemp("home")
    teacher = tmp_path_factory.mktemp("recipes") / "teacher.yaml"
    teacher.write_text(yaml.safe_dump(TEACHER))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NIGHTSHIFT_HOME", str(home))
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.chdir(ROOT)
        summaries = [pipeline(recipe_from_dict(student(teacher, teacher_set)))
                     for teacher_set in ([], ["train.seed=8"])]
        yield {"home": home, "summaries": summaries}


def stage_runs(summary: dict, experiment: str, kind: str = "train") -> list:
    """The experiment's MLflow runs of one kind (train, prep), oldest first."""
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id], f"tags.`nightshift.kind` = '{kind}'",
                              order_by=["attributes.start_time ASC"])


def test_the_teacher_trains_first_as_its_own_recipe_and_the_student_names_it(runs) -> None:
    first = runs["summaries"][0]
    assert first["status"] == "completed" and first["decision"]["promoted"] is True
    # SST-2 dev's majority class is 0.509: the distilled sentence head must clear it
    assert first["metrics"]["test"]["sst2"]["accuracy"] > 0.62
    teachers = stage_runs(first, "tiny-teacher")
    assert len(teachers) == 2 and all(r.info.status == "FINISHED" for r in teachers)
    mlflow.set_tracking_uri(first["mlflow"]["tracking_uri"])
    train = MlflowClient().get_run(first["mlflow"]["stage_runs"]["train"])
    assert train.data.tags["nightshift.teacher.sst2.run_id"] == teachers[0].info.run_id
    assert train.data.tags["nightshift.teacher.sst2.fingerprint"] == teachers[0].data.tags["nightshift.fingerprint.train"]
    assert {"sst2.train_loss", "wnut17.train_loss", "epoch_sst2.val_accuracy"} <= set(train.data.metrics)


def test_a_changed_teacher_trains_again_and_so_does_the_student_on_cached_prep(runs) -> None:
    first, second = runs["summaries"]
    assert [r.data.tags["nightshift.cache.train"] for r in stage_runs(first, "tiny-teacher")] == ["miss", "miss"]
    teacher_prep = stage_runs(first, "tiny-teacher", "prep")[1].data.tags
    assert all(teacher_prep[f"nightshift.cache.{stage}"] == "hit" for stage in ("ingest", "split", "encode", "augment"))
    students = stage_runs(first, "tiny-distil")
    assert [r.data.tags["nightshift.cache.train"] for r in students] == ["miss", "miss"]
    assert all(v == "hit" for v in second["cache_tasks"]["sst2"].values())  # the student's prep did not move
    assert (students[1].data.tags["nightshift.teacher.sst2.fingerprint"]
            != students[0].data.tags["nightshift.teacher.sst2.fingerprint"])
