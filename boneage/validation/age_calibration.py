"""A per-sex, monotone correction of the ensemble's bone age for its bias at the extremes, fitted on
out-of-fold predictions only.

Any estimator trained to minimise its error pulls towards the mean age: out of fold, young children
come out too old and adolescents too young (on rsna-dev, before this: +13 months at 2-5 years, -13.5
at 15-19). A bone age is read against the true age (delayed? advanced?), so what matters is the bias
*given the true age*. The correction therefore regresses the prediction on the label, not the other
way round (which would shrink towards the mean further):

    prediction ~ a + b * label        (per sex, least squares on the OOF rows)
    corrected  = (prediction - a) / b

so that E[corrected | label] = label where the linear model holds. It is monotone (b > 0) and
trades a little variance (the noise scales by 1/b) for no bias across the range. A slope outside
[MIN_SLOPE, MAX_SLOPE], or too few rows of a sex, leaves that sex uncorrected, with the reason stored.

The honest effect is measured by cross-fitting over the OOF table's folds (each fold corrected by the
fit on the other folds); the prediction interval is then calibrated on those cross-fitted corrected
predictions, so the interval and the correction fit together. Everything returned is plain JSON (it
goes into the bundle's training.json).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from boneage.validation import metrics

METHODS = ("auto", "linear", "off")
# "auto" ships the linear correction only when, cross-fitted out of fold, it does not cost accuracy
# overall: its MAE at most this much (relative) above the uncorrected MAE. Removing the bias given the
# true age scales the noise by 1/b; on rsna-dev that cost 1.9 months MAE for the middle ages.
AUTO_MAX_MAE_INCREASE = 0.02
MIN_ROWS = 30  # per sex: fewer, and the slope is mostly noise
# A slope outside this range is not a shrinkage towards the mean that a linear inverse can undo: leave it.
MIN_SLOPE, MAX_SLOPE = 0.3, 1.2


def fit(pred, truth, male, method: str = "auto") -> dict[str, Any]:
    """{"method", "by_sex": {"F"/"M": {"a", "b", "rows"} or {"rows", "skipped": why}}} from OOF rows
    (rows with a NaN prediction or label are left out)."""
    if method not in METHODS:
        raise ValueError(f"age calibration must be one of {METHODS}, not {method!r}")
    p, y = np.asarray(pred, float).reshape(-1), np.asarray(truth, float).reshape(-1)
    male = np.asarray(male, bool).reshape(-1)
    ok = np.isfinite(p) & np.isfinite(y)
    by_sex: dict[str, Any] = {}
    for sex, mask in (("F", ~male & ok), ("M", male & ok)):
        n = int(mask.sum())
        if method == "off":  # ("auto" fits the line; calibrate decides whether it ships)
            by_sex[sex] = {"rows": n, "skipped": "age calibration is off (cv.age_calibration)"}
            continue
        if n < MIN_ROWS or np.ptp(y[mask]) == 0:
            by_sex[sex] = {"rows": n, "skipped": f"{n} out-of-fold rows with distinct labels (needs {MIN_ROWS})"}
            continue
        b, a = np.polyfit(y[mask], p[mask], 1)
        if not MIN_SLOPE <= b <= MAX_SLOPE:
            by_sex[sex] = {"rows": n, "skipped": f"slope {b:.3f} of prediction on label outside "
                                                 f"[{MIN_SLOPE}, {MAX_SLOPE}]"}
            continue
        by_sex[sex] = {"a": float(a), "b": float(b), "rows": n}
    return {"method": method, "by_sex": by_sex}


def apply(pred, sex, calibration: Mapping[str, Any] | None) -> np.ndarray:
    """The corrected bone age of each prediction (any shape), under `sex` ('F'/'M' per row, or one for
    all; None or an uncorrected sex: unchanged). Never below 0 months."""
    p = np.asarray(pred, float)
    if calibration is None:
        return p.copy()
    sexes = np.broadcast_to(np.asarray(sex, dtype=object), p.shape[:1]) if p.ndim else np.asarray(sex, dtype=object)
    out = p.copy()
    for name, fitted in (calibration.get("by_sex") or {}).items():
        if "b" not in fitted:
            continue
        rows = sexes == name
        out[rows] = np.maximum((p[rows] - fitted["a"]) / fitted["b"], 0.0)
    return out


def cross_fitted(table: pd.DataFrame, prediction: str, method: str = "auto") -> np.ndarray:
    """The OOF table's `prediction` corrected fold by fold, each fold by the fit on the other folds'
    rows (so no row's label sets its own correction)."""
    fold = table["fold"].to_numpy(int)
    pred = table[prediction].to_numpy(float)
    sex = np.where(table["male"].to_numpy(bool), "M", "F")
    out = np.full(len(table), np.nan)
    for f in np.unique(fold):
        held = fold == f
        fitted = fit(pred[~held], table["boneage"].to_numpy(float)[~held], table["male"].to_numpy(bool)[~held], method)
        out[held] = apply(pred[held], sex[held], fitted)
    return out


def calibrate(table: pd.DataFrame, prediction: str, method: str = "auto") -> tuple[dict[str, Any], np.ndarray]:
    """(what the bundle stores, the cross-fitted corrected predictions): the fit on every OOF row,
    plus the accuracy by sex and age band of the uncorrected and the cross-fitted corrected prediction
    ("before", "after"), and whether it ships ("applied"). "auto": only when the corrected MAE is at
    most AUTO_MAX_MAE_INCREASE above the uncorrected (else every sex "skipped", the line kept under
    "fitted", and the uncorrected predictions returned)."""
    for column in (prediction, "boneage", "male", "fold"):
        if column not in table:
            raise ValueError(f"the out-of-fold table has no column {column!r}")
    corrected = cross_fitted(table, prediction, method)
    fitted = fit(table[prediction], table["boneage"], table["male"], method)
    truth, male = table["boneage"].to_numpy(float), table["male"].to_numpy(bool)
    plain = table[prediction].to_numpy(float)
    before, after = metrics.accuracy_report(plain, truth, male), metrics.accuracy_report(corrected, truth, male)
    record = {**fitted, "prediction": prediction, "before": before, "after": after, "applied": method != "off"}
    if method == "auto" and after["all"]["mae"] > before["all"]["mae"] * (1 + AUTO_MAX_MAE_INCREASE):
        why = (f"auto: corrected, the out-of-fold MAE would be {after['all']['mae']:.2f} months against "
               f"{before['all']['mae']:.2f} uncorrected (more than +{AUTO_MAX_MAE_INCREASE:.0%}): not applied")
        record.update(applied=False, why=why,
                      by_sex={sex: {"rows": f["rows"], "skipped": why, "fitted": {k: f[k] for k in ("a", "b") if k in f}}
                              for sex, f in fitted["by_sex"].items()})
        corrected = plain.copy()
    return record, corrected


def of_training(training: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The correction in a bundle's training.json, or None (an older bundle: no correction)."""
    fitted = (training or {}).get("age_calibration")
    return dict(fitted) if fitted and fitted.get("by_sex") else None


def describe(calibration: Mapping[str, Any] | None) -> str:
    """One line for logs: per sex, the fitted line or why it was left."""
    if calibration is None:
        return "no age calibration (an older bundle)"
    parts = []
    for sex, fitted in (calibration.get("by_sex") or {}).items():
        parts.append(f"{sex}: prediction = {fitted['a']:.1f} + {fitted['b']:.3f} x label" if "b" in fitted
                     else f"{sex}: none ({fitted.get('skipped')})")
    if calibration.get("why"):
        return f"age calibration {calibration.get('method')}: {calibration['why']}"
    return f"age calibration {calibration.get('method')}: " + "; ".join(parts)
