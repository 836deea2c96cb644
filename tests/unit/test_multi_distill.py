"""Distillation of a single-task teacher into a multi-task task (tasks.multi.distill): the target schedule,
the soft targets, the loader, the progress the fit loop hands it, and that a student trained on a teacher's
probabilities learns the teacher's answers rather than the gold labels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from tasks.core.batching import Loader, predict_loader
from tasks.core.fit import MODEL_FILE, fit_loader, score
from tasks.core.store import StageRef
from tasks.multi.distill import distilled, gold_share, soft_targets, teacher_probabilities
from tasks.multi.sampling import multitask_loader
from tasks.registry import recipe_from_dict, teacher_recipes
from tasks.text.loader import text_loader
from tests.unit.test_train import HEAD, cfg, small_model, split_from, synthetic


def test_linear_annealing_moves_the_target_from_the_teacher_to_the_gold_label() -> None:
    assert [gold_share(p, 1.0, "linear") for p in (0.0, 0.25, 0.999)] == [0.0, 0.25, 0.999]  # exactly the progress
    assert gold_share(0.0, 0.6, "linear") == pytest.approx(0.4) and gold_share(1.0, 0.6, "linear") == pytest.approx(1.0)
    assert gold_share(0.0, 0.3, "constant") == gold_share(0.9, 0.3, "constant") == pytest.approx(0.7)
    assert gold_share(0.5, 0.0, "linear") == 1.0  # weight 0: gold labels alone
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        gold_share(0.5, 1.5, "linear")


def test_soft_targets_are_distributions_between_the_gold_label_and_the_teacher() -> None:
    onehot = np.eye(3, dtype=np.float32)[[0, 2]]
    teacher = np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]], np.float32)
    np.testing.assert_allclose(soft_targets(onehot, teacher, 0.25), [[0.4, 0.375, 0.225], [0.45, 0.225, 0.325]], rtol=1e-6)
    np.testing.assert_allclose(soft_targets(onehot, teacher, 0.25).sum(1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(soft_targets(onehot, teacher, 1.0), onehot)
    np.testing.assert_array_equal(soft_targets(onehot, teacher, 0.0), teacher)


def test_the_distilled_loader_mixes_by_progress_and_the_multitask_loader_routes_it() -> None:
    a, b = synthetic(40, 0), synthetic(30, 1)
    teacher = np.full((40, 2), 0.5, np.float32)
    la = distilled(text_loader(a, 8, 0, "a"), a.labels, teacher, 1.0, "linear", "a")
    index = np.arange(8)
    onehot = np.eye(2, dtype=np.float32)[a.labels[index]]
    np.testing.assert_array_equal(la.targets_at(index, 0.0)["a"].numpy(), teacher[index])
    np.testing.assert_allclose(la.targets_at(index, 0.5)["a"].numpy(), 0.5 * onehot + 0.25, rtol=1e-6)
    assert torch.equal(la.targets(index)["a"], torch.from_numpy(a.labels[index]))  # targets alone stay the gold ids
    mixed = multitask_loader({"a": la, "b": text_loader(b, 8, 0, "b")}, {"a": 8, "b": 8}, seed=3)
    np.testing.assert_allclose(mixed.targets_at(index, 0.5)["a"].numpy(), 0.5 * onehot + 0.25, rtol=1e-6)
    assert torch.equal(mixed.targets_at(np.arange(40, 44), 0.5)["b"], torch.from_numpy(b.labels[:4]))
    plain = multitask_loader({"b": text_loader(b, 8, 0, "b"), "c": text_loader(a, 8, 0, "c")}, {"b": 8, "c": 8}, seed=3)
    assert plain.progress_targets is None


def test_the_fit_loop_hands_the_targets_each_steps_progress() -> None:
    train = synthetic(64, 0)
    seen: list[float] = []
    base = text_loader(train, 16, 0, HEAD)

    def progress_targets(index: np.ndarray, progress: float) -> dict[str, torch.Tensor]:
        seen.append(progress)
        return base.targets(index)

    loader = Loader(size=base.size, batches=base.batches, inputs=base.inputs, targets=base.targets,
                    progress_targets=progress_targets)
    fit_loader(small_model(), loader, lambda m, d: {"accuracy": 0.0}, cfg(epochs=3, batch_size=16), "accuracy",
               progress=False)
    assert seen == [step / 12 for step in range(12)]  # 3 epochs of 4 batches: 0, 1/12, ..., 11/12


def test_a_student_on_constant_teacher_targets_learns_the_teachers_answers_not_the_gold_labels() -> None:
    """The teacher answers the opposite of the gold label: with the teacher's whole share the student must
    follow it, so the soft targets, not the labels, reach the loss."""
    train, val = synthetic(800, 0), synthetic(200, 1)
    flipped = np.eye(2, dtype=np.float32)[1 - train.labels] * 0.9 + 0.05
    loader = distilled(text_loader(train, 32, 0, HEAD), train.labels, flipped, 1.0, "constant", HEAD)
    val_loader = text_loader(val, 64, 0, HEAD)

    def validate_against(labels: np.ndarray):
        return lambda m, device: score(labels, predict_loader(m, val_loader, device, HEAD).argmax(1))

    # the best epoch is picked by agreement with the teacher's answers, the opposite of the gold labels
    taught = fit_loader(small_model(), loader, validate_against(1 - val.labels), cfg(), "accuracy", progress=False)
    assert taught.best_score > 0.9
    # with linear annealing the run ends on the gold labels: it learns the task despite that teacher
    annealed = distilled(text_loader(train, 32, 0, HEAD), train.labels, flipped, 1.0, "linear", HEAD)
    result = fit_loader(small_model(), annealed, validate_against(val.labels), cfg(epochs=6), "accuracy", progress=False)
    assert result.history[-1]["val_accuracy"] > 0.8


def word_tokenizer(words: list[str]) -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def test_teacher_probabilities_read_the_rows_text_with_the_teachers_own_tokenizer(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    # the student's rows hold token ids of some other vocabulary: only their text may reach the teacher
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "x", "good", *[f"w{i}" for i in range(24)]]
    teacher_dir, rows_dir = tmp_path / "teacher", tmp_path / "rows"
    teacher_dir.mkdir()
    rows_dir.mkdir()
    model = small_model().eval()
    torch.save(model.checkpoint(labels=["0", "1"]), teacher_dir / MODEL_FILE)
    word_tokenizer(words).save(str(teacher_dir / "tokenizer.json"))
    texts = ["w1 good w2", "w3 w4", "good"]
    pq.write_table(pa.table({"id": ["a", "b", "c"], "text": texts, "label": ["1", "0", "1"],
                             "label_id": pa.array([1, 0, 1], pa.int64()),
                             "input_ids": pa.array([[9, 9], [9], [9, 9, 9]], pa.list_(pa.int32())),
                             "length": pa.array([2, 1, 3], pa.int32())}), rows_dir / "train.parquet")
    teacher = StageRef(stage="train", fingerprint="t" * 64, path=str(teacher_dir), extra={"labels": ["0", "1"]})
    probs = teacher_probabilities(teacher, StageRef(stage="augment", fingerprint="r" * 64, path=str(rows_dir)),
                                  ["0", "1"], "cpu")
    ids = [[words.index(w) for w in t.split()] for t in texts]
    expected = predict_loader(model, text_loader(split_from(ids, [1, 0, 1]), 8, 0, HEAD), torch.device("cpu"), HEAD)
    np.testing.assert_allclose(probs, expected, rtol=1e-5)
    with pytest.raises(ValueError, match=r"tasks.s.distill: the teacher's label map \['0', '1'\] is not the task's \['1', '0'\]"):
        teacher_probabilities(teacher, StageRef(stage="augment", fingerprint="r" * 64, path=str(rows_dir)),
                              ["1", "0"], "cpu", "tasks.s.distill")


def multi(distill: dict | None, task: str = "text-classification") -> dict:
    data = {"train_path": "x.csv"}
    spec = {"task": task, "data": data, **({"distill": distill} if distill is not None else {})}
    return {"name": "m", "task": "multi-task",
            "tasks": {"s": spec, "o": {"task": "text-classification", "data": data}}}


def test_teacher_recipes_load_with_their_overrides_and_bad_ones_name_the_key(tmp_path: Path) -> None:
    teacher = tmp_path / "teacher.yaml"
    teacher.write_text("name: t\ntask: text-classification\ndata: {train_path: x.csv}\n")
    recipe = recipe_from_dict(multi({"teacher": str(teacher), "teacher_set": ["train.max_steps=7"]}))
    loaded = teacher_recipes(recipe)
    assert list(loaded) == ["s"] and loaded["s"].name == "t" and loaded["s"].train.max_steps == 7
    assert teacher_recipes(recipe_from_dict(multi(None))) == {}
    with pytest.raises(ValueError, match=r"tasks.s.distill.teacher: .*missing.yaml: recipe file not found"):
        teacher_recipes(recipe_from_dict(multi({"teacher": str(tmp_path / "missing.yaml")})))
    token = tmp_path / "tokens.yaml"
    token.write_text("name: k\ntask: token-classification\ndata: {train_path: x.conll, format: conll}\n")
    with pytest.raises(ValueError, match=r"tasks.s.distill.teacher: .*tokens.yaml is a token-classification recipe; "
                                         r"task s is text-classification"):
        teacher_recipes(recipe_from_dict(multi({"teacher": str(token)})))
    with pytest.raises(ValueError, match=r"tasks.s.distill"):  # a tagging task has no distill key
        recipe_from_dict(multi({"teacher": str(teacher)}, task="token-classification"))
    with pytest.raises(ValueError, match=r"weight"):
        recipe_from_dict(multi({"teacher": str(teacher), "weight": 2}))
