"""What test-time augmentation does to accuracy, out of fold, with a finished run's own fold models (issue 26,
item 3): no retraining. Each fold model of the run's bundle predicts the images of its own held-out fold
with 1 view (as the run did: checked against its cv/oof.parquet) and with each of --views; per kind and for
the ensemble, cross-fitted (boneage.validation.ensemble.cross_validated: each fold's weights fit on the
other folds, LAD), the out-of-fold MAE, and the paired difference to 1 view with a 95% bootstrap interval.

    python bench/tta_accuracy.py /work/runs/rsna-dev-pooled --views 3,5 --json bench/results/tta_accuracy_rsna_dev_pooled.json

Only the CV rows (never the locked test split). Prints JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from boneage import score
from boneage.bundle import load_bundle
from boneage.model import train
from boneage.validation import cv, ensemble, metrics

from _common import emit  # bench/_common.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a full_cv.py output folder (bundle/, cv/, registered/)")
    parser.add_argument("--views", default="3,5")
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(2)
    run = Path(args.run)
    loaded = load_bundle(str(run / "bundle"))
    models = score.BundleModels(loaded)
    folds = pd.read_parquet(run / "cv" / "folds.parquet")
    rows = cv.read_trial_rows(str(run / "registered"), folds, None)
    bank, ages, male = cv.load_bank(rows)
    logged = pd.read_parquet(run / "cv" / "oof.parquet").set_index("id").loc[rows["id"]]
    views_list = [1, *[int(v) for v in args.views.split(",")]]
    tables = {}
    for views in views_list:
        table = rows[["id", "male", "boneage", "fold"]].copy()
        for kind in models.kinds:
            table[kind] = np.nan
            for sex in ("F", "M") if models.sex_models != "pooled" else (None,):
                for f, (model, zone) in enumerate(models.models[(kind, sex or "M")]):
                    mine = np.flatnonzero((rows["fold"].to_numpy() == f) & (sex is None or male == (sex == "M")))
                    sex_input = male if getattr(model, "sex_input", False) else None  # one per bank image
                    table.loc[mine, kind] = train.predict(model, bank, mine, zone, views=views,
                                                          male=sex_input).float().numpy()
        tables[views] = table
        print(f"[tta] {views} view(s) done", flush=True)
    drift = float(np.nanmax(np.abs(tables[1][models.kinds].to_numpy() - logged[models.kinds].to_numpy())))
    y = rows["boneage"].to_numpy(float)
    result = {"run": str(run), "images": len(rows), "sex_models": models.sex_models,
              "one_view_max_difference_to_the_runs_oof_months": round(drift, 4), "mae": {}, "paired_vs_1_view": {}}
    errors = {}
    for views, table in tables.items():
        per = {kind: table[kind].to_numpy() - y for kind in models.kinds}
        per["ensemble_cross_fitted_lad"] = ensemble.cross_validated(table, models.kinds, "lad") - y
        errors[views] = per
        result["mae"][f"{views}_views"] = {k: round(float(np.mean(np.abs(v))), 2) for k, v in per.items()}
    for views in views_list[1:]:
        result["paired_vs_1_view"][f"{views}_views"] = {
            k: {key: np.round(value, 2).tolist()
                for key, value in metrics.paired_mae_difference(errors[views][k], errors[1][k]).items()}
            for k in errors[1]}
    emit(result, args.json)


if __name__ == "__main__":
    main()
