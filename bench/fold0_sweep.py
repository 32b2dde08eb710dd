"""Zone model settings on real images, fold 0 first (issue 26, item 4): one zone kind of a finished run
retrained on the run's own folds with some of its cv settings changed (input size, width, epochs, weight
decay, ...), scored on fold 0 over its test-time views (cv.tta_views: the run's unless screened), without Ray
(boneage.model.train.fit_zone_model, as a CV trial runs it). Every other setting (schedule, pooled or per
sex, seed) is the run's; the run's own settings are run too, first, as the reference in the same process.

    python bench/fold0_sweep.py runs/rsna-dev-pooled --kind A-cls --settings input_scale=0.33 width_mult=0.25 \
        --json bench/results/fold0_sweep_rsna_dev_pooled.json
    python bench/fold0_sweep.py runs/rsna-dev-k5-refit-tta3 --kind C-cls --settings epochs=70 --threads 1 \
        --predictions C-cls.parquet

Per setting: the fold's MAE (k = 3: ~238 images, k = 5: ~143; no label of the fold chooses anything: a fixed
schedule, the last epoch), the fit's seconds on this machine (--threads torch threads), and a paired bootstrap
interval of the MAE difference to the run's settings. A misspelt or out-of-range setting is refused as in a
config file. Only CV rows, never the locked test split. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from _common import rounded_difference  # (bench/ is on the path of a script run from it)
from boneage.config import load_config
from boneage.model.networks import model_kind
from boneage.model.train import fit_zone_model, predict
from boneage.validation import cv, metrics


def read_run(run: Path):
    """(the CV's own config, its CV rows, cv.load_bank's (bank, ages, male)) of a finished run. The config
    is cv/config.yaml's: a run started from another's registration may keep that run's at the top."""
    config = load_config(run / "cv" / "config.yaml" if (run / "cv" / "config.yaml").exists() else run / "config.yaml")
    rows = cv.read_trial_rows(str(run / "registered"), pd.read_parquet(run / "cv" / "folds.parquet"), None)
    return config, rows, cv.load_bank(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--kind", default="A-cls")
    parser.add_argument("--fold", type=int, default=0)
    parser.add_argument("--settings", nargs="+", default=["input_scale=0.33"],
                        help="one or more settings, each field=value[,field=value] of cv (the run's own "
                             "settings are run first, as the reference)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    parser.add_argument("--predictions", help="a parquet of the fold's images: id, boneage, and one column of "
                        "predicted months per setting (named by its changes)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    config, rows, (bank, ages, male) = read_run(run)
    cvc = config.cv
    pooled = cvc.sex_models == "pooled"
    fold = rows["fold"].to_numpy()
    trials = [cv.Trial(args.kind, cv.POOLED, args.fold)] if pooled else [
        cv.Trial(args.kind, sex, args.fold) for sex in ("F", "M")]
    # The run's cv settings with the given fields replaced, validated (and typed) as a config file's would be.
    settings = [("the run's", cvc)] + [(text, type(cvc).model_validate(
        {**cvc.model_dump(), **dict(item.split("=", 1) for item in text.split(","))})) for text in args.settings]
    shown = ("input_scale", "width_mult", "epochs", "batch_size", "lr", "weight_decay", "dropout")
    errors, results, predictions = [], [], {}
    for name, setting_cv in settings:
        scale = setting_cv.input_scale
        kind = model_kind(args.kind, scale)
        pred = np.full(len(rows), np.nan)
        started = time.time()
        for trial in trials:
            mine = np.ones(len(rows), bool) if trial.male is None else male == trial.male
            train_cfg = cv.train_config(setting_cv, trial, config.data.seed)
            fit_idx, select_idx = cv.inner_split(ages, np.flatnonzero(mine & (fold != trial.fold)),
                                                 setting_cv.inner_val_fraction, train_cfg.seed)
            scored = np.flatnonzero(mine & (fold == trial.fold))
            sex_input = male if pooled else None
            result = fit_zone_model(bank, ages, fit_idx, select_idx, kind, train_cfg, male=sex_input)
            pred[scored] = predict(result.model, bank, scored, kind, views=setting_cv.tta_views, male=sex_input).numpy()
        scored = np.flatnonzero(fold == args.fold)
        errors.append(pred[scored] - ages[scored])
        predictions[name] = pred[scored]
        record = {"kind": args.kind, "fold": args.fold, "setting": name,
                  **{field: getattr(setting_cv, field) for field in shown}, "pooled": pooled,
                  "views": setting_cv.tta_views, "images": int(len(scored)),
                  "mae": round(float(np.mean(np.abs(errors[-1]))), 2),
                  "fit_seconds": round(time.time() - started, 1), "threads": args.threads}
        if len(errors) > 1:
            record["vs_run_setting"] = rounded_difference(metrics.paired_mae_difference(errors[-1], errors[0]))
        print(json.dumps(record), flush=True)
        results.append(record)
    logged = pd.read_parquet(run / "cv" / "oof.parquet").set_index("id").loc[rows["id"]]
    reference = {"run_oof_mae_of_this_kind_on_the_fold": round(float(np.mean(np.abs(
        logged[args.kind].to_numpy()[fold == args.fold] - ages[fold == args.fold]))), 2)}
    print(json.dumps(reference))
    if args.predictions:
        scored = fold == args.fold
        pd.DataFrame({"id": rows["id"].to_numpy()[scored], "boneage": ages[scored], **predictions}).to_parquet(
            args.predictions, index=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "settings": results, **reference}, indent=2) + "\n")


if __name__ == "__main__":
    main()
