"""Ingest stage (tokens): read CoNLL column files, JSON lines or parquet into canonical sentences
``id: string, tokens: list<string>, tags: list<string>`` with IOB2 tags.

* ``conll``: one token per line, fields separated by ``data.delimiter`` (default: any run of spaces
  or tabs), a blank line between sentences; a line whose first field is ``data.docstart``
  (``-DOCSTART-``) is a document marker and skipped. ``data.columns`` names the fields in file
  order (default ``[token, tag]``); ``data.text_column`` / ``data.label_column`` pick the token and
  the tag (default ``token`` / ``tag``). CoNLL-2003: ``columns: [token, pos, chunk, ner]``,
  ``label_column: ner``, ``tag_scheme: iob1``. ``data.has_header`` does not apply.
* ``jsonl``: one object per line with a list of token strings and a list of tag strings
  (default keys ``tokens`` / ``tags``); ``parquet``: the same as list columns.

Tags are converted from ``data.tag_scheme`` (iob1, iob2, bioes) to IOB2. Text files are decoded as in
text ingest (``data.encoding``, ``errors="replace"``, counted; BOM dropped; CR-only files split).

A malformed line rejects its whole sentence, the reason naming the line: ``wrong field count
(line 7): expected 4 (token, pos, chunk, ner), got 3``, ``token without a tag (line 7)``, ``tag
matches no scheme (line 7): tag 'X-LOC' ...``. Row ids are ``"<file name>:<first line of the sentence>"`` (row index + 1 for parquet).
``data.max_rows`` caps the sentences read per file. Rows in = accepted + rejected, per file.

Run alone: part of ``python -m flows.prepare_data --config configs/wnut17.yaml``.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tasks.core.rejects import (
    metric_name,
    reason_kind,
    rejects_sample,
    rejects_schema,
    write_csv_sample,
)
from tasks.core.sources import (
    display_names,
    file_fingerprint,
    ingest_config,
    resolve_paths,
)
from tasks.core.store import ArtifactStore, DataError, StageRef, bounded, stage_key
from tasks.text.ingest import decode, physical_lines, read_bytes, strip_line_break
from tasks.tokens.config import TokenDataConfig, TokenRecipe
from tasks.tokens.tags import bad_tag, entity_types, to_iob2

STAGE = "ingest"
LIST = pa.list_(pa.string())
SCHEMA = pa.schema([("id", pa.string()), ("tokens", LIST), ("tags", LIST)])
REJECTS_SCHEMA = rejects_schema(("tokens", LIST), ("tags", LIST), ("raw", pa.string()))
RAW_LINES = 5  # lines of a rejected sentence kept in its ``raw`` column


@dataclass
class Sentences:
    """Sentences read from one file: accepted, rejected with reasons, counters."""

    name: str
    ids: list[str] = field(default_factory=list)
    tokens: list[list[str]] = field(default_factory=list)
    tags: list[list[str]] = field(default_factory=list)
    rejects: dict[str, list[Any]] = field(default_factory=lambda: {"id": [], "reason": [], "tokens": [], "tags": [], "raw": []})
    replaced_chars: int = 0
    docstarts: int = 0
    truncated: bool = False

    @property
    def rows_input(self) -> int:
        return len(self.ids) + len(self.rejects["id"])

    def accept(self, row_id: str, tokens: list[str], tags: list[str]) -> None:
        self.ids.append(row_id)
        self.tokens.append(tokens)
        self.tags.append(tags)

    def reject(self, row_id: str, reason: str, tokens: list[str] | None, tags: list[str] | None, raw: str | None) -> None:
        for key, value in (("id", row_id), ("reason", reason), ("tokens", tokens), ("tags", tags), ("raw", raw)):
            self.rejects[key].append(value)

    def table(self) -> pa.Table:
        return pa.table({"id": pa.array(self.ids, pa.string()), "tokens": pa.array(self.tokens, LIST),
                         "tags": pa.array(self.tags, LIST)}, schema=SCHEMA)

    def rejects_table(self, split: str) -> pa.Table:
        r = self.rejects
        return pa.table({"id": pa.array(r["id"], pa.string()), "split": pa.array([split] * len(r["id"]), pa.string()),
                         "reason": pa.array(r["reason"], pa.string()), "tokens": pa.array(r["tokens"], LIST),
                         "tags": pa.array(r["tags"], LIST), "raw": pa.array(r["raw"], pa.string())},
                        schema=REJECTS_SCHEMA)


def check_sentence(tokens: list[str], tags: list[str], scheme: str) -> tuple[list[str] | None, str | None]:
    """IOB2 tags of one sentence, or the reason it is refused (for jsonl / parquet rows)."""
    if len(tokens) != len(tags):
        return None, f"tokens and tags differ in length ({len(tokens)} tokens, {len(tags)} tags)"
    if not tokens:
        return None, "empty sentence (no tokens)"
    for i, tag in enumerate(tags):
        if (why := bad_tag(tag, scheme)) is not None:
            return None, f"tag matches no scheme (token {i + 1}): {why}"
    return to_iob2(tags, scheme), None


def read_conll(text: str, cfg: TokenDataConfig, out: Sentences, path: Path) -> None:
    """CoNLL column lines -> sentences (see the module docstring)."""
    columns = cfg.conll_columns()
    token_name, tag_name = cfg.columns_for("conll")
    missing = [c for c in (token_name, tag_name) if c not in columns]
    if missing:
        raise DataError(f"{path}: data.columns {columns} has no column {', '.join(repr(m) for m in missing)} "
                        "(set data.text_column / data.label_column)")
    token_pos, tag_pos, n_fields = columns.index(token_name), columns.index(tag_name), len(columns)
    lines = [strip_line_break(line) for line in physical_lines(text)]
    start: int | None = None
    tokens: list[str] = []
    tags: list[str] = []
    problem: str | None = None

    def close(end: int) -> None:
        nonlocal start, tokens, tags, problem
        if start is not None:
            row_id = f"{out.name}:{start + 1}"
            if problem is not None:
                out.reject(row_id, problem, tokens, tags, "\n".join(lines[start:min(end, start + RAW_LINES)]))
            else:
                out.accept(row_id, tokens, to_iob2(tags, cfg.tag_scheme))
        start, tokens, tags, problem = None, [], [], None

    for index, line in enumerate(lines):
        if not line.strip():
            close(index)
            continue
        fields = line.split() if cfg.delimiter is None else [f.strip() for f in line.split(cfg.delimiter)]
        if fields and fields[0] == cfg.docstart:
            close(index)
            out.docstarts += 1
            continue
        if start is None:
            if cfg.max_rows is not None and out.rows_input >= cfg.max_rows:
                out.truncated = True
                break
            start = index
        if problem is not None:
            continue
        where = f"line {index + 1}"
        if len(fields) != n_fields:
            problem = (f"token without a tag ({where})" if len(fields) == 1 and n_fields >= 2 else
                       f"wrong field count ({where}): expected {n_fields} ({', '.join(columns)}), got {len(fields)}")
            continue
        tag = fields[tag_pos]
        if (why := bad_tag(tag, cfg.tag_scheme)) is not None:
            problem = f"tag matches no scheme ({where}): {why}"
            continue
        tokens.append(fields[token_pos])
        tags.append(tag)
    close(len(lines))


def _string_list(value: Any) -> list[str] | None:
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def read_jsonl(text: str, cfg: TokenDataConfig, out: Sentences, path: Path) -> None:
    """One object per line with list-of-string token and tag keys; a bad line rejects that sentence."""
    token_key, tag_key = cfg.columns_for("jsonl")
    for index, line in enumerate(strip_line_break(x) for x in physical_lines(text)):
        if not line.strip():
            continue
        if cfg.max_rows is not None and out.rows_input >= cfg.max_rows:
            out.truncated = True
            break
        row_id = f"{out.name}:{index + 1}"
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as exc:
            out.reject(row_id, f"bad JSON (line {index + 1}): {getattr(exc, 'msg', 'nested too deeply')}", None, None, bounded(line))
            continue
        if not isinstance(obj, dict):
            out.reject(row_id, f"bad JSON (line {index + 1}): expected an object", None, None, bounded(line))
            continue
        tokens, tags = _string_list(obj.get(token_key)), _string_list(obj.get(tag_key))
        if tokens is None or tags is None:
            bad = token_key if tokens is None else tag_key
            out.reject(row_id, f"missing or malformed key (line {index + 1}): {bad!r} must be a list of strings", tokens, tags, bounded(line))
            continue
        converted, why = check_sentence(tokens, tags, cfg.tag_scheme)
        if why is not None:
            out.reject(row_id, f"{why} (line {index + 1})", tokens, tags, bounded(line))
        else:
            out.accept(row_id, tokens, converted)


def read_parquet(path: Path, cfg: TokenDataConfig, out: Sentences) -> None:
    """List columns of tokens and tags; a null or mismatched row rejects that sentence."""
    token_col, tag_col = cfg.columns_for("parquet")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable parquet file: {bounded(str(exc))}") from None
    missing = [c for c in (token_col, tag_col) if c not in table.column_names]
    if missing:
        raise DataError(f"{path}: missing column {', '.join(repr(m) for m in missing)} (columns: {bounded(', '.join(table.column_names))})")
    for col in (token_col, tag_col):
        typ = table.schema.field(col).type
        if not (pa.types.is_list(typ) or pa.types.is_large_list(typ)):
            raise DataError(f"{path}: column {col!r} has type {typ}, expected a list of strings")
    if cfg.max_rows is not None and table.num_rows > cfg.max_rows:
        table, out.truncated = table.slice(0, cfg.max_rows), True
    for i, (tokens, tags) in enumerate(zip(table.column(token_col).to_pylist(), table.column(tag_col).to_pylist())):
        row_id = f"{out.name}:{i + 1}"
        if tokens is None or tags is None or any(t is None for t in tokens) or any(t is None for t in tags):
            out.reject(row_id, f"null tokens or tags (row {i + 1})", None, None, None)
            continue
        converted, why = check_sentence([str(t) for t in tokens], [str(t) for t in tags], cfg.tag_scheme)
        if why is not None:
            out.reject(row_id, f"{why} (row {i + 1})", [str(t) for t in tokens], [str(t) for t in tags], None)
        else:
            out.accept(row_id, [str(t) for t in tokens], converted)


def read_file(path: Path, name: str, cfg: TokenDataConfig) -> Sentences:
    """Read one file into accepted and rejected sentences."""
    try:
        fmt = cfg.format_for(str(path))
    except ValueError as exc:
        raise DataError(f"{path}: {exc}") from None
    out = Sentences(name=name)
    if fmt == "parquet":
        read_parquet(path, cfg, out)
    else:
        raw = read_bytes(path)
        if not raw.strip():
            raise DataError(f"{path}: empty file")
        try:
            text, out.replaced_chars = decode(raw, cfg.encoding)
        except LookupError:
            raise DataError(f"{path}: unknown encoding {cfg.encoding!r}") from None
        (read_conll if fmt == "conll" else read_jsonl)(text, cfg, out, path)
    if out.rows_input == 0:
        raise DataError(f"{path}: no sentences ({fmt})")
    return out


def run(recipe: TokenRecipe, store: ArtifactStore, force: bool = False, base_dir: Path | None = None) -> StageRef:
    """Ingest the recipe's train (and test) files into the store; cached by fingerprint.

    ``rows``: ``input, accepted, rejected, train, test`` (sentences); ``extra``: metrics, log files,
    per-file counts, ``has_test``, ``rejects_by_reason`` and ``labels_seen`` (entity types of train).
    """
    started = time.perf_counter()
    cfg = recipe.data
    specs = {"train": cfg.train_path, **({"test": cfg.test_path} if cfg.test_path else {})}
    paths = {split: resolve_paths(spec, base_dir) for split, spec in specs.items()}
    key = stage_key(STAGE, ingest_config(cfg), [file_fingerprint(p) for p in paths.values()], __name__)
    if (hit := store.cached(key, force)) is not None:
        return hit

    files = {split: [read_file(p, n, cfg) for p, n in zip(ps, display_names(ps))] for split, ps in paths.items()}
    tables = {split: pa.concat_tables([f.table() for f in fs]).combine_chunks() for split, fs in files.items()}
    rejects = pa.concat_tables([f.rejects_table(split) for split, fs in files.items() for f in fs]).combine_chunks()
    rows = {"input": sum(f.rows_input for fs in files.values() for f in fs),
            "accepted": sum(t.num_rows for t in tables.values()), "rejected": rejects.num_rows,
            "train": tables["train"].num_rows, "test": tables["test"].num_rows if "test" in tables else 0}
    if rows["accepted"] + rows["rejected"] != rows["input"]:  # pragma: no cover - invariant
        raise RuntimeError(f"{STAGE}: row accounting broken: {rows}")

    by_reason = dict(Counter(reason_kind(r) for r in rejects.column("reason").to_pylist()))
    metrics: dict[str, float] = {"rows_input": rows["input"], "rows_accepted": rows["accepted"],
                                 "rows_rejected": rows["rejected"],
                                 "replaced_chars": sum(f.replaced_chars for fs in files.values() for f in fs),
                                 "docstarts": sum(f.docstarts for fs in files.values() for f in fs),
                                 "files": sum(len(fs) for fs in files.values())}
    for split, fs in files.items():
        metrics[f"{split}.rows_input"] = sum(f.rows_input for f in fs)
        metrics[f"{split}.rows_accepted"] = tables[split].num_rows
        metrics[f"{split}.tokens"] = sum(len(t) for f in fs for t in f.tokens)
    for kind, count in by_reason.items():
        metrics[f"rejected.{metric_name(kind)}"] = count
    metrics["duration_s"] = round(time.perf_counter() - started, 4)
    labels_seen = sorted({t for f in files["train"] for tags in f.tags for t in entity_types(tags)})
    files_info = {split: [{"name": f.name, "rows_input": f.rows_input, "rows_accepted": len(f.ids),
                           "rows_rejected": len(f.rejects["id"]), "replaced_chars": f.replaced_chars,
                           "docstarts": f.docstarts, "stopped_at_max_rows": f.truncated} for f in fs]
                  for split, fs in files.items()}
    report = {"rows": rows, "files": files_info, "rejects_by_reason": by_reason, "labels_seen": labels_seen,
              "tag_scheme": cfg.tag_scheme}
    extra = {"metrics": {k: float(v) for k, v in metrics.items()}, "log_files": ["ingest_report.json", "rejects_sample.csv"],
             "files": files_info, "has_test": "test" in tables, "rejects_by_reason": by_reason, "labels_seen": labels_seen}
    with store.writer(key) as w:
        for split, table in tables.items():
            w.write_table(f"{split}.parquet", table)
        w.write_table("rejects.parquet", rejects)
        w.write_json("ingest_report.json", report)
        write_csv_sample(w.path / "rejects_sample.csv", rejects_sample(rejects))
        return w.write_manifest(rows=rows, extra=extra)
