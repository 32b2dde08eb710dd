"""The linear ensemble of the zone models, per sex, without Ray: fits, the weights record, honest
(cross-validated) ensemble predictions and the MAE tables. boneage.distributed.ray_ensemble tunes a gradient fit
of the same form on Ray Tune.

Form: age = intercept + sum_k w_k * pred_k with w_k >= 0, one (intercept, w) per sex. Non-negative
weights because every kind predicts the same quantity: a negative weight would only exploit noise
shared between kinds (on a few hundred images it overfits), and the seed's ensemble (Rakhlin 2017)
was exactly such a blend in which the classification models took the larger weights. The weights
do not have to sum to 1 and the intercept is free, so the ensemble can also undo a common shrinkage
of the predictions towards the mean age (a model trained with an MAE loss underestimates the old and
overestimates the young).

Two direct solvers: :func:`fit_lad` (least absolute deviations: minimises the competition metric
itself, and a few grossly wrong labels or predictions move it little) and :func:`fit_nnls` (least
squares: the classic stacking solver, pulled by outliers).

The ensemble's MAE is never measured on the rows its weights were fit on: :func:`cross_validated`
refits the weights once per CV fold on the other folds' out-of-fold rows (the OOF table's own folds)
and predicts the held-out fold, so every image's ensemble prediction comes from weights that never
saw its label. The final weights (:func:`fit_ensemble`) are fit on all rows.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import scipy.optimize
import scipy.sparse

from boneage.validation import cv
from boneage.validation.metrics import groups

SEXES = ("F", "M")

Fit = Callable[[np.ndarray, np.ndarray], tuple[float, np.ndarray]]


# -- direct solvers -------------------------------------------------------------------------------


def _check_xy(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    X, y = np.asarray(X, float), np.asarray(y, float)
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise ValueError(f"need X (n, k) and y (n,), got {X.shape} and {y.shape}")
    if len(y) == 0 or X.shape[1] == 0:
        raise ValueError("cannot fit an ensemble on no rows or no model kinds")
    if not (np.isfinite(X).all() and np.isfinite(y).all()):
        raise ValueError("X and y must be finite (leave out the kinds with NaN predictions)")
    return X, y


def fit_lad(X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(intercept, weights >= 0) minimising sum |y - b - X w|: least absolute deviations as a linear
    program (HiGHS), with residual r = u - v, u, v >= 0: min sum(u + v) s.t. b + X w + u - v = y."""
    X, y = _check_xy(X, y)
    n, k = X.shape
    eye = scipy.sparse.identity(n, format="csr")
    a_eq = scipy.sparse.hstack([scipy.sparse.csr_matrix(np.ones((n, 1))), scipy.sparse.csr_matrix(X), eye, -eye],
                               format="csr")
    c = np.concatenate([[0.0], np.zeros(k), np.ones(2 * n)])
    bounds = [(None, None)] + [(0.0, None)] * (k + 2 * n)
    res = scipy.optimize.linprog(c, A_eq=a_eq, b_eq=y, bounds=bounds, method="highs")
    if res.status != 0:
        raise RuntimeError(f"LAD fit failed: {res.message}")
    return float(res.x[0]), np.maximum(res.x[1 : k + 1], 0.0)


def fit_nnls(X: np.ndarray, y: np.ndarray) -> tuple[float, np.ndarray]:
    """(intercept, weights >= 0) minimising sum (y - b - X w)^2. For any w the best free intercept is
    mean(y) - mean(X) w, so the problem is NNLS on the centred columns, and b follows."""
    X, y = _check_xy(X, y)
    x_mean, y_mean = X.mean(axis=0), y.mean()
    w, _ = scipy.optimize.nnls(X - x_mean, y - y_mean)
    return float(y_mean - x_mean @ w), w


FITTERS: dict[str, Fit] = {"lad": fit_lad, "nnls": fit_nnls}


def fitter(method: str) -> Fit:
    if method not in FITTERS:
        raise ValueError(f"unknown ensemble method {method!r}; known: {', '.join(FITTERS)}")
    return FITTERS[method]


# -- the rows of a sex ----------------------------------------------------------------------------


def sex_rows(oof: pd.DataFrame) -> dict[str, np.ndarray]:
    """{'F': row positions of the females, 'M': of the males}, only the sexes that have rows."""
    male = oof["male"].to_numpy(bool)
    return {sex: rows for sex, rows in (("F", np.flatnonzero(~male)), ("M", np.flatnonzero(male))) if len(rows)}


