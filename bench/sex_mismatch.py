"""How often `sex_mismatch` fires: the sex classifier's out-of-fold P(male) on rsna-dev against the true
sex (the labels), with scoring's thresholds. The P(male) comes from bench/sex_classifier.py's --cache
(its step 1: the 713 CV images of runs/rsna-dev-honest, in the order of cv.read_trial_rows, by id).

    PYTHONPATH=. python bench/sex_mismatch.py --run runs/rsna-dev-honest \
        --cache /tmp/sex_rsna_dev_cache.pt --json bench/results/sex_mismatch_rsna_dev.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from boneage.validation import metrics
from boneage import score

from _common import emit  # bench/_common.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True)
    parser.add_argument("--cache", required=True, help="bench/sex_classifier.py --cache file")
    parser.add_argument("--json")
    args = parser.parse_args()
    rows = pd.read_parquet(Path(args.run) / "cv" / "folds.parquet").sort_values("id", kind="stable")
    _, p, _ = torch.load(args.cache, weights_only=False)
    if len(p) != len(rows):
        raise SystemExit(f"{args.cache} has {len(p)} P(male), {args.run} {len(rows)} CV images")
    male = rows["male"].to_numpy(bool)
    report = metrics.sex_report(p, male, rows["boneage"].to_numpy(float))["all"]  # the AUC checks the alignment
    # at the fixed 0.2 / 0.8 this bench measured (bundles now carry their own earned threshold)
    fires = score.sex_mismatch(p, np.where(male, "M", "F"), metrics.UNSURE_LOW, metrics.UNSURE_HIGH)
    sure = (p <= metrics.UNSURE_LOW) | (p >= metrics.UNSURE_HIGH)
    result = {"run": args.run, "images": int(len(p)), "auc": report["auc"], "sure": int(sure.sum()),
              "sure_and_right": int((sure & ~fires).sum()), "sex_mismatch": int(fires.sum()),
              "sex_mismatch_fraction": float(fires.mean()),
              "given_M_p_male_at_most_0.2": int((male & fires).sum()),
              "given_F_p_male_at_least_0.8": int((~male & fires).sum()),
              "p_male_range": [float(np.min(p)), float(np.max(p))],
              "fired_on": rows[fires][["id", "male", "boneage"]].assign(p_male=p[fires]).to_dict("records")}
    emit(result, args.json)


if __name__ == "__main__":
    main()
