"""Helpers the bench scripts share (a script run as `python bench/<script>.py` has bench/ on sys.path)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def emit(result: dict[str, Any], path: str | None = None) -> None:
    """Print `result` as indented JSON; also write it to `path` (a file) when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        Path(path).write_text(text + "\n")


def shipped_fit(run: str | Path) -> tuple[str, dict[str, Any]]:
    """(name, weights record) of the ensemble fit a full_cv.py run ships (cv/ensemble.json's "use")."""
    record = json.loads((Path(run) / "cv" / "ensemble.json").read_text())
    return record["use"], record["fits"][record["use"]]


def cv_bank(run: str | Path, n: int):
    """(uint8 bank, ages, male) of the first n registered CV images of a full_cv.py output folder."""
    import pandas as pd

    from boneage.validation import cv

    run = Path(run)
    rows = cv.read_trial_rows(str(run / "registered"), pd.read_parquet(run / "cv" / "folds.parquet"), None)
    return cv.load_bank(rows.iloc[:n].reset_index(drop=True))


def rounded_difference(paired: dict[str, Any], digits: int = 2) -> dict[str, Any]:
    """metrics.paired_mae_difference's {"difference", "interval"}, rounded for a result file."""
    return {"difference": round(paired["difference"], digits),
            "interval": [round(x, digits) for x in paired["interval"]]}