def usable_kinds(oof: pd.DataFrame, kinds: Sequence[str], rows: np.ndarray) -> list[str]:
    """The kinds with a finite prediction for every one of `rows` (one sex's OOF rows). A kind with
    a NaN (its trial for some fold did not finish) is left out of that sex's fit and gets weight 0:
    fitting on the complete rows only would give it a weight learnt on part of the folds, and
    imputing its NaNs would invent predictions."""
    missing = [k for k in kinds if k not in oof.columns]
    if missing:
        raise ValueError(f"the OOF table has no column for kind(s) {missing}")
    return [k for k in kinds if np.isfinite(oof[k].to_numpy(float)[rows]).all()]


# -- the weights record ---------------------------------------------------------------------------


def make_record(method: str, kinds: Sequence[str], by_sex: Mapping[str, tuple[float, Mapping[str, float]]],
                **extra: Any) -> dict[str, Any]:
    """The JSON-serialisable weights record: {"method", "kinds", "by_sex": {sex: {"intercept",
    "weights": {kind: w}}}, ...extra}; every kind of `kinds` appears in each sex's weights (0 for
    the kinds left out)."""
    record: dict[str, Any] = {"method": method, "kinds": list(kinds), "by_sex": {}}
    for sex, (intercept, weights) in by_sex.items():
        record["by_sex"][sex] = {"intercept": float(intercept),
                                 "weights": {k: float(weights.get(k, 0.0)) for k in kinds}}
    record.update(extra)
    return record


def predict(record: Mapping[str, Any], preds: pd.DataFrame, male: Sequence[bool] | np.ndarray) -> np.ndarray:
    """The ensemble's age (months) for each row of `preds` (one column per model kind) by its sex's
    weights. Raises ValueError when a kind that has a non-zero weight for a sex present in `male` has
    no column, or `male` has a sex the record has no weights for. Columns of zero-weight kinds may be
    missing or NaN; a NaN in a weighted kind makes that row's prediction NaN (that model failed on it)."""
    male = np.asarray(male)
    if male.dtype == object:
        if any(m is None or (isinstance(m, float) and np.isnan(m)) for m in male):
            raise ValueError("every row needs a sex (male True/False) to pick its ensemble weights")
        male = male.astype(bool)
    male = male.astype(bool)
    if len(male) != len(preds):
        raise ValueError(f"{len(preds)} rows of predictions but {len(male)} sexes")
    out = np.full(len(preds), np.nan)
    for sex, rows in (("F", np.flatnonzero(~male)), ("M", np.flatnonzero(male))):
        if not len(rows):
            continue
        if sex not in record["by_sex"]:
            raise ValueError(f"the ensemble record ({record.get('method')}) has no weights for sex {sex}")
        fit = record["by_sex"][sex]
        used = {k: w for k, w in fit["weights"].items() if w != 0.0}
        absent = [k for k in used if k not in preds.columns]
        if absent:
            raise ValueError(f"the ensemble ({record.get('method')}) needs the predictions of model kind(s) "
                             f"{absent} for sex {sex}, but the table has only {list(preds.columns)}")
        value = np.full(len(rows), float(fit["intercept"]))
        for kind, w in used.items():
            value += w * preds[kind].to_numpy(float)[rows]
        out[rows] = value
    return out


# -- cross-validated ensemble ---------------------------------------------------------------------


def cross_validated(oof: pd.DataFrame, kinds: Sequence[str], fit: Fit | str,
                    folds: Sequence[int] | None = None) -> np.ndarray:
    """The ensemble's honest out-of-fold prediction of every row: for each sex and each CV fold f,
    weights fit (by `fit`, a solver or a FITTERS name) on that sex's rows of the other folds predict
    the sex's rows of fold f. No row's prediction depends on its own label. Only the folds in `folds`
    are predicted when given (NaN elsewhere); NaN too for a sex with no usable kind."""
    fit = fitter(fit) if isinstance(fit, str) else fit
    oof = oof.reset_index(drop=True)
    y, fold = oof["boneage"].to_numpy(float), oof["fold"].to_numpy(int)
    wanted = None if folds is None else {int(f) for f in folds}
    out = np.full(len(oof), np.nan)
    for sex, rows in sex_rows(oof).items():
        use = usable_kinds(oof, kinds, rows)
        if not use:
            continue
        X = oof[use].to_numpy(float)
        for f in np.unique(fold[rows]):
            if wanted is not None and int(f) not in wanted:
                continue
            test, train = rows[fold[rows] == f], rows[fold[rows] != f]
            if not len(train):
                continue
            intercept, w = fit(X[train], y[train])
            out[test] = intercept + X[test] @ w
    return out


