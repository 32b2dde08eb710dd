"""The rejection gate: which scored images should not be trusted. The bone age is still written; the
gate says `accepted` False and why (`reject_reason`, reasons joined by ';', in the order of REASONS).

Every threshold is measured on data, never set by hand:
  - the labels' range per sex: the training labels (a prediction outside it extrapolates);
  - zone models disagreeing: the SD across the model kinds' predictions of ONE fold model set, above
    its `quantile` on the out-of-fold table. Out of fold, each image's kinds are predicted by the one
    fold that did not see it; at scoring the same statistic is computed with one fold too, picked from
    the image's id (fold_of: a rerun gives the same answer), so the threshold and the check see the same
    quantity and the nominal rate (1 - quantile of images like the training data) holds. The spread of
    the fold-AVERAGED kinds (the kind columns of the scoring table) is smaller, and a threshold from
    single models would reject far fewer than its nominal rate there; it cannot be calibrated honestly,
    since every image was unseen by one fold model only.
  - fold models disagreeing: NOT checked by bundles from this version. Its statistic, the SD across the
    k fold-wise ensembles (`boneage_sd_months`), is only measurable on images no fold model saw, and
    the only such set of a run is the locked test split, which must not set anything the bundle ships.
    Older bundles took it from their test split (training.json test.gate_fold_spread): still applied.
The registration and mask QA flags, an unknown sex (the bone age is then the mean of both sexes'
readings; a sex predicted with confidence by the bundle's sex classifier counts as known) and a failed
row reject without a threshold.
"""

from __future__ import annotations

import zlib
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

# Reasons, in the order they are listed in `reject_reason`.
REASONS = {
    "not_scored": "the image has no bone age (see `error`)",
    "registration_doubtful": "registration QA flag: key points or transform look wrong",
    "mask_doubtful": "hand mask QA flag",
    "sex_unknown": "no sex known, nor predicted with confidence: the bone age is the mean of both sexes' readings",
    "outside_label_range": "the bone age is outside the range of the training labels for this sex",
    "zone_models_disagree": "the zone models disagree more than on all but (1-quantile) of the out-of-fold images",
    "fold_models_disagree": "the fold-wise ensembles disagree more than on all but (1-quantile) of the test split "
                            "(bundles written before this check was dropped only)",
}
ZONE_SPREAD = "zone_spread_months"  # the scoring table's column with one_fold_zone_spread
# A high quantile: about 1 image in 100 like the training data is rejected by each spread check.
QUANTILE = 0.99


FOLD_SPREAD_NOT_CHECKED = ("the fold spread is only measurable on images no fold model saw; the run's only such "
                           "set is the locked test split, which sets nothing the bundle ships")


def fold_of(ids: Sequence[Any], k: int) -> np.ndarray:
    """The fold whose models give each image's zone spread at scoring: from its id (CRC-32 mod k), so a
    rerun gives the same answer and the choice has nothing to do with the image's content."""
    return np.array([zlib.crc32(str(i).encode()) % k for i in ids], dtype=int)


def one_fold_zone_spread(folds: Mapping[str, np.ndarray], ids: Sequence[Any]) -> np.ndarray:
    """The statistic the zone spread check tests at scoring: per image, the SD across kinds of the
    predictions of fold fold_of(id)'s models. folds: {kind: (n, k) months} (BundleModels.fold_predictions).
    The out-of-fold table's kind columns give the same statistic: one fold's models per image."""
    kinds = list(folds)
    if len(kinds) < 2:
        return np.full(len(ids), np.nan)
    k = min(p.shape[1] for p in folds.values())
    pick = fold_of(ids, k)
    rows = np.arange(len(ids))
    return kind_spread(np.stack([np.asarray(folds[kind], float)[rows, pick] for kind in kinds], axis=1))


def kind_spread(predictions: np.ndarray) -> np.ndarray:
    """SD (ddof 1) across model kinds, per row of an (n, kinds) array; NaN where any kind is missing."""
    predictions = np.asarray(predictions, dtype=float)
    if predictions.shape[1] < 2:
        return np.full(len(predictions), np.nan)
    return predictions.std(axis=1, ddof=1)


