"""Prediction intervals for the bone age, calibrated on out-of-fold residuals only (split conformal).

An image's interval is [prediction - h, prediction + h], with h the `level` conformal quantile of the
absolute out-of-fold residuals |prediction - label| of the calibration rows: with n rows, the
ceil((n + 1) * level)-th smallest |residual| (the finite-sample correction that makes the coverage of
a new exchangeable image at least `level`). The methods differ in which rows calibrate an image:

  global     all rows
  sex        the rows of the image's sex (unknown sex: the wider of the two)
  age_band   the rows whose PREDICTED bone age falls in the image's predicted-age band
             (metrics.AGE_BANDS; labels are unknown at scoring); a band with too few rows uses the
             global h

A model of the residual scaled by the fold spread (normalised conformal) needs an honest spread of
each out-of-fold row, and the OOF table has none: each of its rows is predicted by the one fold model
that did not see it, while the other folds' models trained on it. So it is not offered here.

The method is chosen by a rule fixed here (choose_method), on coverage and width cross-fitted over
the OOF table's folds (fit on the other folds, measure on the held-out one): never by eye, never on
the locked test split. Everything returned is plain JSON (it goes into the bundle's training.json).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from boneage.validation import metrics

METHODS = ("global", "sex", "age_band")
# A predicted-age band calibrates on its own only with at least this many rows (and at least the
# ceil((n + 1) * level) <= n minimum of the level): below, its quantile is mostly noise.
MIN_BAND_ROWS = 30
# The method choice holds a true-age band to nominal coverage only from this many cross-fitted rows.
MIN_GROUP_ROWS = 10


def min_rows(level: float) -> int:
    """The fewest rows whose conformal `level` quantile is finite: ceil((n + 1) level) <= n."""
    return int(math.ceil(level / (1 - level) - 1e-9))


def conformal_quantile(abs_residuals, level: float) -> float:
    """The ceil((n + 1) level)-th smallest of the finite |residuals|. ValueError with too few rows (the
    honest interval would be unbounded) or a level outside (0, 1)."""
    if not 0 < level < 1:
        raise ValueError(f"interval level must be in (0, 1), not {level}")
    r = np.asarray(abs_residuals, dtype=float)
    r = np.sort(r[np.isfinite(r)])
    rank = int(math.ceil((len(r) + 1) * level - 1e-9))
    if rank > len(r):
        raise ValueError(f"a {level:.0%} conformal interval needs at least {min_rows(level)} out-of-fold rows with "
                         f"a prediction and a label, not {len(r)}")
    return float(r[rank - 1])


def age_band_index(age_months) -> np.ndarray:
    """The index into metrics.AGE_BANDS of each age (the first band below 0, the last above 228; -1 for NaN)."""
    a = np.asarray(age_months, dtype=float).reshape(-1)
    upper = np.array([hi for _, _, hi in metrics.AGE_BANDS[:-1]])
    out = np.searchsorted(upper, a, side="right")
    out[~np.isfinite(a)] = -1
    return out


def _columns(table: pd.DataFrame, prediction: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    missing = [c for c in (prediction, "boneage", "male") if c not in table]
    if missing:
        raise ValueError(f"the out-of-fold table has no column {missing} (has {list(table.columns)})")
    return (table[prediction].to_numpy(float, na_value=np.nan), table["boneage"].to_numpy(float, na_value=np.nan),
            table["male"].to_numpy(bool))


def fit_interval(table: pd.DataFrame, level: float, method: str, prediction: str = "prediction") -> dict[str, Any]:
    """The calibration of `method` at `level` from `table` (columns `prediction`, boneage, male; rows
    with a NaN prediction or label are left out and counted): {"level", "method", "rows",
    "half_width": {...}} where half_width holds "all" (global h) and, per method, "F"/"M" or one
    entry per age band label (null: the band fell back to "all")."""
    if method not in METHODS:
        raise ValueError(f"interval method must be one of {METHODS}, not {method!r}")
    pred, y, male = _columns(table, prediction)
    ok = np.isfinite(pred) & np.isfinite(y)
    pred, y, male = pred[ok], y[ok], male[ok]
    r = np.abs(pred - y)
    half: dict[str, Any] = {"all": conformal_quantile(r, level)}
    rows: dict[str, int] = {"all": int(len(r))}
    if method == "sex":
        for sex, mask in (("F", ~male), ("M", male)):
            rows[sex] = int(mask.sum())
            half[sex] = conformal_quantile(r[mask], level) if mask.sum() >= max(min_rows(level), 1) else None
    elif method == "age_band":
        band = age_band_index(pred)
        for i, (label, _, _) in enumerate(metrics.AGE_BANDS):
            mask = band == i
            rows[label] = int(mask.sum())
            enough = mask.sum() >= max(MIN_BAND_ROWS, min_rows(level))
            half[label] = conformal_quantile(r[mask], level) if enough else None
    return {"level": float(level), "method": method, "rows": rows, "left_out": int((~ok).sum()),
            "half_width": half}


def half_width(pred, sex, calibration: Mapping[str, Any]) -> np.ndarray:
    """The interval's half-width (months) of each prediction: NaN where the prediction is NaN. `sex`: one
    per prediction ('F', 'M' or None), or one for all of them."""
    p = np.asarray(pred, dtype=float).reshape(-1)
    sex = np.asarray(sex, dtype=object).reshape(-1) if sex is not None else np.full(len(p), None, dtype=object)
    if sex.size == 1:  # one sex for every prediction (scoring an unknown-sex image as each sex in turn)
        sex = np.full(len(p), sex[0], dtype=object)
    table = calibration["half_width"]
    h = np.full(len(p), float(table["all"]))
    if calibration["method"] == "sex":
        f, m = (table.get(s) if table.get(s) is not None else table["all"] for s in ("F", "M"))
        h = np.where(sex == "F", f, np.where(sex == "M", m, max(f, m)))  # unknown sex: the wider
    elif calibration["method"] == "age_band":
        band = age_band_index(p)
        for i, (label, _, _) in enumerate(metrics.AGE_BANDS):
            if table.get(label) is not None:
                h[band == i] = table[label]
    elif calibration["method"] != "global":
        raise ValueError(f"unknown interval method {calibration['method']!r}")
    h[~np.isfinite(p)] = np.nan
    return h


def apply_interval(pred, sex, calibration: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) months of each prediction; all NaN without a calibration (an older bundle). The
    lower bound is cut at 0 months (no label is below it, so coverage is unchanged)."""
    p = np.asarray(pred, dtype=float).reshape(-1)
    if calibration is None:
        return np.full(len(p), np.nan), np.full(len(p), np.nan)
    h = half_width(p, sex, calibration)
    return np.maximum(p - h, 0.0), p + h


