"""Bias and MAE by age band before and after the age correction (boneage.validation.age_calibration),
and the prediction interval's coverage by age band, from a finished run's folder: no training, no Ray.

Out of fold: RUN/bundle/training.json's `age_calibration` (the ensemble as it is, and corrected fold by
fold with the fit on the other folds) and `interval.cross_fitted`. The locked test split:
RUN/test/predictions.parquet (scored by the shipped, corrected bundle) against RUN/test/split.csv; the
uncorrected bone age of each test row is the correction undone (a + b x bone age, exact wherever the
corrected value was not cut at 0), so both come from the one scoring of the split. The interval's
coverage on the split is RUN/test/metrics.json's.

    .venv/bin/python bench/age_bias.py --run runs/rsna-dev-v3 --json bench/results/age_bias_rsna_dev.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.validation import metrics


def undo(corrected: np.ndarray, sexes: np.ndarray, calibration: dict) -> np.ndarray:
    """The ensemble's bone age before the correction: a + b x corrected per sex (unchanged where the sex
    was not corrected)."""
    out = corrected.copy()
    for sex, fitted in calibration.get("by_sex", {}).items():
        if "b" in fitted:
            rows = sexes == sex
            out[rows] = fitted["a"] + fitted["b"] * corrected[rows]
    return out


def measure(run: Path) -> dict:
    training = json.loads((run / "bundle" / "training.json").read_text())
    calibration = training.get("age_calibration") or {}
    out = {"run": run.name, "age_calibration": {k: calibration.get(k) for k in ("method", "by_sex")},
           "out_of_fold": {"before": calibration.get("before"), "after": calibration.get("after")},
           "interval_out_of_fold": (training.get("interval") or {}).get("cross_fitted"),
           "interval_method": (training.get("interval") or {}).get("method")}
    predictions = run / "test" / "predictions.parquet"
    if predictions.exists():
        split = pd.read_csv(run / "test" / "split.csv", dtype={"id": str})
        scored = pd.read_parquet(predictions)
        table = split.merge(scored[scored.status == "ok"][["id", "boneage_months", "sex"]], on="id")
        y, male = table["boneage"].to_numpy(float), table["male"].astype(bool).to_numpy()
        shipped = table["boneage_months"].to_numpy(float)
        out["test_split"] = {"after": metrics.accuracy_report(shipped, y, male),
                             "before": metrics.accuracy_report(undo(shipped, table["sex"].to_numpy(object),
                                                                    calibration), y, male)}
        out["interval_test_split"] = json.loads((run / "test" / "metrics.json").read_text()).get("interval")
    return out


def print_tables(result: dict) -> None:
    def rows(report: dict) -> dict:
        return {"all": report["all"], **report["by_sex"], **report["by_age_band"]}

    for where in ("out_of_fold", "test_split"):
        if not (result.get(where) or {}).get("before"):
            continue
        before, after = rows(result[where]["before"]), rows(result[where]["after"])
        print(f"\n{where}: | group | n | bias before | bias after | MAE before | MAE after |")
        for group, cell in before.items():
            print(f"| {group} | {cell['n']} | {cell['bias']:+.1f} | {after[group]['bias']:+.1f} | "
                  f"{cell['mae']:.2f} | {after[group]['mae']:.2f} |")
    for where in ("interval_out_of_fold", "interval_test_split"):
        report = result.get(where)
        if not report or "all" not in report:
            continue
        print(f"\n{where} ({result.get('interval_method')}): | group | n | coverage | mean width |")
        for group, cell in {"all": report["all"], **report["by_sex"], **report["by_age_band"]}.items():
            print(f"| {group} | {cell['n']} | {cell['coverage']:.1%} | {cell['mean_width']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, type=Path, help="a finished full_cv.py output folder")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    result = measure(args.run)
    print_tables(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
