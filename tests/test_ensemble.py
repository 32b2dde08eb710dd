"""boneage.validation.ensemble (the per-sex linear ensemble, no Ray) and boneage.distributed.ray_ensemble (its Tune fit)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from boneage.validation import ensemble, metrics

KINDS = ["A-reg", "A-cls", "B-reg", "B-cls"]


def synthetic_oof(n_per_sex: int = 60, k: int = 3, seed: int = 0, kinds=KINDS) -> pd.DataFrame:
    """An OOF-like table: true ages over 0-228 months, each kind a noisy prediction shrunk towards
    the mean age by its own amount (what MAE-trained models do), folds dealt at random per sex."""
    rng = np.random.default_rng(seed)
    rows = []
    for male in (False, True):
        age = rng.uniform(0, 228, n_per_sex)
        frame = pd.DataFrame({"id": [f"{'m' if male else 'f'}{i}" for i in range(n_per_sex)], "male": male,
                              "boneage": age, "fold": rng.permutation(np.arange(n_per_sex) % k)})
        for j, kind in enumerate(kinds):
            shrink = 0.1 + 0.1 * j
            frame[kind] = (1 - shrink) * age + shrink * 120 + rng.normal(0, 8 + 4 * j, n_per_sex)
        rows.append(frame)
    return pd.concat(rows, ignore_index=True)


def _linear(n=200, seed=0, noise="laplace"):
    rng = np.random.default_rng(seed)
    X = rng.uniform(0, 200, (n, 4))
    w, b = np.array([0.5, 0.0, 0.3, 0.2]), 7.0
    eps = rng.laplace(0, 0.5, n) if noise == "laplace" else rng.normal(0, 0.5, n)
    return X, b + X @ w + eps, b, w


@pytest.mark.parametrize("fit", [ensemble.fit_lad, ensemble.fit_nnls])
def test_direct_solvers_recover_known_non_negative_weights_and_intercept(fit):
    X, y, b, w = _linear()
    intercept, weights = fit(X, y)
    assert weights.shape == (4,) and (weights >= 0).all()
    np.testing.assert_allclose(weights, w, atol=0.01)
    assert intercept == pytest.approx(b, abs=1.0)


@pytest.mark.parametrize("fit", [ensemble.fit_lad, ensemble.fit_nnls])
def test_weights_stay_non_negative_when_the_unconstrained_fit_would_go_negative(fit):
    rng = np.random.default_rng(1)
    X = rng.uniform(0, 100, (150, 3))
    y = 2.0 + X @ np.array([1.0, -0.5, 0.4]) + rng.normal(0, 1, 150)
    intercept, weights = fit(X, y)
    assert (weights >= 0).all() and weights[1] == pytest.approx(0.0, abs=1e-9)
    assert np.isfinite(intercept)


def test_lad_is_robust_to_a_few_outliers_where_nnls_is_not():
    X, y, b, w = _linear(n=200, seed=2)
    y = y.copy()
    y[:10] += 300.0  # 5 % grossly wrong labels
    _, w_lad = ensemble.fit_lad(X, y)
    b_nnls, w_nnls = ensemble.fit_nnls(X, y)
    lad_err, nnls_err = np.abs(w_lad - w).max(), np.abs(w_nnls - w).max()
    assert lad_err < 0.02
    assert nnls_err > 5 * lad_err and abs(b_nnls - b) > 5.0


def test_gradient_fit_reaches_the_lad_optimum():
    X, y, _, _ = _linear(n=200, seed=3)
    b_lad, w_lad = ensemble.fit_lad(X, y)
    b_gd, w_gd = ensemble.fit_gd(X, y, lr=0.05, steps=1000)
    assert (w_gd >= 0).all()
    loss = lambda b, w: np.abs(y - b - X @ w).mean()  # noqa: E731
    assert loss(b_gd, w_gd) <= loss(b_lad, w_lad) * 1.01


@pytest.mark.parametrize("method", ["lad", "nnls"])
def test_cross_validated_prediction_of_a_fold_ignores_that_folds_labels(method):
    oof = synthetic_oof(seed=4)
    before = ensemble.cross_validated(oof, KINDS, method)
    changed = oof.copy()
    fold0 = changed["fold"].to_numpy() == 0
    changed.loc[fold0, "boneage"] = np.random.default_rng(5).uniform(0, 228, fold0.sum())
    after = ensemble.cross_validated(changed, KINDS, method)
    assert np.isfinite(before).all()
    np.testing.assert_array_equal(after[fold0], before[fold0])  # its own labels play no part
    assert not np.allclose(after[~fold0], before[~fold0])  # ...but they do train the other folds


def test_nested_cv_picks_per_fold_by_inner_cv_and_ignores_the_folds_labels():
    oof = synthetic_oof(seed=6)
    mean_only = lambda X, y: (float(np.median(y)), np.zeros(X.shape[1]))  # noqa: E731
    pred, chosen = ensemble.nested_cross_validated(oof, KINDS, [mean_only, ensemble.fit_lad])
    assert chosen == {0: 1, 1: 1, 2: 1}
    np.testing.assert_allclose(pred, ensemble.cross_validated(oof, KINDS, "lad"))
    changed = oof.copy()
    fold1 = changed["fold"].to_numpy() == 1
    changed.loc[fold1, "boneage"] = 100.0
    again, _ = ensemble.nested_cross_validated(changed, KINDS, [mean_only, ensemble.fit_lad])
    np.testing.assert_array_equal(again[fold1], pred[fold1])


def test_fit_ensemble_record_predicts_and_reports_the_cross_validated_mae():
    oof = synthetic_oof(seed=7)
    record, cv_pred = ensemble.fit_ensemble(oof, KINDS, "lad")
    json.dumps(record)  # the record is what gets written next to the models
    assert record["method"] == "lad" and set(record["by_sex"]) == {"F", "M"}
    assert all(w >= 0 for s in record["by_sex"].values() for w in s["weights"].values())
    y = oof["boneage"].to_numpy()
    assert record["cv_mae"]["all"] == pytest.approx(np.abs(cv_pred - y).mean())
    in_sample = ensemble.predict(record, oof[KINDS], oof["male"].to_numpy())
    assert np.abs(in_sample - y).mean() < record["cv_mae"]["all"]  # fit rows flatter it: why we CV
    best_kind = min(np.abs(oof[k] - y).mean() for k in KINDS)
    assert record["cv_mae"]["all"] < best_kind


def test_predict_raises_on_a_missing_kind_and_accepts_unweighted_ones_missing_or_nan():
    oof = synthetic_oof(seed=8)
    record, _ = ensemble.fit_ensemble(oof, KINDS, "lad")
    for sex in record["by_sex"].values():
        sex["weights"]["B-cls"] = 0.0
    male = oof["male"].to_numpy()
    with pytest.raises(ValueError, match="A-reg"):
        ensemble.predict(record, oof[["A-cls", "B-reg", "B-cls"]], male)
    full = ensemble.predict(record, oof[KINDS], male)
    without = ensemble.predict(record, oof[["A-reg", "A-cls", "B-reg"]], male)
    nan = oof[KINDS].copy()
    nan["B-cls"] = np.nan
    np.testing.assert_allclose(without, full)
    np.testing.assert_allclose(ensemble.predict(record, nan, male), full)
    with pytest.raises(ValueError, match="sex"):
        ensemble.predict({**record, "by_sex": {"F": record["by_sex"]["F"]}}, oof[KINDS], male)


def test_a_kind_with_nans_for_a_sex_is_left_out_of_that_sex_only():
    oof = synthetic_oof(seed=9)
    female = ~oof["male"].to_numpy()
    oof.loc[np.flatnonzero(female)[:5], "A-reg"] = np.nan  # one fold's trial did not finish
    record, cv_pred = ensemble.fit_ensemble(oof, KINDS, "nnls")
    assert record["excluded"] == {"F": ["A-reg"], "M": []}
    assert record["by_sex"]["F"]["weights"]["A-reg"] == 0.0
    assert record["by_sex"]["M"]["weights"]["A-reg"] > 0.0
    assert np.isfinite(cv_pred).all()
    females = oof[female].drop(columns=["A-reg"])  # scoring females needs no A-reg column
    assert np.isfinite(ensemble.predict(record, females, np.zeros(len(females), bool))).all()


def test_mae_table_has_every_model_and_group_with_counts():
    oof = synthetic_oof(seed=10)
    _, lad = ensemble.fit_ensemble(oof, KINDS, "lad")
    table = ensemble.mae_table(oof, KINDS, {"lad": lad}).set_index("model")
    assert list(table.index) == [*KINDS, "lad", "per-sex median"]
    bands = [label for label, _, _ in metrics.AGE_BANDS]
    assert sum(table.loc["lad", f"n_{b}"] for b in bands) == table.loc["lad", "n_all"] == len(oof)
    assert table.loc["lad", "n_F"] + table.loc["lad", "n_M"] == len(oof)
    assert table.loc["lad", "mae_all"] < table.loc["per-sex median", "mae_all"]
    young = oof["boneage"] < 24
    assert table.loc["A-reg", "mae_0-2 y"] == pytest.approx(np.abs(oof["A-reg"] - oof["boneage"])[young].mean())


def test_tune_fit_is_close_to_lad_with_non_negative_weights(ray_local, tmp_path):
    from boneage.distributed import ray_ensemble

    oof = synthetic_oof(n_per_sex=50, seed=11)
    lad, _ = ensemble.fit_ensemble(oof, KINDS, "lad")
    record, cv_pred = ray_ensemble.tune_ensemble(oof, KINDS, str(tmp_path / "ensemble"), num_samples=4, seed=0)
    json.dumps(record)
    assert record["method"] == "tune" and record["nested"] is True and len(record["trials"]) == 4
    assert record["failed_trials"] == 0
    assert all(w >= 0 for s in record["by_sex"].values() for w in s["weights"].values())
    y = oof["boneage"].to_numpy()
    assert record["cv_mae"]["all"] == pytest.approx(np.abs(cv_pred - y).mean())
    assert record["cv_mae"]["all"] < lad["cv_mae"]["all"] * 1.1
    assert record["selection_cv_mae"]["all"] == min(t["cv_mae"] for t in record["trials"])
    assert np.isfinite(ensemble.predict(record, oof[KINDS], oof["male"].to_numpy())).all()
    assert (tmp_path / "ensemble" / "tune").is_dir()  # Tune's experiment went to the storage path
