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


def test_the_correction_removes_the_bias_of_the_extreme_bands_out_of_fold():
    table = shrunk_oof()
    fitted, corrected = age_calibration.calibrate(table, "ensemble_tune")
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


def test_auto_ships_the_correction_only_when_it_does_not_cost_accuracy():
    # Strong shrinkage, little noise: correcting wins overall, auto applies it.
    fitted, corrected = age_calibration.calibrate(shrunk_oof(slope=0.6, noise=3.0), "ensemble_tune", "auto")
    assert fitted["applied"] and fitted["after"]["all"]["mae"] < fitted["before"]["all"]["mae"]
    # Mild shrinkage under much noise: the 1/b scaled noise costs more than the bias removed: left off.
    table = shrunk_oof(slope=0.85, noise=25.0)
    fitted, corrected = age_calibration.calibrate(table, "ensemble_tune", "auto")
    assert not fitted["applied"] and "not applied" in fitted["why"]
    assert fitted["after"]["all"]["mae"] > fitted["before"]["all"]["mae"] * 1.02
    np.testing.assert_array_equal(corrected, table["ensemble_tune"].to_numpy())
    assert age_calibration.apply(np.array([50.0]), "F", age_calibration.of_training({"age_calibration": fitted}))[0] == 50.0
    assert "not applied" in age_calibration.describe(fitted)
