"""Preprocess and register radiographs on Ray Data.

    python workflows/preprocess.py                                   # synthetic default, local Ray
    python workflows/preprocess.py --images $RSNA/boneage-training-dataset \
        --labels $RSNA/boneage-training-dataset.csv --output runs/rsna   # the RSNA data: README
    python workflows/preprocess.py --images s3://bucket/train --labels s3://bucket/train.csv \
        --output s3://bucket/runs/rsna

Writes OUTPUT/registered/*.parquet (one row per input image, failures as rows with status/error),
OUTPUT/qa/registered_sheet.png and OUTPUT/qa/preprocess_summary.json.
"""

import sys

from boneage import cli


def main(argv=None) -> int:
    return cli.main(["preprocess", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
