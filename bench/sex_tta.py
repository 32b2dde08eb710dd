"""The sex classifier's test-time views on real images (issue 26, item 5): a finished run's own sex
classifier fold models, each predicting its held-out fold over 1, 3, 5 ... crop jitters (cv.sex_tta_views),
without Ray and without training anything.

    python bench/sex_tta.py runs/rsna-dev-k5-refit --views 1,3,5 --json bench/results/sex_tta_rsna_dev_k5.json

Per number of views: out-of-fold ROC AUC on fold 0 (what chooses), on the other folds (which chose
nothing), on all folds and by age band; the wrong calls among the 30 most confident; the loosest
threshold meeting the run's confident-call target (boneage.validation.sex_calls), if any. Only CV rows,
never the locked test split. Prints JSON lines.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from boneage.model.networks import model_kind
from boneage.model.train import model_from_state, predict_p_male
from boneage.validation import cv, sex_calls
from fold0_sweep import read_run  # (bench/ is on the path of a script run from it)
from sex_sweep import auc_summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run")
    parser.add_argument("--views", default="1,3,5", help="numbers of test-time views (odd), comma separated")
    parser.add_argument("--choose-fold", type=int, default=0, help="the fold whose AUC chooses")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = Path(args.run)
    config, rows, (bank, ages, male) = read_run(run)
    cvc = config.cv
    if cvc.sex_kind is None:
        raise SystemExit(f"{run} has no sex classifier (cv.sex_kind is null)")
    male = np.asarray(male, bool)
    fold = rows["fold"].to_numpy()
    kind = model_kind(cvc.sex_kind, cvc.input_scale)
    models = {f: model_from_state(torch.load(run / "cv" / "models" / f"{cv.Trial(cvc.sex_kind, cv.POOLED, f).name}.pt",
                                             weights_only=False))
              for f in np.unique(fold)}
    results = []
    for views in (int(v) for v in args.views.split(",")):
        started = time.time()
        p = np.full(len(rows), np.nan)
        for f, model in models.items():
            idx = np.flatnonzero(fold == f)
            p[idx] = predict_p_male(model, bank, idx, kind, views=views).numpy()
        most_confident = np.argsort(sex_calls.distance_to_certainty(p))[:cvc.sex_min_confident_calls]
        result = {"views": views, **auc_summary(p, male, np.asarray(ages), fold, args.choose_fold),
                  f"wrong_of_{len(most_confident)}_most_confident":
                      int(((p[most_confident] > 0.5) != male[most_confident]).sum()),
                  "p_low": sex_calls.choose_threshold(p, male, cvc.sex_max_error_rate, cvc.sex_min_confident_calls),
                  "seconds": round(time.time() - started, 1)}
        print(json.dumps(result), flush=True)
        results.append(result)
    if args.json:
        Path(args.json).write_text(json.dumps({"run": str(run), "sex_kind": cvc.sex_kind, "results": results},
                                              indent=2))


if __name__ == "__main__":
    main()
