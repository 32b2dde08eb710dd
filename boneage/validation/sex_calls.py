"""When the sex classifier's call may stand in for an unknown sex: a threshold chosen on the CV's
out-of-fold P(male), the rate of wrong calls it gives, and the bundle's record of both.

A call is the sex P(male) points to (male above 0.5, female below); it is confident at threshold
`p_low` when P(male) ≤ p_low or ≥ 1 − p_low (symmetric). The threshold is the loosest one (the most
calls) whose out-of-fold confident calls are wrong at most `max_error_rate` of the time, on at least
`min_calls` of them. That rate is measured on the labels that chose the threshold, so it is optimistic;
the honest estimate is cross-fitted: fold f's images are called at the threshold chosen on the other
folds' images, and the wrong calls are counted over all folds. The feature is on only when both rates
meet the target on enough calls; otherwise the bundle says why, and scoring never uses a predicted sex.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd

from boneage.validation import metrics

OFF_OLD_BUNDLE = "the bundle predates measured sex calls (no sex_prediction in training.json)"
OFF_NO_CLASSIFIER = "the bundle has no sex classifier"


def _checked(p_male, male) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(p_male, float), np.asarray(male)
    if p.shape != y.shape:
        raise ValueError(f"p_male and male differ in length ({len(p)} and {len(y)})")
    if not np.isfinite(p).all() or ((p < 0) | (p > 1)).any():
        raise ValueError("p_male must be a probability for every image (an unfinished sex trial leaves NaN)")
    if pd.isna(y).any():
        raise ValueError("male must be known for every image whose call is checked")
    return p, y.astype(bool)


def within(wrong, calls, max_error_rate: float):
    """wrong ≤ max_error_rate × calls, without a float product's rounding (0.29 × 100 < 29) deciding."""
    return np.asarray(wrong) <= max_error_rate * np.asarray(calls) + 1e-9


def distance_to_certainty(p_male) -> np.ndarray:
    """min(P, 1 − P): a call is confident at threshold t when this is at most t."""
    p = np.asarray(p_male, float)
    return np.minimum(p, 1 - p)


def confident_calls(p_male, male, p_low: float) -> dict[str, Any]:
    """{"calls", "wrong", "error_rate"} of the calls with P(male) ≤ p_low or ≥ 1 − p_low (error_rate None
    without calls). p_low < 0.5: P(male) = 0.5 is never a call."""
    p, y = _checked(p_male, male)
    if not 0 <= p_low < 0.5:
        raise ValueError(f"p_low must be in [0, 0.5), not {p_low}")
    called = distance_to_certainty(p) <= p_low
    wrong = int(((p[called] > 0.5) != y[called]).sum())
    calls = int(called.sum())
    return {"calls": calls, "wrong": wrong, "error_rate": wrong / calls if calls else None}


def choose_threshold(p_male, male, max_error_rate: float, min_calls: int) -> float | None:
    """The largest p_low (the most confident calls) at which at least `min_calls` images are called and
    at most `max_error_rate` of those calls are wrong; None when no threshold does both. Candidates are
    the images' own min(P, 1 − P) below 0.5 (between two of them the calls do not change)."""
    p, y = _checked(p_male, male)
    d = distance_to_certainty(p)
    order = np.argsort(d, kind="stable")
    d, wrong = d[order], ((p > 0.5) != y)[order]
    calls = np.arange(1, len(d) + 1)
    errors = np.cumsum(wrong)
    # With ties, a threshold calls every image at its distance: keep the last index of each value.
    last = np.r_[d[1:] != d[:-1], True] & (d < 0.5)
    ok = last & (calls >= min_calls) & within(errors, calls, max_error_rate)
    return float(d[np.flatnonzero(ok)[-1]]) if ok.any() else None


def cross_fitted(p_male, male, fold, max_error_rate: float, min_calls: int) -> dict[str, Any]:
    """The confident-call error rate no label of which chose its threshold: fold f's images are called
    at the threshold choose_threshold picks on the other folds (none: fold f makes no calls).
    {"calls", "wrong", "error_rate", "folds": [{fold, p_low (None: off), calls, wrong}]}; the other
    folds need at least `min_calls` images between them for a threshold, as at bundle time."""
    p, y = _checked(p_male, male)
    fold = np.asarray(fold)
    if len(np.unique(fold)) < 2:
        raise ValueError("cross-fitting the sex threshold needs at least two folds")
    per_fold, calls, wrong = [], 0, 0
    for f in np.unique(fold):
        held = fold == f
        p_low = choose_threshold(p[~held], y[~held], max_error_rate, min_calls)
        got = confident_calls(p[held], y[held], p_low) if p_low is not None else {"calls": 0, "wrong": 0}
        per_fold.append({"fold": int(f), "p_low": p_low, "calls": got["calls"], "wrong": got["wrong"]})
        calls, wrong = calls + got["calls"], wrong + got["wrong"]
    return {"calls": calls, "wrong": wrong, "error_rate": wrong / calls if calls else None,
            "folds": per_fold}


