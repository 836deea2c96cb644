"""Stage: evaluate (tokens). Scores the challenger (and the re-scored champion) on the test split and gates it.

Entity-level seqeval scores, strict IOB2: ``f1``, ``precision``, ``recall`` and a per-type report;
``entity_confusion.png`` (gold type against predicted type, with a ``missed`` column for gold entities
no prediction overlaps and a ``spurious`` row for predictions no gold entity overlaps; an exact span
match counts first, then any overlap); ``errors.md``, a sample of sentences whose tags differ. The
gate (:func:`tasks.core.gate.gate`) compares ``evaluate.primary_metric`` (``f1``) with
``evaluate.min_score`` and with the champion re-scored on the same test split.

``predictions.json`` ``pred`` holds every test sentence's tags joined by spaces: the served model's
``label`` column for the same sentence (``KIND.examples`` sends the tokens joined by spaces).

Run alone: ``python -m flows.evaluate_model --config configs/wnut17.yaml`` (after train_model).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from tasks.core.checks import md_escape
from tasks.core.gate import gate
from tasks.core.kind import ChampionScorer
from tasks.core.store import ArtifactStore, StageRef, stage_key
from tasks.tokens.config import TokenRecipe
from tasks.tokens.loader import word_log_probs
from tasks.tokens.tags import OUTSIDE, entity_spans
from tasks.tokens.train import HEAD, decode, entity_scores, load_model, windows_of

STAGE = "evaluate"
MISSED, SPURIOUS = "missed", "spurious"


def per_type_report(y_true: list[list[str]], y_pred: list[list[str]]) -> dict[str, dict[str, float]]:
    """seqeval's per-type precision / recall / F1 / support (strict IOB2)."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    report = classification_report(y_true, y_pred, mode="strict", scheme=IOB2, output_dict=True, zero_division=0)
    return {k: {"precision": float(v["precision"]), "recall": float(v["recall"]), "f1": float(v["f1-score"]),
                "support": int(v["support"])} for k, v in report.items()}


def entity_confusion(y_true: list[list[str]], y_pred: list[list[str]], types: list[str]) -> tuple[list[str], list[str], np.ndarray]:
    """(row names, column names, counts): gold types + ``spurious`` against predicted types + ``missed``."""
    rows, cols = [*types, SPURIOUS], [*types, MISSED]
    matrix = np.zeros((len(rows), len(cols)), np.int64)
    for gold, pred in zip(y_true, y_pred):
        g_spans, p_spans = entity_spans(gold), entity_spans(pred)
        used = set()
        for kind, a, b in g_spans:
            exact = next((j for j, (_, c, d) in enumerate(p_spans) if (c, d) == (a, b) and j not in used), None)
            overlap = exact if exact is not None else next(
                (j for j, (_, c, d) in enumerate(p_spans) if c < b and a < d and j not in used), None)
            if overlap is None:
                matrix[rows.index(kind), cols.index(MISSED)] += 1
            else:
                used.add(overlap)
                matrix[rows.index(kind), cols.index(p_spans[overlap][0])] += 1
        for j, (kind, _, _) in enumerate(p_spans):
            if j not in used:
                matrix[rows.index(SPURIOUS), cols.index(kind)] += 1
    return rows, cols, matrix


