"""Validate stage for image recipes: check the ingested images, report on them, reject the unusable ones.

Input: the ingest output (``train.parquet``, optional ``test.parquet``: ``id, pixels, label``) and
its ``image_shape``. File-level facts (IDX magic numbers, header dimensions, byte counts, images
vs labels counts) were checked by ingest, which refuses a file that breaks them; this stage judges rows.

Rows are rejected (``rejects.parquet``) when their pixels are missing, their pixel count is not
H*W (``"has 780 pixels, expected 784 (28x28)"``), a pixel lies outside 0-255 (``"pixel values
outside 0-255 (min -3, max 300)"``: possible when the table comes from elsewhere than IDX), or their
label is missing or unknown. A label is unknown when ``data.labels`` is set and does not hold it;
when ``data.labels`` is null every train label is allowed and a test label never seen in train is
unknown. Every other row passes unchanged: blank images, duplicates and conflicts are only reported
here (clean drops them).

Statistics per split (over the rows that pass): label balance (counts, fractions, imbalance ratio,
rarest class), pixel range and intensity (mean, std, ink = non-zero pixels per image, faint images
whose brightest pixel is below 128), blank images (one grey level), exact duplicates (same pixels and
label as an earlier row), conflicts (same pixels, more than one label), and leakage (test images
identical to a train image). Checks against :class:`~tasks.core.config.ValidateConfig`: reject fraction,
blank fraction (``max_empty_fraction``), conflict fraction, leakage fraction, rarest-class fraction,
plus: train and test images have the same shape, train has rows and at least two labels. A value
above its threshold fails, a nonzero one at or below it warns; on failure the report goes to
``<store root>/validate/failed-<fingerprint>/`` and :class:`DataError` names every failing check.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import asdict
from typing import Any

import numpy as np
import pyarrow as pa

from tasks.core import checks as core_checks
from tasks.core.checks import (
    FAIL,
    OK,
    WARN,
    Check,
    ValidationResult,
    conflict_mask,
    duplicate_mask,
    label_balance,
)
from tasks.core.config import ValidateConfig
from tasks.core.rejects import reason_kind, rejects_schema
from tasks.core.store import ArtifactStore, DataError, StageRef, read_splits, stage_key
from tasks.vision import images
from tasks.vision.config import ImageRecipe

STAGE = "validate"
REJECTS_SCHEMA = rejects_schema(("label", pa.string()))
FAINT_BELOW = 128
EXAMPLES = 10


# --------------------------------------------------------------------------------------------
# rows


def pixel_reasons(table: pa.Table, n_pixels: int, shape_note: str, name: str) -> list[str | None]:
    """Rejection reason per row for its pixels (None when fine): missing, wrong count, outside 0-255."""
    column = table.column("pixels")
    typ = column.type
    if pa.types.is_fixed_size_list(typ) and pa.types.is_uint8(typ.value_type) and typ.list_size == n_pixels:
        nulls = column.is_null().to_numpy(zero_copy_only=False)
        return ["missing pixels" if bad else None for bad in nulls]
    if not (pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)) or not (
        pa.types.is_integer(typ.value_type)
    ):
        raise DataError(f"{STAGE}: {name}: schema check failed: column 'pixels' is {typ}, expected a list of integers")
    reasons: list[str | None] = []
    for row in column.to_pylist():
        if row is None:
            reasons.append("missing pixels")
        elif len(row) != n_pixels:
            reasons.append(f"has {len(row)} pixels, expected {n_pixels} ({shape_note})")
        elif any(v is None for v in row):
            reasons.append("missing pixel values")
        elif min(row) < 0 or max(row) > images.PIXEL_MAX:
            reasons.append(f"pixel values outside 0-{images.PIXEL_MAX} (min {min(row)}, max {max(row)})")
        else:
            reasons.append(None)
    return reasons


def label_reasons(labels: pa.ChunkedArray | pa.Array, allowed: list[str] | None, note: str) -> list[str | None]:
    """Rejection reason per row for its label: missing, or not in ``allowed``."""
    shown = ", ".join((allowed or [])[:20]) + (", ..." if allowed and len(allowed) > 20 else "")
    allowed_set = set(allowed) if allowed is not None else None
    out: list[str | None] = []
    for label in labels.to_pylist():
        if label is None or not label.strip():
            out.append("missing label")
        elif allowed_set is not None and label not in allowed_set:
            out.append(f"unknown label '{label}' ({note}: {shown})")
        else:
            out.append(None)
    return out


def canonical(table: pa.Table, name: str) -> pa.Table:
    """Check the columns exist and ids/labels are strings without null ids."""
    missing = [c for c in ("id", "pixels", "label") if c not in table.column_names]
    if missing:
        raise DataError(f"{STAGE}: {name}: schema check failed: missing column(s) {missing} "
                        f"(columns: {', '.join(table.column_names)})")
    table = table.select(["id", "pixels", "label"])
    for column in ("id", "label"):
        if not pa.types.is_string(table.schema.field(column).type):
            table = table.set_column(table.schema.get_field_index(column), column, table.column(column).cast(pa.string()))
    if table.column("id").null_count:
        raise DataError(f"{STAGE}: {name}: schema check failed: {table.column('id').null_count} null id(s)")
    return table.combine_chunks()


def _usable(table: pa.Table, reasons: list[str | None], n_pixels: int) -> tuple[pa.Table, pa.Table]:
    """(rows without a reason, as canonical uint8 images; rejected rows with their reasons)."""
    bad = np.array([r is not None for r in reasons], dtype=bool)
    good = table.filter(pa.array(~bad))
    pixels_type = images.pixels_type(n_pixels)
    if good.column("pixels").type != pixels_type:
        values = np.array(good.column("pixels").to_pylist(), dtype=np.int64).reshape(-1, n_pixels)
        good = images.table(good.column("id").combine_chunks(), values.astype(np.uint8),
                            good.column("label").combine_chunks())
    rejected = table.filter(pa.array(bad))
    rejects = pa.table({"id": rejected.column("id"), "reason": pa.array([r for r in reasons if r is not None], pa.string()),
                        "label": rejected.column("label")})
    return good.cast(images.schema(n_pixels)), rejects


def _with_split(rejects: pa.Table, split: str) -> pa.Table:
    return pa.table({"id": rejects.column("id"), "split": pa.array([split] * rejects.num_rows, pa.string()),
                     "reason": rejects.column("reason"), "label": rejects.column("label")}, schema=REJECTS_SCHEMA)


# --------------------------------------------------------------------------------------------
# statistics


def blank_mask(pixels: np.ndarray) -> np.ndarray:
    """Images with a single grey level (nothing drawn: an empty or corrupt scan)."""
    if len(pixels) == 0:
        return np.zeros(0, dtype=bool)
    return pixels.min(axis=1) == pixels.max(axis=1)


def pixel_stats(pixels: np.ndarray) -> dict[str, float]:
    """Pixel range and intensity of one split."""
    if len(pixels) == 0:
        return {"min": 0, "max": 0, "mean": 0.0, "std": 0.0, "ink_mean": 0.0, "faint_images": 0}
    ink = np.count_nonzero(pixels, axis=1)
    return {"min": int(pixels.min()), "max": int(pixels.max()), "mean": float(pixels.mean()),
            "std": float(pixels.std()), "ink_mean": float(ink.mean()),
            "faint_images": int(np.count_nonzero(pixels.max(axis=1) < FAINT_BELOW))}


def split_stats(table: pa.Table, expected: list[str] | None) -> dict[str, Any]:
    """Label balance, pixels, blank images, duplicates and conflicts of one split's passing rows."""
    pixels = images.to_numpy(table.column("pixels"))
    n = len(pixels)
    keys, _ = images.image_keys(pixels)
    label_codes, _ = core_checks.codes(table.column("label")) if n else (np.zeros(0, np.int64), [])
    duplicate, _ = duplicate_mask(keys, label_codes)
    conflict = conflict_mask(keys, label_codes)
    blank = blank_mask(pixels)
    ids = table.column("id").to_pylist()
    examples = []
    for k in np.unique(keys[conflict])[:EXAMPLES]:
        rows = np.flatnonzero(keys == k)
        examples.append({"ids": [ids[i] for i in rows[:5]],
                         "labels": dict(Counter(table.column("label")[int(i)].as_py() for i in rows))})
    return {
        "rows": n,
        "labels": label_balance(table.column("label"), expected),
        "pixels": pixel_stats(pixels),
        "blank": {"rows": int(blank.sum()), "fraction": float(blank.mean()) if n else 0.0,
                  "examples": [ids[i] for i in np.flatnonzero(blank)[:EXAMPLES]]},
        "duplicates": {"exact_rows": int(duplicate.sum()), "distinct_images": int(keys.max() + 1) if n else 0},
        "conflicts": {"rows": int(conflict.sum()), "images": len(np.unique(keys[conflict])),
                      "fraction": float(conflict.mean()) if n else 0.0, "examples": examples},
    }


