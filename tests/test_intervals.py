"""The bone age's prediction interval (boneage.validation.intervals) on synthetic out-of-fold tables
whose residuals are known."""

import json
import math

import numpy as np
import pandas as pd
import pytest

from boneage.validation import intervals


def oof_table(n=3000, sd=10.0, folds=3, seed=0, sd_of=None):
    """An OOF-like table: labels over 0-228 months, predictions = label + N(0, sd) (or sd_of(label, male))."""
    rng = np.random.default_rng(seed)
    y = rng.uniform(0, 228, n)
    male = rng.random(n) < 0.5
    scale = np.full(n, sd) if sd_of is None else sd_of(y, male)
    return pd.DataFrame({"boneage": y, "male": male, "prediction": y + rng.normal(0, 1, n) * scale,
                         "fold": rng.integers(0, folds, n)})


def test_gaussian_residuals_give_1_645_sd_and_nominal_coverage():
    table = oof_table(n=20000, sd=10.0)
    calibration = intervals.fit_interval(table, 0.9, "global")
    assert calibration["half_width"]["all"] == pytest.approx(16.45, rel=0.03)
    fresh = oof_table(n=20000, sd=10.0, seed=1)
    lower, upper = intervals.apply_interval(fresh["prediction"], None, calibration)
    covered = ((lower <= fresh["boneage"]) & (fresh["boneage"] <= upper)).mean()
    assert covered == pytest.approx(0.9, abs=0.01)


def test_the_finite_sample_rank():
    # n = 9 at 90%: the ceil(10 * 0.9) = 9th smallest |residual|; n = 8 is too few (unbounded).
    assert intervals.conformal_quantile(np.arange(1, 10), 0.9) == 9
    assert intervals.conformal_quantile(np.arange(1, 20), 0.9) == 18
    with pytest.raises(ValueError, match="at least 9"):
        intervals.conformal_quantile(np.arange(1, 9), 0.9)
    assert intervals.min_rows(0.9) == 9 and intervals.min_rows(0.5) == 1


def test_width_is_monotone_in_level():
    table = oof_table(n=2000)
    widths = [intervals.fit_interval(table, level, m)["half_width"]["all"]
              for m in intervals.METHODS for level in (0.5, 0.8, 0.9, 0.95)]
    for m in range(len(intervals.METHODS)):
        chunk = widths[4 * m:4 * m + 4]
        assert chunk == sorted(chunk) and chunk[0] < chunk[-1]


def test_per_sex_half_widths_and_unknown_sex_takes_the_wider():
    table = oof_table(n=20000, sd_of=lambda y, male: np.where(male, 20.0, 5.0))
    calibration = intervals.fit_interval(table, 0.9, "sex")
    h = calibration["half_width"]
    assert h["F"] == pytest.approx(1.645 * 5, rel=0.05) and h["M"] == pytest.approx(1.645 * 20, rel=0.05)
    widths = intervals.half_width([100.0, 100.0, 100.0], ["F", "M", None], calibration)
    assert widths.tolist() == [h["F"], h["M"], h["M"]]


def test_age_band_uses_the_predicted_age_and_falls_back_when_thin():
    # Residual SD grows with age: the 15-19 y band's interval is wider than the 2-5 y band's.
    table = oof_table(n=6000, sd_of=lambda y, male: 2 + y / 10)
    calibration = intervals.fit_interval(table, 0.9, "age_band")
    h = calibration["half_width"]
    assert h["2-5 y"] < h["5-10 y"] < h["10-15 y"] < h["15-19 y"]
    assert intervals.half_width([40.0], ["F"], calibration)[0] == h["2-5 y"]
    # Only a handful of predictions in 0-2 y: that band uses the global half-width.
    thin = table[(table["prediction"] >= 24) | (np.arange(len(table)) < 40)].copy()
    thin = thin[(thin["prediction"] >= 24) | (thin.index < 5)]
    calibration = intervals.fit_interval(thin, 0.9, "age_band")
    assert calibration["half_width"]["0-2 y"] is None
    assert intervals.half_width([10.0], ["F"], calibration)[0] == calibration["half_width"]["all"]


def test_nan_rows_are_left_out_of_the_fit_and_get_nan_bounds():
    table = oof_table(n=500)
    table.loc[:9, "prediction"] = np.nan
    calibration = intervals.fit_interval(table, 0.9, "global")
    assert calibration["left_out"] == 10 and calibration["rows"]["all"] == 490
    lower, upper = intervals.apply_interval([np.nan, 50.0], ["F", "F"], calibration)
    assert np.isnan(lower[0]) and np.isnan(upper[0]) and lower[1] < 50 < upper[1]
    lower, upper = intervals.apply_interval([50.0], ["F"], None)  # an older bundle: no calibration
    assert np.isnan(lower).all() and np.isnan(upper).all()
    lower, _ = intervals.apply_interval([3.0], ["F"], calibration)
    assert lower[0] == 0.0  # cut at 0 months


def test_empty_table_is_a_clear_error():
    with pytest.raises(ValueError, match="needs at least"):
        intervals.fit_interval(oof_table(n=3).iloc[:0], 0.9, "global")
    with pytest.raises(ValueError, match="no column"):
        intervals.fit_interval(pd.DataFrame({"x": [1.0]}), 0.9, "global")
    with pytest.raises(ValueError, match="method"):
        intervals.fit_interval(oof_table(n=50), 0.9, "spread")


