"""The correction of the ensemble's bias at the extreme ages (boneage.validation.age_calibration) on
synthetic out-of-fold tables that pull towards the mean as a trained ensemble does."""

import json

import numpy as np
import pandas as pd
import pytest

from boneage.validation import age_calibration


def shrunk_oof(n=1500, slope=0.8, noise=6.0, seed=0, folds=3):
    """Labels over 0-228 months; prediction = mean + slope (label - mean) + noise, a different mean per sex."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(0, 228, n)
    male = rng.random(n) < 0.5
    centre = np.where(male, 125.0, 110.0)
    pred = centre + slope * (y - centre) + rng.normal(0, noise, n)
    return pd.DataFrame({"boneage": y, "male": male, "ensemble_tune": pred, "fold": rng.integers(0, folds, n)})


def test_the_full_correction_removes_the_bias_of_the_extreme_bands_out_of_fold():
    table = shrunk_oof()
    fitted, corrected = age_calibration.calibrate(table, "ensemble_tune", "linear")
    before, after = fitted["before"]["by_age_band"], fitted["after"]["by_age_band"]
    # Uncorrected: young children too old, adolescents too young (0.2 x the distance to the mean).
    assert before["2-5 y"]["bias"] > 10 and before["15-19 y"]["bias"] < -10
    # Corrected, each fold by the other folds' fit: no bias left in any band.
    for band in ("2-5 y", "5-10 y", "10-15 y", "15-19 y"):
        assert abs(after[band]["bias"]) < 2.5, (band, after[band])
    assert fitted["by_sex"]["M"]["b"] == pytest.approx(0.8, abs=0.03)
    assert len(corrected) == len(table) and np.isfinite(corrected).all()
    json.dumps(fitted)  # goes into training.json


def test_off_leaves_the_prediction_and_the_bias_as_they_are():
    table = shrunk_oof()
    fitted, corrected = age_calibration.calibrate(table, "ensemble_tune", "off")
    np.testing.assert_array_equal(corrected, table["ensemble_tune"].to_numpy())
    assert fitted["after"]["by_age_band"]["2-5 y"]["bias"] > 10


def test_the_correction_is_monotone_per_sex_and_never_below_zero():
    fitted = age_calibration.fit(*(shrunk_oof()[c] for c in ("ensemble_tune", "boneage", "male")))
    grid = np.linspace(-20, 260, 500)
    for sex in ("F", "M"):
        out = age_calibration.apply(grid, sex, fitted)
        assert (np.diff(out) >= 0).all() and (out >= 0).all()
    # Each row under its own sex; (n, k) fold-wise predictions row by row; an unknown sex is left.
    per_fold = np.array([[100.0, 110.0], [100.0, 110.0], [100.0, 110.0]])
    out = age_calibration.apply(per_fold, np.array(["F", "M", None], dtype=object), fitted)
    assert out[0, 0] == pytest.approx(age_calibration.apply(np.array([100.0]), "F", fitted)[0])
    assert out[1, 1] == pytest.approx(age_calibration.apply(np.array([110.0]), "M", fitted)[0])
    np.testing.assert_array_equal(out[2], per_fold[2])
    assert age_calibration.apply(per_fold, "F", None).tolist() == per_fold.tolist()  # an older bundle


def test_a_sex_with_too_few_rows_or_an_implausible_slope_is_left_uncorrected():
    table = shrunk_oof(n=200)
    table.loc[table.index[:190], "male"] = False  # 10 boys or fewer
    fitted = age_calibration.fit(table["ensemble_tune"], table["boneage"], table["male"])
    assert "skipped" in fitted["by_sex"]["M"] and "b" in fitted["by_sex"]["F"]
    noise_only = shrunk_oof(slope=0.05)  # predictions that barely follow the label: nothing to invert
    fitted = age_calibration.fit(noise_only["ensemble_tune"], noise_only["boneage"], noise_only["male"])
    assert all("slope" in f["skipped"] for f in fitted["by_sex"].values())
    assert age_calibration.apply(np.array([50.0]), "F", fitted)[0] == 50.0
    with pytest.raises(ValueError, match="must be one of"):
        age_calibration.fit([1.0], [1.0], [True], "isotonic")


def test_the_bundle_record_round_trips():
    fitted, _ = age_calibration.calibrate(shrunk_oof(), "ensemble_tune")
    assert age_calibration.of_training({"age_calibration": fitted})["by_sex"] == fitted["by_sex"]
    assert age_calibration.of_training({}) is None
    assert "prediction =" in age_calibration.describe(fitted)


def test_auto_ships_the_weakest_strength_that_brings_every_band_within_the_bias_target():
    table = shrunk_oof(slope=0.85, noise=6.0)  # 0.15 x the distance to the mean: ~+11 months at 2-5 y
    fitted, corrected = age_calibration.calibrate(table, "ensemble_tune", "auto", bias_target=6.5)
    assert fitted["applied"] and 0 < fitted["strength"] < 1
    tried = {t["strength"]: t for t in fitted["tried"]}
    assert tried[0.0]["worst_band_bias"] > 6.5 and tried[fitted["strength"]]["worst_band_bias"] <= 6.5
    assert all(t["worst_band_bias"] > 6.5 for s, t in tried.items() if s < fitted["strength"])  # the weakest
    # Cross-fitted (the strength of each fold chosen on the other folds): every band within the target.
    for band in ("2-5 y", "5-10 y", "10-15 y", "15-19 y"):
        assert abs(fitted["after"]["by_age_band"][band]["bias"]) <= 6.5, band
    # What ships is one line per sex: the blend p + s ((p - a) / b - p) of the fitted inverse.
    shipped = age_calibration.of_training({"age_calibration": fitted})
    line = fitted["by_sex"]["F"]["line"]
    full = (np.array([30.0, 200.0]) - line["a"]) / line["b"]
    np.testing.assert_allclose(age_calibration.apply(np.array([30.0, 200.0]), "F", shipped),
                               [30.0, 200.0] + fitted["strength"] * (full - [30.0, 200.0]))
    assert f"strength {fitted['strength']:g}" in age_calibration.describe(fitted)


def test_auto_leaves_a_bias_within_the_target_and_a_correction_that_costs_too_much():
    fitted, corrected = age_calibration.calibrate(shrunk_oof(slope=0.98), "ensemble_tune", "auto")
    assert not fitted["applied"] and fitted["strength"] == 0 and "within ±6.5" in fitted["why"]
    # Mild shrinkage under much noise: every strength raises the MAE, and none may.
    table = shrunk_oof(slope=0.85, noise=25.0)
    fitted, corrected = age_calibration.calibrate(table, "ensemble_tune", "auto", max_mae_increase=0.0)
    assert not fitted["applied"] and "not applied" in fitted["why"]
    np.testing.assert_array_equal(corrected, table["ensemble_tune"].to_numpy())
    assert age_calibration.apply(np.array([50.0]), "F", age_calibration.of_training({"age_calibration": fitted}))[0] == 50.0
    assert "not applied" in age_calibration.describe(fitted)


def test_a_folds_labels_choose_neither_its_correction_nor_its_strength():
    table = shrunk_oof(slope=0.85, noise=6.0)
    before = age_calibration.cross_fitted(table, "ensemble_tune", "auto")
    held = table["fold"].to_numpy() == 0
    # Fold 0's labels made to agree with its predictions: chosen on every row, that would take most of the
    # bias out of the table and lower the strength; nested, fold 0's corrected ages cannot move.
    changed = table.assign(boneage=np.where(held, table["ensemble_tune"], table["boneage"]))
    after = age_calibration.cross_fitted(changed, "ensemble_tune", "auto")
    np.testing.assert_array_equal(after[held], before[held])
    assert age_calibration.calibrate(changed, "ensemble_tune")[0]["strength"] != \
        age_calibration.calibrate(table, "ensemble_tune")[0]["strength"]  # the change does move a choice


def test_the_reports_section_gives_the_strength_and_how_auto_chose_it():
    from boneage.report import sections

    fitted, _ = age_calibration.calibrate(shrunk_oof(slope=0.85, noise=6.0), "ensemble_tune", "auto")
    html = sections.age_calibration_section(fitted)
    assert f"at strength {fitted['strength']:g}" in html and "How auto chose the strength" in html
    line = fitted["by_sex"]["M"]["line"]
    assert f"prediction = {line['a']:.1f} + {line['b']:.3f} × true age" in html  # the full line, not the blend
    assert html.count("<tr><td>") == len(age_calibration.STRENGTHS)  # one row a strength tried
