"""The sex classifier on a finished run (rsna-dev): its out-of-fold ROC AUC and accuracy, and the bone age
MAE on the run's locked test split with the predicted sex vs the true sex vs the mean of both sexes.

1. Cross-validation, without Ray, as boneage.distributed.ray_cv's training loop does for a sex trial: for each fold
   of OUTPUT/cv/folds.parquet, the sex kind is trained on both sexes of the other folds (the epoch chosen
   on cv.inner_split's selection split, or the last of a fixed schedule, per the run's cv settings) and
   predicts P(male) of the scored fold once. The run's cv settings (OUTPUT/config.yaml) apply, with
   cv.sex_kind; the run's zone models are not retrained.
2. The locked test split (OUTPUT/test/split.csv: in no fold) is scored by boneage.score.score_rows, the
   scoring code after registration, with the run's bundle plus the k sex fold models from step 1:
     true sex   - the subjects' sex, as `boneage score --subjects` with a sex column;
     scoring    - no sex: the predicted sex where P(male) <= 0.2 or >= 0.8, both sexes' mean between;
     predicted  - every image as the sex P(male) > 0.5 says (no unsure band);
     mean       - no sex and no classifier: both sexes' mean for every image (scoring before issue #15).
   The registered images are those of OUTPUT/registered (the same key point model the bundle ships).

    .venv/bin/python bench/sex_classifier.py --run runs/rsna-dev-honest \
        --input-scale 0.125 --json bench/results/sex_classifier_rsna_dev.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from boneage.validation import cv, metrics
from boneage import score
from boneage.bundle import load_bundle
from boneage.config import load_config
from boneage.model.networks import model_kind
from boneage.model.train import fit_sex_model, predict_p_male


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a finished run folder (registered, cv, bundle, test)")
    parser.add_argument("--sex-kind", default="A-sex")
    parser.add_argument("--epochs", type=int, default=None, help="override the run's cv.epochs")
    parser.add_argument("--input-scale", type=float, default=None, help="override the run's cv.input_scale")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--cache", default=None, help="step 1's fold models and P(male): loaded from here when "
                        "the file exists, else saved there (to rerun step 2 without training)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    overrides = {"epochs": args.epochs, "input_scale": args.input_scale}
    config = load_config(run / "config.yaml", {"cv": {"sex_kind": args.sex_kind,
                                                     **{k: v for k, v in overrides.items() if v}}})
    cvc = config.cv
    kind = model_kind(cvc.sex_kind, cvc.input_scale)

    # 1. k-fold CV of the sex classifier on both sexes pooled.
    folds = pd.read_parquet(run / "cv" / "folds.parquet")
    rows = cv.read_trial_rows(str(run / "registered"), folds, None)
    bank, ages, male = cv.load_bank(rows)
    fold = rows["fold"].to_numpy()
    p_male = np.full(len(rows), np.nan)
    states, per_fold = [], []
    cached = args.cache and Path(args.cache).exists()
    if cached:
        states, p_male, per_fold = torch.load(args.cache, weights_only=False)
    for trial in [] if cached else cv.sex_trials(cvc.sex_kind, cvc.k):
        started = time.time()
        train_cfg = cv.train_config(cvc, trial, config.data.seed)
        fit_idx, select_idx = cv.inner_split(ages, np.flatnonzero(fold != trial.fold), cvc.inner_val_fraction,
                                             train_cfg.seed)
        scored = np.flatnonzero(fold == trial.fold)
        result = fit_sex_model(bank, male, fit_idx, select_idx, kind, train_cfg)
        p_male[scored] = predict_p_male(result.model, bank, scored, kind).numpy()
        states.append(cv.compact_model(result.state, trial, cvc))
        record = {"trial": trial.name, "seconds": round(time.time() - started, 1), "n_train": len(fit_idx),
                  "n_select": len(select_idx), "best_epoch": int(result.state["best"]["epoch"]),
                  **cv.sex_record(p_male[scored], male[scored])}
        per_fold.append(record)
        print(json.dumps(record), flush=True)
    if args.cache and not cached:
        torch.save((states, p_male, per_fold), args.cache)
    oof = metrics.sex_report(p_male, male, ages)

    # 2. The locked test split through the scoring code, with and without the sex.
    split = pd.read_csv(run / "test" / "split.csv", dtype={"id": str})
    test_rows = pq.read_table(run / "registered", filters=[("id", "in", split["id"].tolist())]).to_pandas()
    test_rows = test_rows.drop(columns=["male", "boneage"], errors="ignore").merge(split[["id", "male", "boneage"]], on="id")
    bundle = load_bundle(str(run / "bundle"))
    bundle.models[(cvc.sex_kind, cv.POOLED)] = states
    bundle.manifest["sex_kind"] = cvc.sex_kind
    models = score.BundleModels(bundle)
    # the fixed 0.2 / 0.8 this bench measured; a bundle now uses the threshold it earned (sex_calls)
    models.sex_calls = {"on": True, "p_low": metrics.UNSURE_LOW, "p_high": metrics.UNSURE_HIGH}
    truth = test_rows["boneage"].to_numpy(float)
    true_male = test_rows["male"].astype(bool).to_numpy()
    by_true = score.score_rows(test_rows, models)
    scoring = score.score_rows(test_rows.assign(male=None), models)
    argmax = score.score_rows(test_rows.assign(male=scoring["p_male"].to_numpy() > 0.5), models)
    models.sex_kind = None  # the same bundle without its classifier: today's unknown-sex scoring
    mean = score.score_rows(test_rows.assign(male=None), models)
    ok = by_true["status"].eq("ok").to_numpy()
    test = {"images": int(len(split)), "scored": int(ok.sum()),
            "sex": metrics.sex_accuracy(scoring["p_male"][ok], true_male[ok]),
            "sex_unsure": int(scoring["sex_unsure"][ok].sum()),
            "wrong_sex_used": int((scoring["sex"][ok].notna() & (scoring["sex"][ok] != np.where(true_male, "M", "F")[ok])).sum())}
    for name, table in (("true sex", by_true), ("scoring (predicted where sure)", scoring),
                        ("predicted (p > 0.5)", argmax), ("mean of both sexes", mean)):
        test[name] = metrics.accuracy(table["boneage_months"].to_numpy(float)[ok], truth[ok], n_boot=2000)
    result = {"run": str(run), "sex_kind": cvc.sex_kind, "cv": {k: getattr(cvc, k) for k in
              ("k", "input_scale", "width_mult", "fc", "dropout", "epochs", "batch_size", "lr",
               "inner_val_fraction", "patience")},
              "unsure_between": [metrics.UNSURE_LOW, metrics.UNSURE_HIGH], "folds": per_fold, "oof": oof,
              "test_split": test, "machine": {"python": platform.python_version(), "torch": torch.__version__,
                                              "threads": args.threads}}
    a = oof["all"]
    print(f"out of fold ({a['n']} images): ROC AUC {a['auc']:.3f}, accuracy {a['accuracy']:.1%}, "
          f"unsure {a['unsure']:.1%}, accuracy of the sure {a['accuracy_sure']:.1%}")
    for band, b in oof["by_age_band"].items():
        print(f"  {band:<8} n={b['n']:<4} AUC {b['auc']:.3f} accuracy {b['accuracy']:.1%} unsure {b['unsure']:.0%}")
    print(f"locked test split ({test['scored']} scored): AUC {test['sex']['auc']:.3f}, {test['sex_unsure']} unsure, "
          f"{test['wrong_sex_used']} scored as the wrong sex")
    for name in ("true sex", "scoring (predicted where sure)", "predicted (p > 0.5)", "mean of both sexes"):
        print(f"  {name:<32} {metrics.describe(test[name])}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
