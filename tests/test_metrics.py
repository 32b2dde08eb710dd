"""boneage.validation.metrics: the accuracy figures the report, training.json and the bundle carry."""

import numpy as np
import pytest

from boneage.validation import metrics


def test_accuracy_by_hand():
    truth = np.array([100.0, 120.0, 140.0, 160.0])
    pred = np.array([110.0, 110.0, 170.0, 160.0])  # errors +10, -10, +30, 0
    acc = metrics.accuracy(pred, truth)
    assert acc["n"] == 4 and acc["mae"] == pytest.approx(12.5) and acc["bias"] == pytest.approx(7.5)
    assert acc["rmse"] == pytest.approx(np.sqrt((100 + 100 + 900 + 0) / 4))
    assert acc["median_ae"] == pytest.approx(10.0) and acc["within_12"] == pytest.approx(0.75)
    assert "ci" not in acc
    assert metrics.accuracy([np.nan, 1.0], [5.0, 2.0])["n"] == 1  # unscored rows are not counted as 0
    assert metrics.accuracy([], []) == {"n": 0}


def test_bootstrap_intervals_hold_the_estimate_and_shrink_with_n():
    rng = np.random.default_rng(0)
    widths = []
    for n in (30, 300):
        truth = rng.uniform(0, 228, n)
        acc = metrics.accuracy(truth + rng.normal(0, 10, n), truth, n_boot=1000, seed=1)
        for m in metrics.METRICS:
            lo, hi = acc["ci"][m]
            assert lo <= acc[m] <= hi
        widths.append(acc["ci"]["mae"][1] - acc["ci"]["mae"][0])
        again = metrics.accuracy(truth + 0, truth + 0, n_boot=10, seed=1)
        assert again["ci"]["mae"] == [0.0, 0.0]
    assert widths[1] < widths[0] / 2


def test_accuracy_report_groups_by_sex_and_age_band():
    truth = np.array([10.0, 30.0, 70.0, 130.0, 200.0, 228.0])
    male = np.array([True, False, True, False, True, False])
    report = metrics.accuracy_report(truth + 6, truth, male)
    assert report["all"]["n"] == 6 and report["all"]["mae"] == pytest.approx(6.0)
    assert {s: a["n"] for s, a in report["by_sex"].items()} == {"F": 3, "M": 3}
    assert {b: a["n"] for b, a in report["by_age_band"].items()} == {
        "0-2 y": 1, "2-5 y": 1, "5-10 y": 1, "10-15 y": 1, "15-19 y": 2}  # 228 months is in the last band
    line = metrics.describe(metrics.accuracy(truth + 6, truth, n_boot=50))
    assert line.startswith("MAE 6.00 [6.00, 6.00] months") and "within ±12 months 100%" in line


def test_roc_auc_and_sex_accuracy_by_hand():
    from boneage.validation.metrics import roc_auc, sex_accuracy, sex_report

    # positives 0.35, 0.8 against negatives 0.1, 0.4: 3 of the 4 pairs ordered right
    assert roc_auc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == 0.75
    assert roc_auc([0.5, 0.5], [False, True]) == 0.5  # a tie counts half
    assert np.isnan(roc_auc([0.2, 0.9], [True, True])) and np.isnan(roc_auc([np.nan, 0.3], [False, True]))
    p = [0.1, 0.3, 0.9, 0.6, np.nan]
    male = [False, True, True, False, True]
    acc = sex_accuracy(p, male)  # the NaN row is left out; 0.3 and 0.6 are unsure
    assert acc == {"n": 4, "auc": 0.75, "accuracy": 0.5, "unsure": 0.5, "accuracy_sure": 1.0}
    report = sex_report(p, male, [10.0, 30.0, 100.0, 100.0, 100.0])
    assert report["all"] == acc and set(report["by_age_band"]) == {"0-2 y", "2-5 y", "5-10 y"}
    assert report["by_age_band"]["5-10 y"]["n"] == 2


def test_the_paired_mae_difference_and_its_interval():
    rng = np.random.default_rng(1)
    reference = rng.normal(0, 10, 400)
    better = reference * 0.8  # every row's error 20% smaller
    paired = metrics.paired_mae_difference(better, reference)
    expected = np.mean(np.abs(better)) - np.mean(np.abs(reference))
    assert paired["difference"] == pytest.approx(expected) and paired["interval"][0] < expected < paired["interval"][1]
    assert paired["interval"][1] < 0  # drawn together, the rows' spread does not hide a sure gain
    same = metrics.paired_mae_difference(reference, reference)
    assert same["difference"] == 0 and same["interval"] == [0, 0]