def inner_cv_mae(oof: pd.DataFrame, kinds: Sequence[str], fit: Fit | str) -> dict[int, float]:
    """{outer fold f: the MAE of `fit` cross-validated over the other folds only}: what nested CV
    selects a fit's settings by for fold f, without looking at fold f. Needs >= 3 folds (NaN else)."""
    oof = oof.reset_index(drop=True)
    fold = oof["fold"].to_numpy(int)
    out = {}
    for f in np.unique(fold):
        inner = oof[fold != f].reset_index(drop=True)
        out[int(f)] = (mae(cross_validated(inner, kinds, fit), inner["boneage"].to_numpy(float))
                       if inner["fold"].nunique() >= 2 else float("nan"))
    return out


def nested_cross_validated(oof: pd.DataFrame, kinds: Sequence[str], candidates: Sequence[Fit],
                           inner: Sequence[Mapping[int, float]] | None = None) -> tuple[np.ndarray, dict[int, int]]:
    """(prediction, {fold: index of the candidate chosen for it}): for each fold f, the candidate
    fit with the lowest inner CV MAE on the other folds (`inner[i]` = inner_cv_mae of candidate i,
    computed here when not given) is fit on the other folds and predicts fold f. This is the honest
    MAE of "pick the best settings by CV, then fit": choosing by the plain CV MAE and reporting that
    same MAE is optimistic by the selection."""
    oof = oof.reset_index(drop=True)
    inner = list(inner) if inner is not None else [inner_cv_mae(oof, kinds, c) for c in candidates]
    fold = oof["fold"].to_numpy(int)
    out, chosen = np.full(len(oof), np.nan), {}
    for f in np.unique(fold):
        scores = np.array([s.get(int(f), np.nan) for s in inner], float)
        if np.isnan(scores).all():
            raise ValueError("nested CV needs at least 3 folds (an inner CV over the other folds)")
        chosen[int(f)] = best = int(np.nanargmin(scores))
        pred = cross_validated(oof, kinds, candidates[best], folds=[int(f)])
        out[fold == f] = pred[fold == f]
    return out, chosen


# -- a gradient fit (what the Tune trials tune) ---------------------------------------------------


def fit_gd(X: np.ndarray, y: np.ndarray, lr: float = 0.03, steps: int = 500, loss: str = "l1",
           huber_delta: float = 5.0, shrink: float = 0.0, init: str = "equal") -> tuple[float, np.ndarray]:
    """(intercept, weights >= 0) by projected Adam on the mean L1 (or Huber, `huber_delta` months)
    loss + shrink * ||w - 1/k||^2 (a pull towards the plain average of the kinds, for small tables),
    with a cosine-decayed learning rate (subgradient steps need it to settle). Columns and target are
    centred and scaled by sd(y) first: the kinds' predictions are nearly collinear with the constant,
    which makes the raw problem badly conditioned. `init`: "equal" (1/k each) or "best" (all weight
    on the kind with the lowest MAE). Deterministic."""
    X, y = _check_xy(X, y)
    if loss not in ("l1", "huber"):
        raise ValueError(f"loss must be 'l1' or 'huber', got {loss!r}")
    n, k = X.shape
    scale = float(np.std(y)) if np.std(y) > 1e-9 else 1.0
    x_mean, y_mean = X.mean(axis=0), float(y.mean())
    xc, yc = (X - x_mean) / scale, (y - y_mean) / scale
    target = np.full(k, 1.0 / k)
    if init == "equal":
        w = target.copy()
    elif init == "best":
        w = np.zeros(k)
        w[int(np.argmin(np.abs(X - y[:, None]).mean(axis=0)))] = 1.0
    else:
        raise ValueError(f"init must be 'equal' or 'best', got {init!r}")
    theta = np.concatenate([[float(np.median(yc - xc @ w))], w])  # intercept, then weights
    m, v = np.zeros(k + 1), np.zeros(k + 1)
    delta = huber_delta / scale
    steps = int(steps)
    for t in range(1, steps + 1):
        r = theta[0] + xc @ theta[1:] - yc
        g_r = np.sign(r) if loss == "l1" else np.clip(r / delta, -1.0, 1.0)
        grad = np.concatenate([[g_r.mean()], xc.T @ g_r / n + 2.0 * shrink * (theta[1:] - target)])
        m = 0.9 * m + 0.1 * grad
        v = 0.999 * v + 0.001 * grad * grad
        step = lr * 0.5 * (1.0 + np.cos(np.pi * (t - 1) / steps))
        theta -= step * (m / (1 - 0.9**t)) / (np.sqrt(v / (1 - 0.999**t)) + 1e-8)
        theta[1:] = np.maximum(theta[1:], 0.0)
    w = theta[1:]
    return float(y_mean + scale * theta[0] - x_mean @ w), w