def calibrate(oof: pd.DataFrame, kinds: Sequence[str], quantile: float = QUANTILE) -> dict[str, Any]:
    """The gate's thresholds from the CV's out-of-fold table (id, male, boneage, one column per kind):
    {quantile, images, label_range {sex: [min, max]}, zone_spread_max {sex: months}}. Goes into the
    bundle's training.json as "gate"."""
    out: dict[str, Any] = {"quantile": quantile, "images": int(len(oof)), "label_range": {}, "zone_spread_max": {},
                           "source": "out-of-fold predictions and training labels of the CV",
                           # what the threshold was computed on: scoring tests the same (one_fold_zone_spread)
                           "zone_spread_statistic": "one_fold",
                           "nominal_rate": {"zone_models_disagree": 1 - quantile},
                           "fold_spread_not_checked": FOLD_SPREAD_NOT_CHECKED}
    for sex, rows in oof.groupby(oof["male"].astype(bool).map({True: "M", False: "F"})):
        out["label_range"][sex] = [float(rows["boneage"].min()), float(rows["boneage"].max())]
        spread = kind_spread(rows[list(kinds)].to_numpy(float))
        out["zone_spread_max"][sex] = float(np.quantile(spread, quantile)) if len(kinds) > 1 else None
    return out


def calibration_of(training: Mapping[str, Any]) -> dict[str, Any]:
    """The gate's calibration from a bundle's training.json: "gate" (bundle time); an older bundle's
    fold spread threshold from its test split (test.gate_fold_spread) is still applied; {} for a bundle
    made before the gate."""
    out = dict(training.get("gate") or {})
    fold = (training.get("test") or {}).get("gate_fold_spread")
    if fold:
        out["fold_spread_max"] = fold["fold_spread_max"]
    return out


def missing_checks(calibration: Mapping[str, Any]) -> list[str]:
    """The threshold checks the calibration cannot make (printed at the end of a run)."""
    missing = []
    if not calibration.get("label_range"):
        missing.append("outside_label_range")
    if not calibration.get("zone_spread_max"):
        missing.append("zone_models_disagree")
    if calibration.get("fold_spread_max") is None and not calibration.get("fold_spread_not_checked"):
        missing.append("fold_models_disagree")  # a bundle that says why it has none is not warned about
    return missing