def leakage_stats(train: pa.Table, test: pa.Table) -> dict[str, Any]:
    """Test images identical to a train image."""
    test_pixels = images.to_numpy(test.column("pixels"))
    in_train, first = images.shared_images(test_pixels, images.to_numpy(train.column("pixels")))
    leaked = int(in_train.sum())
    train_ids, test_ids = train.column("id").to_pylist(), test.column("id").to_pylist()
    examples = [{"test": test_ids[i], "train": train_ids[first[i]]} for i in np.flatnonzero(in_train)[:EXAMPLES]]
    return {"test_rows_leaked": leaked, "fraction": leaked / len(test_pixels) if len(test_pixels) else 0.0,
            "examples": examples}


# --------------------------------------------------------------------------------------------
# the checks


def validate_tables(
    train: pa.Table,
    test: pa.Table | None,
    cfg: ValidateConfig,
    labels: list[str] | None,
    image_shape: list[int] | tuple[int, int],
    ingest_rows: dict[str, int] | None = None,
    test_shape: list[int] | tuple[int, int] | None = None,
) -> ValidationResult:
    """Validate canonical train (and test) image tables: rejects, statistics, checks (see module doc).

    ``labels`` is ``data.labels`` or None; ``image_shape`` the train images' [H, W] (``test_shape``
    the test images', default the same); ``ingest_rows`` the ingest stage's ``input`` / ``rejected``.
    """
    height, width = (int(v) for v in image_shape)
    n_pixels = height * width
    shape_note = f"{height}x{width}"
    checks: list[Check] = []
    if test is not None and test_shape is not None and list(test_shape) != [height, width]:
        checks.append(Check("image_shape", FAIL, None, None, None, "test",
                            f"test images are {test_shape[0]}x{test_shape[1]}, train images {shape_note}"))
        n_test_pixels = int(test_shape[0]) * int(test_shape[1])
    else:
        checks.append(Check("image_shape", OK, None, None, None, None, f"all images are {shape_note}"))
        n_test_pixels = n_pixels

    train = canonical(train, "train.parquet")
    train_reasons = [p or lab for p, lab in zip(pixel_reasons(train, n_pixels, shape_note, "train.parquet"),
                                                label_reasons(train.column("label"), labels, "allowed"))]
    train_ok, train_rejects = _usable(train, train_reasons, n_pixels)
    if labels is not None:
        allowed, note = list(labels), "allowed"
    else:
        allowed, note = sorted(set(train_ok.column("label").to_pylist())), "not seen in train; train labels"
    parts = [_with_split(train_rejects, "train")]
    test_ok = None
    if test is not None:
        test = canonical(test, "test.parquet")
        test_note = f"{int(test_shape[0])}x{int(test_shape[1])}" if test_shape is not None else shape_note
        test_reasons = [p or lab for p, lab in zip(pixel_reasons(test, n_test_pixels, test_note, "test.parquet"),
                                                   label_reasons(test.column("label"), allowed, note))]
        test_ok, test_rejects = _usable(test, test_reasons, n_test_pixels)
        parts.append(_with_split(test_rejects, "test"))
    rejects = pa.concat_tables(parts).combine_chunks()

    n_in = train.num_rows + (test.num_rows if test is not None else 0)
    by_reason = dict(Counter(reason_kind(r) for r in rejects.column("reason").to_pylist()))
    ingest_rows = ingest_rows or {}
    ingest_input = int(ingest_rows.get("input", n_in))
    ingest_rejected = int(ingest_rows.get("rejected", 0))
    tables = {"train": train_ok, **({"test": test_ok} if test_ok is not None else {})}
    stats = {split: split_stats(t, labels if split == "train" else None) for split, t in tables.items()}

    checks.insert(0, Check("schema", OK, message="id, label: strings; pixels: lists of integers; no null ids"))
    reject_fraction = (ingest_rejected + rejects.num_rows) / ingest_input if ingest_input else 0.0
    checks.append(core_checks.max_check("reject_fraction", reject_fraction, cfg.max_reject_fraction, None,
                             "rejected rows (ingest + validate) / input"))
    pixel_problems = sum(v for k, v in by_reason.items() if "pixel" in k)
    checks.append(Check("pixels", WARN if pixel_problems else OK, float(pixel_problems), None, None, None,
                        f"{pixel_problems} row(s) with missing, too few/many or out-of-range pixels rejected"
                        if pixel_problems else f"every image has {n_pixels} pixels in 0-{images.PIXEL_MAX}"))
    unknown = sum(v for k, v in by_reason.items() if k in ("unknown label", "missing label"))
    checks.append(Check("labels", WARN if unknown else OK, float(unknown), None, None, None,
                        f"{unknown} row(s) with a missing or unknown label rejected" if unknown else "all labels known"))
    for split, s in stats.items():
        checks.append(core_checks.max_check("empty_fraction", s["blank"]["fraction"], cfg.max_empty_fraction, split,
                                 "blank images (one grey level) / rows; clean drops them"))
        checks.append(core_checks.max_check("conflict_fraction", s["conflicts"]["fraction"], cfg.max_conflict_fraction, split,
                                 "rows whose identical image carries another label / rows"))
        dup = s["duplicates"]["exact_rows"]
        checks.append(Check("duplicates", WARN if dup else OK, float(dup), None, None, split,
                            f"{split}: {dup} duplicate image(s) (same pixels and label as an earlier row; clean drops "
                            "them when clean.dedupe)" if dup else f"{split}: no duplicate images"))
    leak = None
    if test_ok is not None and n_test_pixels == n_pixels:
        leak = leakage_stats(train_ok, test_ok)
        checks.append(core_checks.max_check("leakage_fraction", leak["fraction"], cfg.max_leakage_fraction, "test",
                                 "test images identical to a train image / test rows"))
    balance = stats["train"]["labels"]
    checks += core_checks.balance_checks(train_ok.num_rows, balance, cfg)
    if "test" in stats:
        test_fractions = stats["test"]["labels"]["fractions"]
        shift = max((abs(f - test_fractions.get(k, 0.0)) for k, f in balance["fractions"].items()), default=0.0)
        checks.append(Check("label_shift", OK, float(shift), None, None, "test",
                            f"largest difference of a class's share between train and test: {shift:.4f}"))

    rows = {"input": n_in, "train": train_ok.num_rows, "test": test_ok.num_rows if test_ok is not None else 0,
            "rejected": rejects.num_rows}
    status = core_checks.overall_status(checks)
    report = {
        "stage": STAGE,
        "status": status,
        "thresholds": cfg.model_dump(mode="json"),
        "allowed_labels": labels,
        "image_shape": [height, width],
        "rows": {**rows, "ingest_input": ingest_input, "ingest_rejected": ingest_rejected,
                 "reject_fraction": reject_fraction},
        "rejects_by_reason": by_reason,
        "splits": stats,
        "leakage": leak,
        "checks": [asdict(c) for c in checks],
        "warnings": [c.message for c in checks if c.status == WARN],
    }
    return ValidationResult(train_ok, test_ok, rejects, report, checks)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as readable markdown tables."""
    fmt, esc = core_checks.fmt, core_checks.md_escape
    rows = report["rows"]
    h, w = report["image_shape"]
    summary = (f"Rows: ingest input {rows['ingest_input']}, validate input {rows['input']}, passed train "
               f"{rows['train']} / test {rows['test']}, rejected {rows['rejected']}.")
    out = [f"# Validation report (images {h}x{w}): {report['status'].upper()}", "", summary, "",
           *core_checks.checks_markdown(report)]
    for split, s in report["splits"].items():
        p = s["pixels"]
        out += ["", f"## {split} ({s['rows']} images)", "", "| label | rows | fraction |", "|---|---|---|"]
        fractions = s["labels"]["fractions"]
        out += [f"| {esc(str(k))} | {v} | {fmt(fractions[k])} |" for k, v in s["labels"]["counts"].items()]
        out += ["", "| statistic | value |", "|---|---|",
                f"| imbalance ratio (largest / smallest class) | {fmt(s['labels']['imbalance_ratio'])} |",
                f"| pixel min / max | {p['min']} / {p['max']} |",
                f"| pixel mean / std | {fmt(p['mean'])} / {fmt(p['std'])} |",
                f"| non-zero pixels per image (mean) | {fmt(p['ink_mean'])} |",
                f"| faint images (brightest pixel < {FAINT_BELOW}) | {p['faint_images']} |",
                f"| blank images | {s['blank']['rows']} |",
                (f"| duplicate images / distinct images | {s['duplicates']['exact_rows']} / "
                 f"{s['duplicates']['distinct_images']} |"),
                f"| conflicting rows / images | {s['conflicts']['rows']} / {s['conflicts']['images']} |"]
    if report.get("leakage"):
        leak = report["leakage"]
        out += ["", "## Leakage", "",
                f"{leak['test_rows_leaked']} test images ({fmt(leak['fraction'])}) are identical to a train image."]
        out += [f"- {e['test']} = {e['train']}" for e in leak["examples"]]
    return "\n".join(out) + "\n"


def _metrics(result: ValidationResult) -> dict[str, float]:
    report = result.report
    metrics = core_checks.report_metrics(report)
    for split, s in report["splits"].items():
        metrics[f"{split}.blank_rows"] = s["blank"]["rows"]
        metrics[f"{split}.duplicate_rows"] = s["duplicates"]["exact_rows"]
        metrics[f"{split}.conflict_rows"] = s["conflicts"]["rows"]
        metrics[f"{split}.pixel_mean"] = s["pixels"]["mean"]
        metrics[f"{split}.pixel_std"] = s["pixels"]["std"]
        metrics[f"{split}.ink_mean"] = s["pixels"]["ink_mean"]
    return {k: float(v) for k, v in metrics.items()}


def run(recipe: ImageRecipe, ingested: StageRef, store: ArtifactStore, force: bool = False) -> StageRef:
    """Validate the ingested images (cached by fingerprint); DataError when a check fails.

    ``rows``: ``input, train, test, rejected``; ``extra``: ``metrics``, ``log_files``, ``status``,
    ``warnings``, ``checks``, ``labels``, ``label_counts``, ``rejects_by_reason``, ``has_test``, ``image_shape``.
    """
    start = time.perf_counter()
    config = {"validate": recipe.validate_.model_dump(mode="json"), "labels": recipe.data.labels}
    key = stage_key(STAGE, config, [ingested.fingerprint], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit

    image_shape = ingested.extra["image_shape"]
    splits = read_splits(ingested)
    train, test = splits["train"], splits.get("test")
    test_shape = ingested.extra.get("image_shapes", {}).get("test")
    result = validate_tables(train, test, recipe.validate_, recipe.data.labels, image_shape, ingested.rows, test_shape)
    return core_checks.store_result(result, key, store, allowed_labels=recipe.data.labels,
                                      metrics=_metrics(result), started=start, render=render_markdown,
                                      extra={"image_shape": list(image_shape)})