def test_cross_fitted_coverage_is_nominal_and_reported_by_group():
    report = intervals.cross_fitted_coverage(oof_table(n=6000), 0.9, "global")
    assert report["all"]["n"] == 6000
    assert report["all"]["coverage"] == pytest.approx(0.9, abs=0.015)
    assert report["all"]["mean_width"] == pytest.approx(2 * 16.45, rel=0.05)
    assert set(report["by_sex"]) == {"F", "M"} and "15-19 y" in report["by_age_band"]
    assert sum(c["n"] for c in report["by_age_band"].values()) == 6000


def test_the_rule_picks_the_narrower_method_at_nominal_coverage():
    # Residuals depend on age: the age-band method is as well covered and narrower than global.
    table = oof_table(n=6000, sd_of=lambda y, male: 2 + y / 10)
    calibration = intervals.calibrate(table, 0.9)
    comparison = calibration["comparison"]
    assert calibration["method"] == "age_band"
    assert comparison["age_band"]["all"]["mean_width"] < comparison["global"]["all"]["mean_width"]
    assert comparison["age_band"]["all"]["coverage"] >= 0.9 - intervals.coverage_tolerance(0.9, 6000)
    json.dumps(calibration)  # goes into training.json
    assert intervals.calibration_of({"interval": calibration})["method"] == "age_band"
    assert intervals.calibration_of({}) is None and intervals.calibration_of({"interval": {"error": "x"}}) is None


def test_the_rule_refuses_a_narrow_method_that_undercovers():
    comparison = {"global": {"all": {"n": 1000, "coverage": 0.9, "mean_width": 30.0}},
                  "sex": {"all": {"n": 1000, "coverage": 0.8, "mean_width": 10.0}},
                  "age_band": {"all": {"n": 1000, "coverage": 0.895, "mean_width": 29.0}}}
    assert intervals.choose_method(comparison, 0.9)[0] == "age_band"
    comparison["age_band"]["all"]["coverage"] = 0.85  # below 0.9 - 1.96 * sqrt(0.09 / 1000) = 0.881
    assert intervals.choose_method(comparison, 0.9)[0] == "global"
    assert intervals.coverage_tolerance(0.9, 1000) == pytest.approx(1.96 * math.sqrt(0.09 / 1000))


def test_the_rule_holds_every_age_band_to_nominal_coverage():
    # Narrowest and nominal overall, but its 15-19 y band (40 rows) is covered 70%: refused.
    def report(coverage, width, band_coverage):
        return {"all": {"n": 1000, "coverage": coverage, "mean_width": width},
                "by_age_band": {"5-10 y": {"n": 300, "coverage": 0.9}, "15-19 y": {"n": 40, "coverage": band_coverage},
                                "0-2 y": {"n": 5, "coverage": 0.2}}}  # too few rows to hold it to anything

    comparison = {"global": report(0.9, 30.0, 0.70), "age_band": report(0.9, 32.0, 0.88)}
    method, why = intervals.choose_method(comparison, 0.9)
    assert method == "age_band" and "every age band" in why
    assert intervals.shortfall(comparison["global"], 0.9) > 1.96 >= intervals.shortfall(comparison["age_band"], 0.9)
    comparison["age_band"]["by_age_band"]["15-19 y"]["coverage"] = 0.75  # neither nominal: the least short
    method, why = intervals.choose_method(comparison, 0.9)
    assert method == "age_band" and why.startswith("no method")


def test_the_test_splits_coverage_goes_into_training_json_and_the_manifest(tmp_path):
    from boneage import bundle
    from boneage.run.holdout import interval_coverage

    calibration = intervals.fit_interval(oof_table(n=300), 0.9, "global")
    scored = pd.DataFrame({"boneage": [100.0, 50.0, 200.0], "male": [True, False, True],
                           "boneage_lower_months": [90.0, 10.0, 150.0], "boneage_upper_months": [110.0, 30.0, 210.0]})
    report = interval_coverage(scored, {"interval": calibration})
    assert report["method"] == "global" and report["level"] == 0.9
    assert report["all"] == {"n": 3, "coverage": pytest.approx(2 / 3), "mean_width": pytest.approx(100 / 3)}
    assert report["by_sex"]["F"]["coverage"] == 0.0 and report["by_age_band"]["15-19 y"]["n"] == 1
    assert "error" in interval_coverage(scored, {"images": 0})  # a bundle without a calibration
    # bundle.add_test_accuracy carries it into measured.json (beside the hashed bundle), which the loaded
    # bundle shows as its training.json's "test" and the manifest's test-split summary.
    uri = str(tmp_path / "bundle")
    bundle.write_bundle(uri, {"training.json": b"{}"}, [], {"training": "training.json"})
    measured = bundle.add_test_accuracy(uri, {"images": 3, "scored": 3, "accuracy": {"all": {"mae": 1.0}},
                                              "interval": report}, bundle.manifest_sha256(uri))
    assert measured["accuracy"]["test_split"]["interval"] == {"level": 0.9, "method": "global", **report["all"]}
    with open(tmp_path / "bundle" / bundle.MEASURED) as f:
        assert json.load(f)["test"]["interval"]["all"]["n"] == 3
