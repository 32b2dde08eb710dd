"""The sex classifier's zone, input scale, width and epochs on real images (issue 26, item 5): the sex
classifier retrained on every fold of a finished run's own folds with other settings, without Ray
(boneage.model.train.fit_sex_model, as a CV trial runs it), and its out-of-fold P(male) measured.

    python bench/sex_sweep.py runs/rsna-dev-wide --settings A:0.25:0.25:50,B:0.25:0.25:50,C:0.25:0.25:50 \
        --json bench/results/sex_sweep_rsna_dev.json

A setting is zone:input_scale:width_mult:epochs. Per setting: ROC AUC on fold 0 (what chooses: pick the
setting by it), on the other folds (which chose nothing: the held-out number of a choice made on fold 0),
on all folds, by age band, and the fit's seconds (--threads torch threads). With several zones, the mean
logit of every trained setting is scored too ("mean of all"). Only CV rows, never the locked test split.
Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from boneage.model.networks import model_kind
from boneage.model.train import fit_sex_model, predict_p_male
from boneage.validation import cv, metrics
from fold0_sweep import read_run  # (bench/ is on the path of a script run from it)


def auc_summary(p: np.ndarray, male: np.ndarray, ages: np.ndarray, fold: np.ndarray, choose_fold: int) -> dict:
    chosen_on = fold == choose_fold
    report = metrics.sex_report(p, male, ages)
    return {"auc_choose_fold": round(metrics.roc_auc(p[chosen_on], male[chosen_on]), 3),
            "auc_other_folds": round(metrics.roc_auc(p[~chosen_on], male[~chosen_on]), 3),
            "auc_all": round(report["all"]["auc"], 3),
            "auc_by_fold": [round(metrics.roc_auc(p[fold == f], male[fold == f]), 3) for f in np.unique(fold)],
            "auc_by_age_band": {band: {"auc": round(r["auc"], 3), "n": r["n"]}
                                for band, r in report["by_age_band"].items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--settings", default="A:0.25:0.25:50,B:0.25:0.25:50,C:0.25:0.25:50",
                        help="zone:input_scale:width_mult:epochs, comma separated")
    parser.add_argument("--choose-fold", type=int, default=0, help="the fold whose AUC chooses a setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    config, rows, (bank, ages, male) = read_run(run)
    male = np.asarray(male, bool)
    fold = rows["fold"].to_numpy()
    results, logits = [], []
    for setting in args.settings.split(","):
        zone, scale, width, epochs = setting.split(":")
        scale, width, epochs = float(scale), float(width), int(epochs)
        setting_cv = config.cv.model_copy(update={"input_scale": scale, "width_mult": width, "epochs": epochs,
                                                                    "sex_epochs": epochs})
        kind = model_kind(f"{zone}-sex", scale)
        p = np.full(len(rows), np.nan)
        started = time.time()
        for f in np.unique(fold):
            trial = cv.Trial(kind.name, cv.POOLED, int(f))
            train_cfg = cv.train_config(setting_cv, trial, config.data.seed)
            result = fit_sex_model(bank, male, np.flatnonzero(fold != f), [], kind, train_cfg)
            scored = np.flatnonzero(fold == f)
            p[scored] = predict_p_male(result.model, bank, scored, kind).numpy()
        logits.append(np.log(np.clip(p, 1e-6, 1 - 1e-6) / np.clip(1 - p, 1e-6, 1)))
        record = {"setting": setting, "zone": zone, "input_scale": scale, "width_mult": width, "epochs": epochs,
                  "images": int(len(rows)), **auc_summary(p, male, ages, fold, args.choose_fold),
                  "fit_seconds": round(time.time() - started, 1), "threads": args.threads}
        print(json.dumps(record), flush=True)
        results.append(record)
    if len(logits) > 1:
        p = 1 / (1 + np.exp(-np.mean(logits, axis=0)))
        record = {"setting": "mean of all", **auc_summary(p, male, ages, fold, args.choose_fold)}
        print(json.dumps(record), flush=True)
        results.append(record)
    logged = pd.read_parquet(run / "cv" / "oof.parquet").set_index("id").loc[rows["id"]]
    reference = {"run_oof_auc": round(metrics.roc_auc(logged["p_male"].to_numpy(), male), 3)} \
        if "p_male" in logged else {}
    print(json.dumps(reference))
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "settings": results, **reference}, indent=2) + "\n")


if __name__ == "__main__":
    main()
