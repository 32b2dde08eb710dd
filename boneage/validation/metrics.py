"""Accuracy the way the field reports it (Deeplasia's and BoneXpert's evaluations): MAE, RMSE, median
absolute error, the share of images within ±12 months, and the mean error (bias, predicted − true),
overall, by sex and by age band, with 95% bootstrap intervals where asked."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

# Age bands of the report, in months: (label, lower bound inclusive, upper bound exclusive); the last
# band includes its upper bound (RSNA ages stop at 228 months = 19 years).
AGE_BANDS = (("0-2 y", 0.0, 24.0), ("2-5 y", 24.0, 60.0), ("5-10 y", 60.0, 120.0),
             ("10-15 y", 120.0, 180.0), ("15-19 y", 180.0, 228.0))

# The report's fixed yardstick for the sex classifier ("unsure" share, accuracy of the others), set
# beforehand (issue #15). Scoring does not use it: a bundle uses the threshold its out-of-fold calls
# earned, or none (boneage.validation.sex_calls).
UNSURE_LOW, UNSURE_HIGH = 0.2, 0.8

METRICS = ("mae", "rmse", "median_ae", "within_12", "bias")
METRIC_NAMES = {"mae": "MAE", "rmse": "RMSE", "median_ae": "median |error|", "within_12": "within ±12 mo",
                "bias": "bias (pred − true)"}


def groups(oof: pd.DataFrame) -> dict[str, np.ndarray]:
    """{group: boolean mask}: all, F, M and every age band (by true bone age)."""
    y, male = oof["boneage"].to_numpy(float), oof["male"].to_numpy(bool)
    out = {"all": np.ones(len(oof), bool), "F": ~male, "M": male}
    for i, (label, lo, hi) in enumerate(AGE_BANDS):
        out[label] = (y >= lo) & ((y <= hi) if i == len(AGE_BANDS) - 1 else (y < hi))
    return out


def _metrics(err: np.ndarray) -> dict[str, np.ndarray]:
    """The five metrics of errors along the last axis (one row of errors, or one per resample)."""
    a = np.abs(err)
    return {"mae": a.mean(-1), "rmse": np.sqrt((err**2).mean(-1)), "median_ae": np.median(a, -1),
            "within_12": (a <= 12).mean(-1), "bias": err.mean(-1)}


def accuracy(pred: np.ndarray, truth: np.ndarray, n_boot: int = 0, seed: int = 0) -> dict[str, Any]:
    """{"n", metric: value, ...} over the rows with a finite prediction; with n_boot > 0 also
    "ci": {metric: [low, high]}, the 2.5 and 97.5 percentiles over n_boot resamples of the rows."""
    err = np.asarray(pred, float) - np.asarray(truth, float)
    err = err[np.isfinite(err)]
    out: dict[str, Any] = {"n": int(len(err))}
    if not len(err):
        return out
    out.update({m: float(v) for m, v in _metrics(err).items()})
    if n_boot and len(err) > 1:
        draws = err[np.random.default_rng(seed).integers(0, len(err), size=(n_boot, len(err)))]
        out["ci"] = {m: [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))]
                     for m, v in _metrics(draws).items()}
    return out


def paired_mae_difference(errors: np.ndarray, reference: np.ndarray, n_boot: int = 2000, seed: int = 0
                          ) -> dict[str, Any]:
    """MAE(errors) − MAE(reference) over the same rows (two predictions of one set of images), with the
    95% bootstrap interval of that difference, the rows drawn together: a comparison of two recipes or
    settings that the rows' own spread does not blur."""
    diff = np.abs(np.asarray(errors, float)) - np.abs(np.asarray(reference, float))
    draws = diff[np.random.default_rng(seed).integers(0, len(diff), size=(n_boot, len(diff)))].mean(axis=1)
    return {"difference": float(diff.mean()), "interval": [float(np.percentile(draws, 2.5)),
                                                           float(np.percentile(draws, 97.5))]}


def accuracy_report(pred: np.ndarray, truth: np.ndarray, male: np.ndarray, n_boot: int = 0,
                    seed: int = 0) -> dict[str, Any]:
    """{"all": accuracy, "by_sex": {"F", "M"}, "by_age_band": {label: accuracy}} (empty groups left
    out; age bands by true bone age, as in the report's tables)."""
    pred, truth = np.asarray(pred, float), np.asarray(truth, float)
    masks = groups(pd.DataFrame({"boneage": truth, "male": np.asarray(male, bool)}))
    out: dict[str, Any] = {"all": accuracy(pred, truth, n_boot, seed), "by_sex": {}, "by_age_band": {}}
    for name, mask in masks.items():
        if name != "all" and mask.any():
            out["by_sex" if name in ("F", "M") else "by_age_band"][name] = accuracy(
                pred[mask], truth[mask], n_boot, seed)
    return out


def describe(acc: dict[str, Any]) -> str:
    """One line: 'MAE 9.8 [8.1, 11.6] months, RMSE …, within ±12 mo 71%, bias -1.2 (n=24)'."""
    if not acc.get("n"):
        return "no scored images"
    ci = acc.get("ci", {})

    def part(m: str, fmt: str) -> str:
        text = fmt.format(acc[m])
        if m in ci:
            text += " [" + ", ".join(fmt.format(v) for v in ci[m]) + "]"
        return text

    return (f"MAE {part('mae', '{:.2f}')} months, RMSE {part('rmse', '{:.2f}')}, median |error| "
            f"{part('median_ae', '{:.2f}')}, within ±12 months {part('within_12', '{:.0%}')}, "
            f"bias {part('bias', '{:+.2f}')} (n={acc['n']})")


def roc_auc(score: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC: the chance a random positive scores above a random negative (ties count half), by the
    Mann-Whitney rank sum; NaN without both classes. Rows with a non-finite score are left out."""
    from scipy.stats import rankdata

    score, positive = np.asarray(score, float), np.asarray(positive, bool)
    keep = np.isfinite(score)
    score, positive = score[keep], positive[keep]
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return float("nan")
    ranks = rankdata(score)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sex_accuracy(p_male: np.ndarray, male: np.ndarray) -> dict[str, Any]:
    """{"n", "auc", "accuracy" (at 0.5), "unsure" (share with UNSURE_LOW < p < UNSURE_HIGH),
    "accuracy_sure" (of the others: the images whose predicted sex scoring would use)}."""
    p, y = np.asarray(p_male, float), np.asarray(male, bool)
    keep = np.isfinite(p)
    p, y = p[keep], y[keep]
    if not len(p):
        return {"n": 0}
    unsure = (p > UNSURE_LOW) & (p < UNSURE_HIGH)
    return {"n": int(len(p)), "auc": roc_auc(p, y), "accuracy": float(((p > 0.5) == y).mean()),
            "unsure": float(unsure.mean()),
            "accuracy_sure": float(((p[~unsure] > 0.5) == y[~unsure]).mean()) if (~unsure).any() else float("nan")}


def sex_report(p_male: np.ndarray, male: np.ndarray, boneage: np.ndarray) -> dict[str, Any]:
    """sex_accuracy overall ("all") and by age band ("by_age_band", the report's bands by true bone age)."""
    p, y, age = np.asarray(p_male, float), np.asarray(male, bool), np.asarray(boneage, float)
    masks = groups(pd.DataFrame({"boneage": age, "male": y}))
    return {"all": sex_accuracy(p, y),
            "by_age_band": {name: sex_accuracy(p[mask], y[mask]) for name, mask in masks.items()
                            if name not in ("all", "F", "M") and mask.any()}}