def coverage_report(lower, upper, truth, male, level: float | None = None) -> dict[str, Any]:
    """{"all", "by_sex", "by_age_band"} of {"n", "coverage", "mean_width"} (bands by true bone age, as
    the accuracy tables; empty groups left out): how often lower <= truth <= upper, and the mean
    upper - lower. Rows with a NaN bound or label are not counted."""
    lo, hi = np.asarray(lower, float).reshape(-1), np.asarray(upper, float).reshape(-1)
    y, male = np.asarray(truth, float).reshape(-1), np.asarray(male, bool).reshape(-1)
    ok = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(y)
    covered = (lo <= y) & (y <= hi)
    width = hi - lo
    out: dict[str, Any] = {"level": level, "all": {}, "by_sex": {}, "by_age_band": {}}
    for name, mask in metrics.groups(pd.DataFrame({"boneage": y, "male": male})).items():
        mask = mask & ok
        if name != "all" and not mask.any():
            continue
        cell = {"n": int(mask.sum()), "coverage": float(covered[mask].mean()) if mask.any() else None,
                "mean_width": float(width[mask].mean()) if mask.any() else None}
        if name == "all":
            out["all"] = cell
        else:
            out["by_sex" if name in ("F", "M") else "by_age_band"][name] = cell
    return out


def cross_fitted_coverage(table: pd.DataFrame, level: float, method: str,
                          prediction: str = "prediction") -> dict[str, Any]:
    """coverage_report of `method`'s intervals cross-fitted over the table's `fold` column: each fold's
    rows get the interval fitted on the other folds' rows."""
    if "fold" not in table:
        raise ValueError("cross-fitting needs the out-of-fold table's `fold` column")
    table = table.reset_index(drop=True)
    fold = table["fold"].to_numpy(int)
    if len(np.unique(fold)) < 2:
        raise ValueError("cross-fitting needs at least 2 folds")
    lower, upper = np.full(len(table), np.nan), np.full(len(table), np.nan)
    for f in np.unique(fold):
        held = fold == f
        calibration = fit_interval(table[~held], level, method, prediction)
        sex = np.where(table.loc[held, "male"].to_numpy(bool), "M", "F")
        lower[held], upper[held] = apply_interval(table.loc[held, prediction].to_numpy(float), sex, calibration)
    return coverage_report(lower, upper, table["boneage"], table["male"], level)