def mae(pred: np.ndarray, y: np.ndarray) -> float:
    err = np.abs(np.asarray(pred, float) - np.asarray(y, float))
    return float(np.nanmean(err)) if np.isfinite(err).any() else float("nan")


def mae_by_sex(oof: pd.DataFrame, pred: np.ndarray) -> dict[str, float]:
    """{"all", "F", "M"} MAE of `pred` against oof.boneage (sexes without rows are left out)."""
    y, male = oof["boneage"].to_numpy(float), oof["male"].to_numpy(bool)
    out = {"all": mae(pred, y)}
    for sex, mask in (("F", ~male), ("M", male)):
        if mask.any():
            out[sex] = mae(pred[mask], y[mask])
    return out


def fit_all(oof: pd.DataFrame, kinds: Sequence[str], fit: Fit) -> dict[str, tuple[float, dict[str, float]]]:
    """{sex: (intercept, {kind: weight})} fit on all of each sex's rows; kinds left out weigh 0."""
    oof = oof.reset_index(drop=True)
    y = oof["boneage"].to_numpy(float)
    out = {}
    for sex, rows in sex_rows(oof).items():
        use = usable_kinds(oof, kinds, rows)
        if not use:
            raise ValueError(f"no model kind has out-of-fold predictions for every {sex} image: "
                             f"cannot fit that sex's ensemble")
        intercept, w = fit(oof[use].to_numpy(float)[rows], y[rows])
        out[sex] = (intercept, dict(zip(use, map(float, w))))
    return out


def fit_ensemble(oof: pd.DataFrame, kinds: Sequence[str], method: str = "lad") -> tuple[dict[str, Any], np.ndarray]:
    """(record, cv_pred): the weights of each sex fit by `method` ("lad" or "nnls") on all OOF rows,
    and the cross-validated ensemble prediction of every row. The record carries that prediction's
    MAE as "cv_mae" ({"all", "F", "M"}), the number that the final weights will do about as well as
    on new images, and the kinds each sex's fit left out ("excluded")."""
    oof = oof.reset_index(drop=True)
    fit = fitter(method)
    by_sex = fit_all(oof, kinds, fit)
    cv_pred = cross_validated(oof, kinds, fit)
    excluded = {sex: [k for k in kinds if k not in w] for sex, (_, w) in by_sex.items()}
    record = make_record(method, kinds, by_sex, cv_mae=mae_by_sex(oof, cv_pred), excluded=excluded,
                         n={sex: int(len(rows)) for sex, rows in sex_rows(oof).items()},
                         folds=int(oof["fold"].nunique()))
    return record, cv_pred


# -- MAE tables -----------------------------------------------------------------------------------


def mae_table(oof: pd.DataFrame, kinds: Sequence[str], ensembles: Mapping[str, np.ndarray] | None = None,
              baseline: bool = True) -> pd.DataFrame:
    """One row per model (each kind column, each ensemble's CV prediction, the per-sex median) with
    mae_<group> and n_<group> (predictions scored) for the groups of :func:`groups`. Every number is
    out-of-fold: pass the ensembles' cross-validated predictions, never a fit on all rows."""
    oof = oof.reset_index(drop=True)
    y = oof["boneage"].to_numpy(float)
    models: list[tuple[str, str, np.ndarray]] = [("kind", k, oof[k].to_numpy(float)) for k in kinds]
    models += [("ensemble", name, np.asarray(p, float)) for name, p in (ensembles or {}).items()]
    if baseline:
        models.append(("baseline", "per-sex median", cv.median_baseline(oof)))
    masks = groups(oof)
    rows = []
    for role, name, pred in models:
        row: dict[str, Any] = {"model": name, "role": role}
        for group, mask in masks.items():
            err = np.abs(pred[mask] - y[mask])
            row[f"mae_{group}"] = float(np.nanmean(err)) if np.isfinite(err).any() else float("nan")
            row[f"n_{group}"] = int(np.isfinite(err).sum())
        rows.append(row)
    return pd.DataFrame(rows)