def confusion_png(rows: list[str], cols: list[str], matrix: np.ndarray, path) -> None:
    """The entity confusion as a labelled heat map."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(5.0, 0.8 * len(cols) + 2), max(4.5, 0.7 * len(rows) + 2)))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    ax.set(xticks=range(len(cols)), yticks=range(len(rows)), xticklabels=cols, yticklabels=rows,
           xlabel="predicted type", ylabel="gold type", title="entity confusion (test)")
    ax.tick_params(axis="x", labelrotation=45)
    for (i, j), value in np.ndenumerate(matrix):
        ax.text(j, i, str(value), ha="center", va="center", fontsize=8,
                color="white" if value > matrix.max() / 2 else "black")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def _entities_text(tokens: list[str], tags: list[str]) -> str:
    return "; ".join(f"{' '.join(tokens[a:b])} [{k}]" for k, a, b in entity_spans(tags)) or "-"


def errors_markdown(ids: list[str], tokens: list[list[str]], y_true: list[list[str]], y_pred: list[list[str]],
                    limit: int) -> tuple[str, int]:
    """A markdown table of up to ``limit`` sentences whose predicted tags differ, and how many differ."""
    wrong = [i for i, (g, p) in enumerate(zip(y_true, y_pred)) if g != p]
    lines = ["# Tagging errors on the test split", "", (f"{len(wrong)} of {len(ids)} sentences have at least one wrong tag; "
                                                       f"the first {min(limit, len(wrong))}:"), "", "| id | sentence | gold entities | predicted entities |", "|---|---|---|---|"]
    for i in wrong[:limit]:
        lines.append(f"| {md_escape(ids[i])} | {md_escape(' '.join(tokens[i])[:200])} | "
                     f"{md_escape(_entities_text(tokens[i], y_true[i]))} | {md_escape(_entities_text(tokens[i], y_pred[i]))} |")
    return "\n".join(lines) + "\n", len(wrong)


def tags_from_labels(labels: list[str], lengths: list[int]) -> list[list[str]]:
    """Served ``label`` strings (tags joined by spaces) back to tag lists of the given lengths (padded with O)."""
    out = []
    for label, n in zip(labels, lengths):
        tags = label.split() if label else []
        out.append((tags + [OUTSIDE] * n)[:n])
    return out


def report_markdown(scores: dict[str, float], per_type: dict[str, dict[str, float]], decision: Any) -> str:
    lines = ["# Evaluation on the test split (entity level, seqeval strict IOB2)", "",
             f"- F1 **{scores['f1']:.4f}**, precision {scores['precision']:.4f}, recall {scores['recall']:.4f}",
             f"- gate: **{'pass' if decision.passed else 'fail'}**: {decision.reason}", "",
             "| type | precision | recall | F1 | support |", "|---|---|---|---|---|"]
    lines += [f"| {k} | {v['precision']:.3f} | {v['recall']:.3f} | {v['f1']:.3f} | {v['support']} |" for k, v in per_type.items()]
    return "\n".join(lines) + "\n"


def run(recipe: TokenRecipe, trained: StageRef, encoded: StageRef, store: ArtifactStore,
        champion_version: str | None = None, champion_scorer: ChampionScorer | None = None, force: bool = False) -> StageRef:
    """Score the trained tagger on ``encoded/test.parquet``, re-score the champion, apply the gate."""
    config = {"evaluate": recipe.evaluate.model_dump(mode="json"), "champion_version": champion_version}
    key = stage_key(STAGE, config, [trained.fingerprint, encoded.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit
    table = pq.read_table(encoded.file("test.parquet"))
    labels = json.loads(trained.file("labels.json").read_text())
    serving = trained.extra["special_ids"]
    model = load_model(trained)
    windows = windows_of(table, recipe.tokenizer.max_length, recipe.tokenizer.stride, serving["cls_id"], serving["sep_id"])
    log_probs = word_log_probs(model, windows, model.pad_id, HEAD, torch.device("cpu"))
    y_pred = decode(log_probs, labels, recipe.head.constrained_decoding)
    y_true = table.column("tags").to_pylist()
    tokens = table.column("tokens").to_pylist()
    ids = table.column("id").to_pylist()
    scores = entity_scores(y_true, y_pred)
    per_type = per_type_report(y_true, y_pred)
    champion = None
    if champion_scorer is not None:
        served = champion_scorer([" ".join(t) for t in tokens])
        champion = entity_scores(y_true, tags_from_labels(served, [len(t) for t in tokens]))
    metric = recipe.evaluate.primary_metric
    decision = gate(scores[metric], champion[metric] if champion else None, champion_version, recipe.evaluate)
    types = sorted({t[2:] for t in labels if t != OUTSIDE})
    rows, cols, matrix = entity_confusion(y_true, y_pred, types)
    metrics = {f"test_{k}": v for k, v in scores.items()}
    metrics.update({f"test_f1_{k}": v["f1"] for k, v in per_type.items() if k in types})
    if champion:
        metrics.update({f"champion_test_{k}": v for k, v in champion.items()})
    errors, n_wrong = errors_markdown(ids, tokens, y_true, y_pred, recipe.evaluate.error_samples)
    metrics["test_sentences_wrong"] = float(n_wrong)
    with store.writer(key) as w:
        w.write_json("report.json", {"test": {**scores, "per_type": per_type}, "champion": champion,
                                     "decision": decision.model_dump()})
        (w.path / "report.md").write_text(report_markdown(scores, per_type, decision))
        confusion_png(rows, cols, matrix, w.path / "entity_confusion.png")
        w.write_json("entity_confusion.json", {"rows": rows, "columns": cols, "matrix": matrix.tolist()})
        (w.path / "errors.md").write_text(errors)
        w.write_json("predictions.json", {"ids": ids, "pred": [" ".join(p) for p in y_pred]})
        return w.write_manifest(rows={"test": len(ids)}, extra={
            "metrics": metrics, "test": scores, "decision": decision.model_dump(),
            "log_files": ["report.json", "report.md", "entity_confusion.png", "entity_confusion.json", "errors.md"]})
