"""When a predicted sex may replace an unknown one (boneage.validation.sex_calls): the threshold chosen
on out-of-fold P(male) meets the target or the feature is off, the cross-fitted error rate, and old
bundles."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from boneage.validation import sex_calls


def table(p_male, male, folds=3) -> pd.DataFrame:
    return pd.DataFrame({"p_male": p_male, "male": male, "fold": np.arange(len(p_male)) % folds})


def test_confident_calls_count_the_wrong_ones():
    p = [0.05, 0.1, 0.95, 0.15, 0.5, 0.6, 0.9]
    male = [False, True, True, False, True, True, False]
    assert sex_calls.confident_calls(p, male, 0.1) == {"calls": 4, "wrong": 2, "error_rate": 0.5}
    assert sex_calls.confident_calls(p, male, 0.01) == {"calls": 0, "wrong": 0, "error_rate": None}
    with pytest.raises(ValueError, match="p_low"):
        sex_calls.confident_calls(p, male, 0.5)  # P = 0.5 is no call


def test_the_threshold_is_the_loosest_that_meets_the_target_on_enough_calls():
    # distance min(P, 1 - P): 40 sure and right at 0.01-0.05, a wrong one at 0.06, 40 right ones at
    # 0.07-0.09, then 40 wrong ones at 0.3-0.45.
    rng = np.random.default_rng(0)
    d = np.r_[rng.uniform(0.01, 0.05, 40), 0.06, rng.uniform(0.07, 0.09, 40), rng.uniform(0.3, 0.45, 40)]
    wrong = np.r_[np.zeros(40, bool), True, np.zeros(40, bool), np.ones(40, bool)]
    male = rng.random(len(d)) < 0.5
    p = np.where(male != wrong, 1 - d, d)  # the call (P > 0.5) is male exactly where it is right for a boy
    # 1 wrong of 81 ≤ 2%: the loosest threshold keeps the right ones beyond the wrong one
    t = sex_calls.choose_threshold(p, male, 0.02, 30)
    assert t == pytest.approx(d[:81].max())
    got = sex_calls.confident_calls(p, male, t)
    assert got["calls"] == 81 and got["wrong"] == 1 and got["error_rate"] <= 0.02
    # 0% allowed: only the 40 before the first wrong one
    assert sex_calls.choose_threshold(p, male, 0.0, 30) == pytest.approx(d[:40].max())
    assert sex_calls.choose_threshold(p, male, 0.0, 41) is None  # not enough calls at 0 wrong: off
    # Every threshold it returns meets both conditions, on random tables
    for seed in range(20):
        r = np.random.default_rng(seed)
        p, male = r.random(200), r.random(200) < 0.5
        p = np.where(r.random(200) < 0.7, np.where(male, 1 - p / 5, p / 5), p)  # mostly informative
        for target, n_min in ((0.02, 30), (0.1, 10), (0.0, 5)):
            t = sex_calls.choose_threshold(p, male, target, n_min)
            if t is not None:
                got = sex_calls.confident_calls(p, male, t)
                assert got["calls"] >= n_min and got["wrong"] <= target * got["calls"] + 1e-9


def test_a_weak_classifier_is_off_and_says_why():
    rng = np.random.default_rng(1)
    male = rng.random(300) < 0.5
    p = np.clip(0.5 + np.where(male, 0.05, -0.05) + rng.normal(0, 0.2, 300), 0.001, 0.999)  # AUC ~0.6
    record = sex_calls.calibrate(table(p, male), 0.02, 30)
    assert record["on"] is False and record["p_low"] is None and 0.55 < record["auc"] < 0.75
    assert "> 2% target" in record["off_reason"] and "out-of-fold error rate of confident calls" in record["off_reason"]
    settings = sex_calls.of_bundle({"sex_prediction": record}, "A-sex")
    assert settings["on"] is False and settings["p_low"] is None
    assert sex_calls.describe(settings).startswith("[score] sex prediction off for this bundle: out-of-fold error rate")


def test_a_strong_classifier_is_on_with_both_rates_stored():
    rng = np.random.default_rng(2)
    male = rng.random(600) < 0.5
    score = np.where(male, 1.0, -1.0) * 3 + rng.normal(0, 1.2, 600)
    p = 1 / (1 + np.exp(-score))
    record = sex_calls.calibrate(table(p, male), 0.02, 30)
    assert record["on"] is True and record["p_high"] == pytest.approx(1 - record["p_low"])
    selected, crossed = record["selected"], record["cross_fitted"]
    assert selected == {**sex_calls.confident_calls(p, male, record["p_low"]), "note": selected["note"]}
    assert selected["calls"] >= 30 and selected["error_rate"] <= 0.02 and crossed["error_rate"] <= 0.02
    assert record["called_share"] == pytest.approx(selected["calls"] / 600)
    assert sex_calls.of_bundle({"sex_prediction": record}, "A-sex")["p_low"] == record["p_low"]
    assert "sex prediction on for this bundle" in sex_calls.describe(sex_calls.of_bundle({"sex_prediction": record},
                                                                                          "A-sex"))


def test_cross_fitting_chooses_each_folds_threshold_without_its_labels():
    rng = np.random.default_rng(3)
    male = rng.random(300) < 0.5
    p = 1 / (1 + np.exp(-(np.where(male, 2.5, -2.5) + rng.normal(0, 1.5, 300))))
    fold = np.arange(300) % 3
    crossed = sex_calls.cross_fitted(p, male, fold, 0.05, 20)
    calls = wrong = 0
    for f, record in zip(range(3), crossed["folds"]):
        held = fold == f
        # the threshold is the one the OTHER folds choose, and it is applied to fold f only
        assert record["p_low"] == sex_calls.choose_threshold(p[~held], male[~held], 0.05, 20)
        got = sex_calls.confident_calls(p[held], male[held], record["p_low"])
        assert (record["calls"], record["wrong"]) == (got["calls"], got["wrong"])
        calls, wrong = calls + got["calls"], wrong + got["wrong"]
    assert (crossed["calls"], crossed["wrong"]) == (calls, wrong) and crossed["error_rate"] == wrong / calls
    with pytest.raises(ValueError, match="two folds"):
        sex_calls.cross_fitted(p, male, np.zeros(300), 0.05, 20)


def test_the_feature_is_off_when_the_cross_fitted_rate_misses_the_target():
    # Pooled, 3 wrong calls among 63 meet 5%; but all 3 sit in fold 0, at the highest confidence. Fold 0
    # is then called at a threshold chosen without them (3 wrong of its 23 calls), and the other folds,
    # whose training folds hold them, find no threshold: cross-fitted 13% > 5%, off.
    d = np.r_[np.full(3, 0.001), np.linspace(0.01, 0.02, 60)]
    wrong = np.r_[np.ones(3, bool), np.zeros(60, bool)]
    male = np.arange(63) % 2 == 0
    p = np.where(male != wrong, 1 - d, d)
    fold = np.r_[0, 0, 0, np.arange(60) % 3]
    record = sex_calls.calibrate(pd.DataFrame({"p_male": p, "male": male, "fold": fold}), 0.05, 10)
    assert record["p_low"] is not None and record["selected"]["error_rate"] <= 0.05
    assert record["cross_fitted"]["calls"] == 23 and record["cross_fitted"]["wrong"] == 3
    assert record["on"] is False and "13% (cross-fitted, 3 of 23) > 5% target" in record["off_reason"]
    assert sex_calls.of_bundle({"sex_prediction": record}, "A-sex")["p_low"] is None


def test_old_bundles_and_bundles_without_a_classifier_are_off():
    old = sex_calls.of_bundle({"images": 10, "gate": {}}, "A-sex")
    assert old["on"] is False and old["p_low"] is None and old["off_reason"] == sex_calls.OFF_OLD_BUNDLE
    assert "predates" in sex_calls.describe(old)
    assert sex_calls.of_bundle({"sex_prediction": {"on": True, "p_low": 0.1, "p_high": 0.9}}, None)["p_low"] is None


def test_bad_p_male_is_an_error():
    with pytest.raises(ValueError, match="probability"):
        sex_calls.choose_threshold([0.1, np.nan], [True, False], 0.02, 1)
    with pytest.raises(ValueError, match="male must be known"):
        sex_calls.calibrate(pd.DataFrame({"p_male": [0.1, 0.9], "male": [True, None], "fold": [0, 1]}), 0.02, 1)