def calibrate(oof: pd.DataFrame, max_error_rate: float, min_calls: int) -> dict[str, Any]:
    """training.json's "sex_prediction" from the CV's out-of-fold table (male, fold, p_male): the
    threshold, its rate on the labels that chose it ("selected", optimistic) and cross-fitted, whether
    scoring may use a predicted sex ("on"; else "off_reason"), and the out-of-fold ROC AUC."""
    p, y = _checked(oof["p_male"], oof["male"])
    out: dict[str, Any] = {
        "max_error_rate": max_error_rate, "min_confident_calls": min_calls, "images": int(len(p)),
        "auc": metrics.roc_auc(p, y), "p_low": None, "p_high": None,
        "source": "out-of-fold P(male) of the CV's sex classifier (one fold model per image; scoring averages "
                  "the k fold models)"}
    p_low = choose_threshold(p, y, max_error_rate, min_calls)
    crossed = cross_fitted(p, y, oof["fold"], max_error_rate, min_calls)
    out["cross_fitted"] = crossed
    if p_low is None:
        # How far from the target: the error rate of the min_calls most confident calls.
        d = np.sort(distance_to_certainty(p))
        if (d < 0.5).sum() < min_calls:
            reason = f"fewer than {min_calls} out-of-fold images with a call at all"
        else:
            best = confident_calls(p, y, float(d[min_calls - 1]))
            reason = (f"out-of-fold error rate of confident calls {best['error_rate']:.0%} (its {best['calls']} most "
                      f"confident calls) > {max_error_rate:.0%} target")
        out.update(on=False, off_reason=reason)
        return out
    selected = confident_calls(p, y, p_low)
    out.update(p_low=p_low, p_high=1 - p_low, called_share=selected["calls"] / len(p),
               selected={**selected, "note": "on the labels that chose the threshold: optimistic"})
    if crossed["calls"] < min_calls or not within(crossed["wrong"], crossed["calls"], max_error_rate):
        out.update(on=False, off_reason=(
            f"out-of-fold error rate of confident calls {crossed['error_rate']:.0%} (cross-fitted, "
            f"{crossed['wrong']} of {crossed['calls']}) > {max_error_rate:.0%} target"
            if crossed["calls"] >= min_calls else
            f"cross-fitted, only {crossed['calls']} confident calls (< {min_calls})"))
        return out
    out["on"] = True
    return out


def of_bundle(training: Mapping[str, Any], sex_kind: str | None) -> dict[str, Any]:
    """What scoring does with the bundle's sex classifier: {"on", "p_low", "p_high", "off_reason", ...}
    from training.json's "sex_prediction"; off for a bundle without a classifier or made before the
    rate was measured (the safe default)."""
    if sex_kind is None:
        return {"on": False, "p_low": None, "p_high": None, "off_reason": OFF_NO_CLASSIFIER}
    record = training.get("sex_prediction")
    if not record:
        return {"on": False, "p_low": None, "p_high": None, "off_reason": OFF_OLD_BUNDLE}
    if not record.get("on"):
        return {**record, "p_low": None, "p_high": None}
    return dict(record)


def describe(settings: Mapping[str, Any]) -> str:
    """The line `boneage score` prints once about predicted sex."""
    if not settings.get("on"):
        return f"[score] sex prediction off for this bundle: {settings.get('off_reason')}"
    c = settings["cross_fitted"]
    return (f"[score] sex prediction on for this bundle: an unknown sex is replaced where P(male) ≤ "
            f"{settings['p_low']:.3f} or ≥ {settings['p_high']:.3f}; out of fold those calls are wrong "
            f"{c['error_rate']:.1%} of the time (cross-fitted, {c['wrong']} of {c['calls']}; target "
            f"{settings['max_error_rate']:.0%}); such rows say sex_source 'predicted'")
