"""Two bundles' predictions of the same locked test split, paired: each run's MAE, within ±12 months and
interval coverage, and the paired bootstrap interval of the MAE difference (the images drawn together).

    python bench/compare_test_splits.py runs/rsna-dev-k5-folds runs/rsna-dev-k5-refit \
        --json bench/results/test_refit_vs_folds_k5.json

Reads RUN/test/predictions.parquet and RUN/test/split.csv of each run (what `full_cv.py` wrote when it
scored the split with its bundle); the runs must share the split (the same seed). Nothing is chosen
here: it reports two numbers that were each measured once.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.validation import metrics

from _common import emit  # bench/_common.py


def scored(run: str) -> pd.DataFrame:
    split = pd.read_csv(Path(run) / "test" / "split.csv", dtype={"id": str})
    pred = pd.read_parquet(Path(run) / "test" / "predictions.parquet")
    pred["id"] = pred["id"].astype(str)
    table = split[["id", "boneage"]].merge(pred[["id", "status", "boneage_months", "boneage_lower_months",
                                                 "boneage_upper_months"]], on="id", how="left")
    return table.sort_values("id").reset_index(drop=True)


def summary(table: pd.DataFrame) -> dict:
    err = table["boneage_months"] - table["boneage"]
    lower, upper = table["boneage_lower_months"], table["boneage_upper_months"]
    inside = (lower <= table["boneage"]) & (table["boneage"] <= upper)
    return {"n": int(err.notna().sum()), "mae": round(float(err.abs().mean()), 3),
            "within_12": round(float((err.abs() <= 12).mean()), 3), "bias": round(float(err.mean()), 3),
            "interval_coverage": round(float(inside.mean()), 3),
            "interval_mean_width": round(float((upper - lower).mean()), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reference", help="the run compared against (its test split scored by its bundle)")
    parser.add_argument("other", help="the other run, on the same locked test split")
    parser.add_argument("--json")
    args = parser.parse_args()
    a, b = scored(args.reference), scored(args.other)
    if list(a["id"]) != list(b["id"]):
        raise SystemExit("the two runs have different locked test splits: compare runs made with the same seed")
    ok = (a["status"] == "ok").to_numpy() & (b["status"] == "ok").to_numpy()
    a, b = a[ok].reset_index(drop=True), b[ok].reset_index(drop=True)
    diff = metrics.paired_mae_difference((b["boneage_months"] - b["boneage"]).to_numpy(),
                                         (a["boneage_months"] - a["boneage"]).to_numpy())
    result = {"reference": {"run": args.reference, **summary(a)}, "other": {"run": args.other, **summary(b)},
              "mae_difference_other_minus_reference": round(diff["difference"], 3),
              "interval_95": [round(v, 3) for v in diff["interval"]],
              "correlation_of_errors": round(float(np.corrcoef(a["boneage_months"] - a["boneage"],
                                                               b["boneage_months"] - b["boneage"])[0, 1]), 3)}
    emit(result, args.json)


if __name__ == "__main__":
    main()
