"""Rebuild the bundled datasets in data/ from a folder of the original files (checked by sha256).

    python data/bundle.py --source DIR      # DIR/sst2/{train,dev}.tsv, DIR/trec/*.label, DIR/mnist/*.gz, DIR/wnut17/*

SST-2 train and dev become zstd-compressed Parquet (columns ``sentence``, ``label`` exactly as in the
TSV: split on the tab, no quoting). TREC is copied byte for byte: its one non-UTF-8 byte stays, so
ingest's replacement counting is exercised on real data. MNIST's four gzipped IDX files are copied
byte for byte too (ingest reads them as they are).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SHA256 = {
    "sst2/train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    "sst2/dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    "trec/train_5500.label": "9e4c8bdcaffb96ed61041bd64b564183d52793a8e91d84fc3a8646885f466ec3",
    "trec/TREC_10.label": "033f22c028c2bbba9ca682f68ffe204dc1aa6e1cf35dd6207f2d4ca67f0d0e8e",
    "mnist/train-images-idx3-ubyte.gz": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
    "mnist/train-labels-idx1-ubyte.gz": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
    "mnist/t10k-images-idx3-ubyte.gz": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
    "mnist/t10k-labels-idx1-ubyte.gz": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
    "wnut17/wnut17train.conll": "731820e13f71af324c6b55a1575ec2ce59fbaa2a0806f8f0400b98d56cd6a7a5",
    "wnut17/emerging.dev.conll": "e053b752b8155113ca66e7db08af5f2f5f43ab993694e4774f1ec5bad42312d8",
    "wnut17/emerging.test.annotated": "2aa79b764e56ec9264a1b30fdd9b70195bd00ff400b62edd8f399d5f13c178f0",
}
BYTE_COPIES = [name for name in SHA256 if name.startswith(("trec/", "mnist/", "wnut17/"))]


def checked(source: Path, name: str) -> Path:
    path = source / name
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != SHA256[name]:
        raise SystemExit(f"{path}: sha256 {digest} does not match the MANIFEST")
    return path


def sst2_to_parquet(tsv: Path, out: Path) -> int:
    lines = tsv.read_text(encoding="utf-8").split("\n")
    header, rows = lines[0].split("\t"), [line.split("\t") for line in lines[1:] if line]
    assert header == ["sentence", "label"], header
    table = pa.table({"sentence": [r[0] for r in rows], "label": [int(r[1]) for r in rows]})
    pq.write_table(table, out, compression="zstd", compression_level=19)
    return table.num_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True,
                        help="folder with the original files (sources in README.md, 'Datasets and attribution')")
    args = parser.parse_args()
    here = Path(__file__).resolve().parent
    for split in ("train", "dev"):
        n = sst2_to_parquet(checked(args.source, f"sst2/{split}.tsv"), here / "sst2" / f"{split}.parquet")
        print(f"sst2/{split}.parquet: {n} rows")
    for name in BYTE_COPIES:
        (here / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(checked(args.source, name), here / name)
        print(f"{name}: copied")


if __name__ == "__main__":
    main()
