"""Batch-score radiographs with a model bundle: one parquet row per input file.

    python workflows/score.py scans/ --bundle runs/rsna/bundle --out predictions.parquet   # scans/: your radiographs
    python workflows/score.py s3://bucket/new-scans --bundle s3://bucket/runs/rsna/bundle \
        --out s3://bucket/predictions.parquet --subjects s3://bucket/subjects.csv --gpus-per-actor 0.5

The same as `boneage score`; see `--help` and docs/scoring.md for the table's columns.
"""

import sys

from boneage import cli


def main(argv=None) -> int:
    return cli.main(["score", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
