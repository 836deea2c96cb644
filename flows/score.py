"""Batch scoring: stream a file through a registered model into Parquet, every row scored or rejected.

    nightshift score --model sst2 [--alias champion] --input reviews.csv --output scored.parquet
    python -m flows.score --model sst2 --input reviews.jsonl --output out.parquet [--id-column id] [--input-column text]

Its own MLflow experiment (``<model>-scoring``), one run per scoring with the row counts. To run it
after each completed pipeline run of a recipe, serve its deployment (``flows.deployments.score_deployment``)
with the pipeline's::

    nightshift schedule --config configs/sst2.yaml --score sst2 data/incoming.csv out/sst2.parquet
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from tasks import stages


@flow(name="nightshift-score")
def score(model: str, input: str, output: str, alias: str = "champion", batch_size: int = 1024, id_column: str = "id",
          input_column: str | None = None) -> dict[str, Any]:
    """Score ``input`` (csv, tsv, jsonl or parquet) with ``models:/MODEL@ALIAS``; rejects go next to ``output``."""
    return stages.score_file(model, input, output, alias, batch_size, id_column, input_column)


if __name__ == "__main__":
    import argparse
    import json

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag in ("--model", "--input", "--output"):
        parser.add_argument(flag, required=True)
    for flag, default in (("--alias", "champion"), ("--id-column", "id"), ("--input-column", None)):
        parser.add_argument(flag, default=default)
    parser.add_argument("--batch-size", type=int, default=1024)
    args = parser.parse_args()
    print(json.dumps(score(args.model, args.input, args.output, args.alias, args.batch_size, args.id_column,
                           args.input_column), indent=2))
