"""Stage: evaluate (multi-task). Every task is scored on its own test split by its own kind's evaluate
stage (the per-task view of the trained model, the champion's same task re-scored on the same split,
the task's own gate), then the per-task gate combines them: the challenger passes only when every task
reaches its own ``min_score`` and none regresses more than its own ``max_regression``
(:func:`tasks.core.gate.gate_tasks`). The decision names the failed tasks.

Output: ``gate.md`` (the per-task gate table under the rule it applies), ``report.json`` (per task: test
metrics, decision), ``tasks/<task>/`` (each task's own report files), ``predictions.json`` (the combined
``label`` answers on the deploy smoke test's inputs). ``extra["test"]`` is flat (``<task>.<metric>``,
as the registry tags need), ``extra["tasks_test"]`` nested per task.

Run alone: ``python -m flows.evaluate_model --config configs/multitask.yaml`` (after train_model).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from typing import Any

import pandas as pd
import torch

from models.multitask import MultiTaskModel
from tasks.core.gate import GateDecision, gate_tasks, tasks_gate_markdown
from tasks.core.kind import ChampionScorer
from tasks.core.store import ArtifactStore, DataError, StageRef, stage_key
from tasks.multi.config import MultiRecipe
from tasks.multi.predict import HEADS_DIR, MultiPredictor, task_labels
from tasks.multi.prep import TASKS_DIR, task_refs
from tasks.multi.serving import serving_facts
from tasks.multi.train import view_refs
from tasks.registry import kind_of

STAGE = "evaluate"
SMOKE_EXAMPLES = 32  # deploy's smoke-test sample (deploy.canary_size when larger): predictions.json covers these inputs


def task_scorer(scorer: ChampionScorer | None, task: str) -> Callable[[list[Any]], list[Any]] | None:
    """The champion's answers for one task: its combined ``label`` column, that task's part."""
    if scorer is None:
        return None
    return lambda inputs: task_labels(scorer(list(inputs)), task)


def examples(encoded: StageRef, n: int) -> list[str]:
    """The first ``n`` raw test inputs, the tasks in turn (each task's own first test inputs), as texts."""
    per_task = []
    for name, ref in task_refs(encoded).items():
        kind = kind_of_task(encoded, name)
        per_task.append([x if isinstance(x, str) else " ".join(map(str, x)) for x in kind.examples(ref, n)])
    out: list[str] = []
    for i in range(n):
        out += [items[i] for items in per_task if i < len(items)]
    return out[:n]


def kind_of_task(encoded: StageRef, name: str) -> Any:
    """The kind of task ``name`` of a combined stage output (recorded in the combined encode's ``task_kinds``)."""
    from tasks.registry import kind_named

    return kind_named(encoded.extra["task_kinds"][name])


def run(
    recipe: MultiRecipe, trained: StageRef, encoded: StageRef, store: ArtifactStore,
    champion_version: str | None = None, champion_scorer: ChampionScorer | None = None, force: bool = False,
) -> StageRef:
    """Each task's own evaluate stage on its own test split, then the per-task gate."""
    views, encoded_t = view_refs(trained), task_refs(encoded)
    subs = recipe.sub_recipes()
    evaluated: dict[str, StageRef] = {}
    for name, sub in subs.items():
        try:
            evaluated[name] = kind_of(sub).evaluate(sub, views[name], encoded_t[name], store, champion_version,
                                                    task_scorer(champion_scorer, name), force)
        except DataError as exc:
            raise DataError(f"tasks.{name}: {exc}") from None
    smoke = max(SMOKE_EXAMPLES, int(getattr(recipe.deploy, "canary_size", SMOKE_EXAMPLES)))
    config = {"champion_version": champion_version, "tasks": list(subs), "smoke_examples": smoke}
    key = stage_key(STAGE, config, [trained.fingerprint, encoded.fingerprint, *(r.fingerprint for r in evaluated.values())],
                    __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    decision = gate_tasks({name: GateDecision.model_validate(ref.extra["decision"]) for name, ref in evaluated.items()})
    nested = {name: dict(ref.extra["test"]) for name, ref in evaluated.items()}
    metrics: dict[str, float] = {}
    for name, ref in evaluated.items():
        metrics.update({f"{name}.{k}": v for k, v in ref.extra.get("metrics", {}).items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool)})
        metrics[f"{name}.gate_passed"] = float(decision.tasks[name].passed)
    metrics["gate_passed"] = float(decision.passed)
    metrics["tasks_failed"] = float(len(decision.failed))

    ckpt = torch.load(trained.file("model.pt"), map_location="cpu", weights_only=False)
    predictor = MultiPredictor.from_parts(MultiTaskModel.from_checkpoint(ckpt), trained.file(HEADS_DIR),
                                          serving_facts(recipe, trained))
    inputs = examples(encoded, smoke)
    pred = predictor.predict(pd.DataFrame({"text": inputs}))["label"].tolist() if inputs else []
    with store.writer(key) as w:
        for name, ref in evaluated.items():
            for file in ref.extra.get("log_files", []):
                if ref.file(file).exists():
                    target = w.path / TASKS_DIR / name / file
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(ref.file(file), target)
        (w.path / "gate.md").write_text(tasks_gate_markdown(decision))
        w.write_json("report.json", {"tasks": {name: {"test": nested[name], "decision": decision.tasks[name].model_dump()}
                                               for name in evaluated}, "decision": decision.model_dump()})
        w.write_json("predictions.json", {"ids": list(range(len(pred))), "inputs": inputs, "pred": pred})
        rows = {"test": sum(ref.rows.get("test", 0) for ref in evaluated.values()),
                **{f"{name}.test": ref.rows.get("test", 0) for name, ref in evaluated.items()}}
        return w.write_manifest(rows=rows, extra={
            "metrics": metrics, "decision": decision.model_dump(),
            "test": {f"{name}.{k}": v for name, test in nested.items() for k, v in test.items()},
            "tasks_test": nested, "log_files": ["gate.md", "report.json", TASKS_DIR],
            "tasks": {name: ref.model_dump(mode="json") for name, ref in evaluated.items()}})


def report_json(evaluated: StageRef) -> dict[str, Any]:
    return json.loads(evaluated.file("report.json").read_text())