def gate(table: pd.DataFrame, kinds: Sequence[str], calibration: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(accepted bool, reject_reason or None) per row of a scoring table (boneage.score's columns)."""
    n = len(table)
    ba = table["boneage_months"].to_numpy(float, na_value=np.nan)
    sex = table["sex"].to_numpy(object)

    def flag(column: str) -> np.ndarray:
        return table[column].fillna(False).astype(bool).to_numpy() if column in table else np.zeros(n, bool)

    def per_sex(values: Mapping[str, Any], pick) -> np.ndarray:
        out = np.full(n, np.nan)
        for s, v in (values or {}).items():
            if v is not None:
                out[sex == s] = pick(v)
        return out

    low, high = per_sex(calibration.get("label_range"), lambda v: v[0]), per_sex(calibration.get("label_range"),
                                                                                 lambda v: v[1])
    zone_max = per_sex(calibration.get("zone_spread_max"), float)
    if ZONE_SPREAD in table:  # scoring: one fold's kinds (one_fold_zone_spread), as the threshold was measured
        zone = table[ZONE_SPREAD].to_numpy(float, na_value=np.nan)
    else:  # the out-of-fold table: its kind columns are one fold's predictions already
        kind_values = table[list(kinds)].to_numpy(float, na_value=np.nan) if len(kinds) else np.empty((n, 0))
        zone = kind_spread(kind_values) if kind_values.shape[1] else np.full(n, np.nan)
    fold_max = calibration.get("fold_spread_max")
    fold = table["boneage_sd_months"].to_numpy(float, na_value=np.nan)
    with np.errstate(invalid="ignore"):  # NaN compares False: a check without its numbers does not fire
        checks = {
            "not_scored": ~np.isfinite(ba),
            "registration_doubtful": flag("registration_doubtful"),
            "mask_doubtful": flag("mask_doubtful"),
            "sex_unknown": flag("sex_unknown"),
            "outside_label_range": (ba < low) | (ba > high),
            "zone_models_disagree": zone > zone_max,
            "fold_models_disagree": fold > (np.inf if fold_max is None else fold_max),
        }
    reasons = np.full(n, None, dtype=object)
    for i in range(n):
        fired = [name for name in REASONS if checks[name][i]]
        reasons[i] = ";".join(fired) if fired else None
    return np.array([r is None for r in reasons]), reasons


def cross_fitted(oof: pd.DataFrame, kinds: Sequence[str], boneage: Sequence[float],
                 quantile: float = QUANTILE) -> tuple[np.ndarray, np.ndarray]:
    """The gate on the CV's out-of-fold table with thresholds that never saw the row: fold f's rows are
    gated with `calibrate` on the other folds' rows, so a row's own label and zone spread cannot set the
    threshold it is judged by. (accepted, reject_reason) per row, as `gate` gives them.

    oof: id, male, boneage (label), fold, one column per kind, and the QA flags registration_doubtful and
    mask_doubtful where known (absent: not checked). boneage: the prediction gated (the ensemble's, out of
    fold). The fold spread is not checked: each out-of-fold row was predicted by one fold model only."""
    oof = oof.reset_index(drop=True)
    folds = oof["fold"].to_numpy()
    if len(np.unique(folds)) < 2:
        raise ValueError("cross-fitting the gate needs at least two folds in the out-of-fold table")
    table = pd.DataFrame({"sex": np.where(oof["male"].to_numpy(bool), "M", "F"), "sex_unknown": False,
                          "boneage_months": np.asarray(boneage, float), "boneage_sd_months": np.nan,
                          **{c: oof[c] for c in ("registration_doubtful", "mask_doubtful") if c in oof},
                          **{k: oof[k] for k in kinds}})
    accepted, reasons = np.ones(len(oof), bool), np.full(len(oof), None, dtype=object)
    for fold in np.unique(folds):
        mine = folds == fold
        accepted[mine], reasons[mine] = gate(table[mine], kinds, calibrate(oof[~mine], kinds, quantile))
    return accepted, reasons


def rejected_for(reasons: Sequence[str | None], name: str) -> np.ndarray:
    """Rows whose reject_reason (reasons joined by ';') includes `name`."""
    return np.array([r is not None and name in str(r).split(";") for r in reasons], bool)


def rates(reasons: Sequence[str | None], boneage: Sequence[float], nominal: Mapping[str, float]
          ) -> dict[str, dict[str, float]]:
    """{check: {"nominal", "measured", "n"}}: the share of scored rows (with a bone age) that each
    threshold check of `nominal` rejected, beside the rate it was calibrated to reject."""
    scored = np.isfinite(np.asarray(boneage, float))
    reasons = np.asarray(list(reasons), dtype=object)
    return {check: {"nominal": float(rate), "n": int(scored.sum()),
                    "measured": float(rejected_for(reasons[scored], check).mean()) if scored.any() else float("nan")}
            for check, rate in nominal.items()}


def effect(accepted: Sequence[bool], reasons: Sequence[str | None], boneage: Sequence[float],
           truth: Sequence[float]) -> dict[str, Any]:
    """What the gate does to the error on labelled rows: {images, rejected, rejected_fraction,
    mae_accepted, mae_rejected, n_accepted_scored, n_rejected_scored, by_reason {reason: {n, mae}}}.
    A row rejected for several reasons counts under each; MAEs are over rows with a bone age (NaN when
    a group has none)."""
    accepted = np.asarray(accepted, bool)
    error = np.abs(np.asarray(boneage, float) - np.asarray(truth, float))
    scored = np.isfinite(error)

    def mae(rows: np.ndarray) -> float:
        rows = rows & scored
        return float(error[rows].mean()) if rows.any() else float("nan")

    by_reason = {}
    for name in REASONS:
        rows = rejected_for(reasons, name)
        if rows.any():
            by_reason[name] = {"n": int(rows.sum()), "mae": mae(rows)}
    n = len(accepted)
    return {"images": n, "rejected": int((~accepted).sum()),
            "rejected_fraction": float((~accepted).mean()) if n else float("nan"),
            "mae_accepted": mae(accepted), "mae_rejected": mae(~accepted),
            "n_accepted_scored": int((accepted & scored).sum()), "n_rejected_scored": int((~accepted & scored).sum()),
            "by_reason": by_reason}
