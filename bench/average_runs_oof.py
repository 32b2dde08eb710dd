"""How much averaging whole runs would gain, out of fold: the shipped ensemble's out-of-fold predictions of
two or more finished runs on the same folds (the same seed and labels give the same folds), averaged per
image, against each run alone; each run against the first, paired by image; the correlation of their errors;
and how far their registrations differ.

    python bench/average_runs_oof.py runs/rsna-dev-k5-refit runs/rsna-dev-k5-refit-2 \\
        --json bench/results/average_runs_oof_refit_refit2.json

Two runs of one recipe differ by their training's float rounding (thread scheduling) and by the images their
key point models registered differently; two recipes, by the recipe too. The average of n runs is what an
ensemble of n independently trained model sets would score out of fold (at n times the training and scoring
cost). The paired bootstrap interval is of the average's MAE minus the first run's. Only CV rows, never the
locked test split.
"""

from __future__ import annotations

import argparse
import glob
from pathlib import Path

import numpy as np
import pandas as pd

from _common import emit, rounded_difference, shipped_fit  # (bench/ is on the path of a script run from it)
from boneage.registration.prepare import KEYPOINT_COLUMNS
from boneage.validation import metrics

POINTS = list(KEYPOINT_COLUMNS)  # the three key points each image was registered by, in its own pixels


def shipped_oof(run: Path) -> pd.DataFrame:
    """The run's shipped ensemble's out-of-fold ages (cv/ensemble.json's "use"), by image id, with fold."""
    use, _ = shipped_fit(run)
    table = pd.read_parquet(run / "cv" / "ensemble_oof.parquet")
    table["id"] = table["id"].astype(str)
    return table.set_index("id")[["boneage", "fold", f"ensemble_{use}"]].rename(columns={f"ensemble_{use}": "age"})


def key_points(run: Path) -> pd.DataFrame:
    files = glob.glob(str(run / "registered" / "*.parquet"))
    table = pd.concat([pd.read_parquet(f, columns=["id", *POINTS]) for f in files])
    table["id"] = table["id"].astype(str)
    return table.set_index("id")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="full_cv.py output folders (at least two)")
    parser.add_argument("--json")
    args = parser.parse_args()
    if len(args.runs) < 2:
        raise SystemExit("give at least two runs")
    runs = [Path(r) for r in args.runs]
    tables = [shipped_oof(run) for run in runs]
    ids = tables[0].index
    for run, table in zip(runs[1:], tables[1:]):
        if set(table.index) != set(ids) or not (table.loc[ids, "fold"] == tables[0]["fold"]).all():
            raise SystemExit(f"{run} has other CV images or folds than {runs[0]}: not comparable")
    ages = tables[0]["boneage"].to_numpy()
    errors = [table.loc[ids, "age"].to_numpy() - ages for table in tables]
    averaged = np.mean([table.loc[ids, "age"].to_numpy() for table in tables], axis=0) - ages
    paired = metrics.paired_mae_difference(averaged, errors[0])
    first_points = key_points(runs[0]).loc[ids]

    def moved(run: Path) -> float:
        """The share of CV images whose key points (source image px) differ from the first run's by over 0.5."""
        return float(((key_points(run).loc[ids, POINTS] - first_points).abs() > 0.5).any(axis=1).mean())

    result = {
        "runs": args.runs, "images": len(ids),
        "mae": {str(run): round(float(np.mean(np.abs(e))), 3) for run, e in zip(runs, errors)},
        # Each run against the first, paired by image (a recipe change is measured so when both runs share
        # their registrations, i.e. their key point model).
        "vs_first": {str(run): rounded_difference(metrics.paired_mae_difference(e, errors[0]), 3)
                     for run, e in zip(runs[1:], errors[1:])},
        "averaged_mae": round(float(np.mean(np.abs(averaged))), 3),
        "averaged_vs_first": rounded_difference(paired, 3),
        "error_correlation_with_first": {str(run): round(float(np.corrcoef(errors[0], e)[0, 1]), 3)
                                         for run, e in zip(runs[1:], errors[1:])},
        "registration_differs_from_first": {str(run): round(moved(run), 3) for run in runs[1:]},
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
