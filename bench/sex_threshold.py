"""Whether a run's sex classifier earns its calls (boneage.validation.sex_calls), from the run's folder:
no training, no Ray. From RUN/cv/oof.parquet (p_male, male, fold): the out-of-fold ROC AUC; the
threshold chosen to meet the target error rate, the error rate of its confident calls on the labels that
chose it (optimistic) and cross-fitted over the folds (honest); the share of images that would get a
sex (out of fold, and cross-fitted: what share of unknown-sex images scoring would give a sex); and, for
comparison, the fixed 0.2 / 0.8 that scoring used before. Where RUN/test/predictions.parquet holds
`p_male` (the locked test split, scored with its true sex, a set no threshold was chosen on), the same
threshold's calls there too. With RUN/bundle/training.json's own record, what the bundle stored.

    .venv/bin/python bench/sex_threshold.py --run runs/rsna-dev-honest --json bench/results/sex_threshold_rsna_dev.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.config import CVConfig
from boneage.validation import metrics, sex_calls

from _common import emit  # bench/_common.py


def measure(oof: pd.DataFrame, max_error_rate: float, min_calls: int,
            test: pd.DataFrame | None = None) -> dict:
    """The numbers this bench prints, from an out-of-fold table (p_male, male, fold) and optionally the
    locked test split's (p_male, male)."""
    record = sex_calls.calibrate(oof, max_error_rate, min_calls)
    p, male = oof["p_male"].to_numpy(float), oof["male"].to_numpy(bool)
    out = {"images": int(len(oof)), "auc": record["auc"], "max_error_rate": max_error_rate,
           "min_confident_calls": min_calls, "on": record["on"], "off_reason": record.get("off_reason"),
           "p_low": record["p_low"], "p_high": record["p_high"], "selected": record.get("selected"),
           "cross_fitted": record["cross_fitted"],
           # out of fold, the share of images the chosen threshold calls (all images, as if none had a sex)
           "called_share": record.get("called_share", 0.0),
           "called_share_cross_fitted": record["cross_fitted"]["calls"] / len(oof),
           "fixed_0.2_0.8": sex_calls.confident_calls(p, male, metrics.UNSURE_LOW)}
    if test is not None and len(test):
        tp, tm = test["p_male"].to_numpy(float), test["male"].to_numpy(bool)
        out["test_split"] = {"images": int(len(test)), "auc": metrics.roc_auc(tp, tm),
                             "at_threshold": sex_calls.confident_calls(tp, tm, record["p_low"])
                             if record["p_low"] is not None else None,
                             "fixed_0.2_0.8": sex_calls.confident_calls(tp, tm, metrics.UNSURE_LOW)}
    return out


def test_table(run: Path) -> pd.DataFrame | None:
    """The locked test split's p_male and true sex, where the run scored it with a sex classifier."""
    predictions, split = run / "test" / "predictions.parquet", run / "test" / "split.csv"
    if not predictions.exists() or not split.exists():
        return None
    scored = pd.read_parquet(predictions)
    if "p_male" not in scored:
        return None
    truth = pd.read_csv(split, dtype={"id": str})[["id", "male"]]
    table = scored[["id", "p_male"]].merge(truth, on="id")
    return table[np.isfinite(table["p_male"].to_numpy(float))]


def main() -> None:
    defaults = CVConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="a run's output folder (with cv/oof.parquet)")
    parser.add_argument("--max-error-rate", type=float, default=defaults.sex_max_error_rate)
    parser.add_argument("--min-calls", type=int, default=defaults.sex_min_confident_calls)
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    run = Path(args.run)
    oof = pd.read_parquet(run / "cv" / "oof.parquet")
    if "p_male" not in oof:
        raise SystemExit(f"{run}/cv/oof.parquet has no p_male: the run had no sex classifier (cv.sex_kind)")
    result = {"run": str(run), **measure(oof, args.max_error_rate, args.min_calls, test_table(run))}
    training = run / "bundle" / "training.json"
    if training.exists():
        result["bundle_record"] = json.loads(training.read_text()).get("sex_prediction")
    emit(result, args.json)
    c = result["cross_fitted"]
    print(f"\nout-of-fold AUC {result['auc']:.3f} on {result['images']} images; predicted sex "
          + (f"ON at P(male) ≤ {result['p_low']:.3f} / ≥ {result['p_high']:.3f}: {result['selected']['error_rate']:.1%} "
             f"wrong of {result['selected']['calls']} calls on the labels that chose it, cross-fitted "
             f"{c['error_rate']:.1%} ({c['wrong']} of {c['calls']}); {result['called_share']:.0%} of images get a sex"
             if result["on"] else f"OFF: {result['off_reason']}"))


if __name__ == "__main__":
    main()
