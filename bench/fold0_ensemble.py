"""What a fold-0 screen of one setting (bench/fold0_sweep.py, run once per zone kind with --predictions) does to
the ensemble on that fold: every kind's predictions of the fold under the run's settings and under the
changed one, combined with the run's own ensemble weights (cv/ensemble.json, the fit it ships), and as the
plain mean of the kinds (no weights at all, so no fit on these rows favours either setting).

    for kind in A-reg A-cls B-reg B-cls C-reg C-cls; do python bench/fold0_sweep.py runs/rsna-dev-k5-refit-tta3 \\
        --kind $kind --settings epochs=70 --threads 1 --predictions screen/$kind.parquet; done
    python bench/fold0_ensemble.py runs/rsna-dev-k5-refit-tta3 screen --json screen/ensemble.json

The run's weights were fitted on out-of-fold predictions that include this fold's (made with the run's
settings), so they favour the run's settings a little; the plain mean does not. Paired bootstrap intervals
of the differences. Only CV rows, never the locked test split.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from _common import emit, rounded_difference, shipped_fit  # (bench/ is on the path of a script run from it)
from boneage.validation import ensemble, metrics

REFERENCE = "the run's"  # fold0_sweep.py's column of the run's own settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="the full_cv.py output folder the screen retrained from")
    parser.add_argument("screen", help="the folder of fold0_sweep.py's --predictions files, <kind>.parquet")
    parser.add_argument("--json")
    args = parser.parse_args()
    use, fit = shipped_fit(args.run)
    kinds = fit["kinds"]
    tables = {kind: pd.read_parquet(Path(args.screen) / f"{kind}.parquet").set_index("id") for kind in kinds}
    ids = tables[kinds[0]].index
    oof = pd.read_parquet(Path(args.run) / "cv" / "ensemble_oof.parquet").set_index("id").loc[ids]
    ages, male = oof["boneage"].to_numpy(), oof["male"].to_numpy()
    settings = [c for c in tables[kinds[0]].columns if c != "boneage"]
    missing = [f"{kind}: {s}" for kind in kinds for s in settings if s not in tables[kind].columns]
    if missing:
        raise SystemExit(f"every kind needs the same settings; missing {missing}")
    errors = {}
    for setting in settings:
        preds = pd.DataFrame({kind: tables[kind].loc[ids, setting].to_numpy() for kind in kinds})
        errors[setting] = {"weighted": ensemble.predict(fit, preds, male) - ages,
                           "mean": preds.mean(axis=1).to_numpy() - ages}
    result = {"run": args.run, "images": len(ids), "ensemble": use, "settings": {}}
    for setting in settings:
        row = {}
        for how in ("weighted", "mean"):
            row[f"{how}_mae"] = round(float(np.mean(np.abs(errors[setting][how]))), 2)
            if setting != REFERENCE:
                row[f"{how}_vs_run_settings"] = rounded_difference(
                    metrics.paired_mae_difference(errors[setting][how], errors[REFERENCE][how]))
        result["settings"][setting] = row
    emit(result, args.json)


if __name__ == "__main__":
    main()