def coverage_tolerance(level: float, n: int) -> float:
    """How far below `level` a cross-fitted coverage on n rows may fall and still count as nominal:
    1.96 binomial standard errors."""
    return 1.96 * math.sqrt(level * (1 - level) / max(n, 1))


def shortfall(report: Mapping[str, Any], level: float) -> float:
    """How far a cross_fitted_coverage report falls short of nominal, in binomial standard errors: the
    worst of its overall coverage and of every true-age band with at least MIN_GROUP_ROWS rows, each
    measured as (level - coverage) / SE(level, n). At most 1.96 counts as nominal."""
    cells = [report["all"], *(c for c in report.get("by_age_band", {}).values() if c["n"] >= MIN_GROUP_ROWS)]
    return max((level - c["coverage"]) / (coverage_tolerance(level, c["n"]) / 1.96) for c in cells)


def choose_method(comparison: Mapping[str, Mapping[str, Any]], level: float) -> tuple[str, str]:
    """(method, why) from {method: cross_fitted_coverage}: among the methods whose coverage is nominal
    overall AND in every true-age band with at least MIN_GROUP_ROWS rows (each at least level - 1.96
    binomial SE: `shortfall`), the narrowest mean width (ties: the earlier in METHODS, the simpler);
    when none is, the one with the smallest shortfall."""
    order = [m for m in METHODS if m in comparison]
    if not order:
        raise ValueError("no interval method to choose from")
    n = max(comparison[m]["all"]["n"] for m in order)
    nominal = [m for m in order if shortfall(comparison[m], level) <= 1.96]
    rule = (f"cross-fitted coverage at least {level:.0%} - 1.96 binomial SE overall ({n} rows) and in every age band "
            f"with at least {MIN_GROUP_ROWS} rows")
    if nominal:
        best = min(nominal, key=lambda m: (round(comparison[m]["all"]["mean_width"], 6), order.index(m)))
        return best, f"the narrowest mean width among the methods with {rule}: {', '.join(nominal)}"
    best = min(order, key=lambda m: (shortfall(comparison[m], level), order.index(m)))
    return best, f"no method had {rule}: the one that fell least short"


def calibrate(table: pd.DataFrame, level: float, prediction: str = "prediction",
              methods: Sequence[str] = METHODS) -> dict[str, Any]:
    """What the bundle stores: every method's cross-fitted coverage over the table's folds, the method
    choose_method picks, and that method fitted on all rows (fit_interval's dict plus "prediction",
    "comparison", "why" and "cross_fitted", the chosen method's cross-fitted report)."""
    comparison = {m: cross_fitted_coverage(table, level, m, prediction) for m in methods}
    method, why = choose_method(comparison, level)
    return {**fit_interval(table, level, method, prediction), "prediction": prediction, "why": why,
            "cross_fitted": comparison[method], "comparison": comparison}


def calibration_of(training: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """The interval calibration in a bundle's training.json, or None (an older bundle, or one whose
    calibration could not be fitted: training["interval"]["error"])."""
    interval = (training or {}).get("interval")
    if not interval or "half_width" not in interval:
        return None
    return dict(interval)


def describe(calibration: Mapping[str, Any] | None, training: Mapping[str, Any] | None = None) -> str:
    """The scoring summary's line about the interval."""
    if calibration is None:
        why = ((training or {}).get("interval") or {}).get("error")
        return ("[score] warning: the bundle has no prediction interval calibration"
                + (f" ({why})" if why else " (an older bundle)")
                + ": boneage_lower_months / boneage_upper_months are null and SDS verdicts use the point estimate")
    cross = calibration.get("cross_fitted", {}).get("all", {})
    measured = (f"; out of fold it covered {cross['coverage']:.0%} with mean width {cross['mean_width']:.1f} mo"
                if cross.get("coverage") is not None else "")
    return (f"[score] bone age intervals: {calibration['level']:.0%} conformal ({calibration['method']}), "
            f"half-width {calibration['half_width']['all']:.1f} mo overall{measured}")
