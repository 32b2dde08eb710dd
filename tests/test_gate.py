"""The rejection gate: thresholds measured on an out-of-fold table, each reason firing on its own, and
the clinical columns through boneage.score on a real (tiny) bundle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from boneage.clinical import columns, gate
from boneage.registration import prepare
from boneage import score
from boneage.bundle import load_bundle

from tiny_bundle import KINDS, write_tiny_bundle


def oof_table() -> pd.DataFrame:
    # Girls: kinds differ by 0, 2, 4 months (SDs 0, sqrt(2), sqrt(8)); boys by 6 (SD sqrt(18)).
    return pd.DataFrame({"id": list("abcd"), "male": [False, False, False, True], "boneage": [20.0, 100.0, 200.0, 50.0],
                         "A-reg": [20.0, 100.0, 200.0, 50.0], "B-cls": [20.0, 102.0, 204.0, 56.0]})


def test_calibration_is_measured_on_the_out_of_fold_table():
    cal = gate.calibrate(oof_table(), KINDS, quantile=0.5)
    assert cal["label_range"] == {"F": [20.0, 200.0], "M": [50.0, 50.0]}
    assert cal["zone_spread_max"]["F"] == pytest.approx(np.sqrt(2))  # the median of 0, sqrt(2), sqrt(8)
    assert cal["zone_spread_max"]["M"] == pytest.approx(np.sqrt(18))
    assert cal["nominal_rate"] == {"zone_models_disagree": 0.5} and cal["zone_spread_statistic"] == "one_fold"
    # No fold spread threshold: it could only come from the test split. The bundle says why, so the
    # scorer does not warn about it.
    assert "fold_spread_max" not in cal and gate.missing_checks(cal) == []
    assert gate.calibration_of({"gate": cal, "test": {"images": 5}}) == cal
    # An older bundle's training.json: the fold spread threshold from its test split, still applied.
    old = {k: v for k, v in cal.items() if k not in ("fold_spread_not_checked", "nominal_rate")}
    merged = gate.calibration_of({"gate": old, "test": {"gate_fold_spread": {"fold_spread_max": 2.5}}})
    assert merged["fold_spread_max"] == 2.5 and merged["label_range"] == cal["label_range"]
    assert gate.missing_checks(merged) == []
    assert gate.missing_checks({}) == ["outside_label_range", "zone_models_disagree", "fold_models_disagree"]


def fold_ensemble(n: int, k: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """n images' ids and {kind: (n, k)} predictions of k fold models none of which saw them: kinds
    agree on an image's level up to an image effect (small) and fold noise (large, independent per fold)."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(20, 220, n)
    kinds = {kind: level[:, None] + rng.normal(0, 1, (n, 1)) + rng.normal(0, 4, (n, k)) for kind in KINDS}
    return np.array([f"img{seed}-{i}" for i in range(n)]), kinds


def test_the_zone_spread_threshold_rejects_its_nominal_rate_of_images_like_the_training_data():
    k, quantile = 5, 0.95
    # Out of fold: each image is predicted by the one fold model that did not see it.
    ids, folds = fold_ensemble(20000, k, seed=1)
    fold = np.arange(len(ids)) % k
    oof = pd.DataFrame({"id": ids, "male": False, "boneage": 100.0,
                        **{kind: p[np.arange(len(ids)), fold] for kind, p in folds.items()}})
    cal = gate.calibrate(oof, KINDS, quantile=quantile)
    # New images, scored with all k fold models as boneage.score does.
    new_ids, new_folds = fold_ensemble(20000, k, seed=2)
    table = pd.DataFrame({"sex": "F", "sex_unknown": False, "boneage_months": 100.0, "boneage_sd_months": np.nan,
                          **{kind: p.mean(axis=1) for kind, p in new_folds.items()},  # the fold-averaged kind columns
                          gate.ZONE_SPREAD: gate.one_fold_zone_spread(new_folds, new_ids)})
    accepted, reasons = gate.gate(table, KINDS, cal)
    rate = gate.rejected_for(reasons, "zone_models_disagree").mean()
    assert cal["nominal_rate"]["zone_models_disagree"] == pytest.approx(1 - quantile)
    assert rate == pytest.approx(1 - quantile, abs=0.008)  # 0.05 +- 0.008: 5 binomial SEs at n=20000
    # The fold-averaged spread, tested against the same threshold, rejects almost nothing (the old bug).
    averaged, _ = gate.gate(table.drop(columns=[gate.ZONE_SPREAD]), KINDS, cal)
    assert (~averaged).mean() < 0.2 * (1 - quantile)
    # The fold is picked from the id: the same image always gets the same statistic.
    assert gate.fold_of(["a", "b", "a"], 5)[0] == gate.fold_of(["a"], 5)[0]
    assert np.array_equal(gate.one_fold_zone_spread(new_folds, new_ids), gate.one_fold_zone_spread(new_folds, new_ids))


def test_each_reason_fires_on_its_own():
    cal = {"label_range": {"F": [20.0, 200.0], "M": [10.0, 220.0]}, "zone_spread_max": {"F": 3.0, "M": 3.0},
           "fold_spread_max": 4.0}
    table = pd.DataFrame({
        "sex": ["F", "F", "F", "F", None, "M", "F", "F", "F"],
        "sex_unknown": [False, False, False, False, True, False, False, False, False],
        "boneage_months": [100.0, 100.0, 100.0, 100.0, 100.0, 5.0, 100.0, 100.0, np.nan],
        "boneage_sd_months": [1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 4.5, np.nan],
        "registration_doubtful": [False, True, False, True, False, False, False, False, None],
        "mask_doubtful": [False, False, True, True, False, False, False, False, None],
        "A-reg": [100.0, 100, 100, 100, np.nan, 5, 100, 100, np.nan],
        "B-cls": [101.0, 101, 101, 101, np.nan, 5, 106, 101, np.nan],  # row 6: SD 4.24 > 3
    })
    accepted, reason = gate.gate(table, KINDS, cal)
    assert accepted.tolist() == [True] + [False] * 8
    assert reason.tolist() == [None, "registration_doubtful", "mask_doubtful", "registration_doubtful;mask_doubtful",
                               "sex_unknown", "outside_label_range", "zone_models_disagree", "fold_models_disagree",
                               "not_scored"]
    # Without a calibration only the checks that need none fire.
    accepted, reason = gate.gate(table, KINDS, {})
    assert accepted.tolist() == [True, False, False, False, False, True, True, True, False]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle")
    write_tiny_bundle(str(path))
    return score.BundleModels(load_bundle(str(path)))


def test_scoring_rows_get_sds_and_gate(models, synthetic_small, tmp_path):
    labels = pd.read_csv(synthetic_small["labels"]).head(3)
    rows = pd.DataFrame([prepare.prepare_row({"id": str(r), "uri": f"{synthetic_small['images']}/{r}.png",
                                              "boneage": None, "male": None, "status": "ok", "error": None})
                         for r in labels["id"]])
    assert (rows.status == "ok").all()
    rows["registration_doubtful"] = [False, False, True]
    rows["male"] = [True, False, True]
    rows["age_months"] = [120.0, 250.0, np.nan]
    out = score.score_rows(rows, models)
    # The tiny bundle predates the gate: only the flags reject.
    assert out.accepted.tolist() == [True, True, False] and out.reject_reason[2] == "registration_doubtful"
    ba = out.boneage_months[0]
    assert out.reference_sd_months[0] == pytest.approx(9.79)  # boys at 120 months
    assert out.boneage_sds[0] == pytest.approx((ba - 120) / 9.79)
    assert out.sds_note.tolist()[1:] == ["age_outside_reference", "age_unknown"]
    # The zone spread check's statistic: one fold's kinds, the fold picked from the id.
    bank = score.cv.decode_bank(rows["registered_png"].tolist(), rows["id"].tolist())
    for i, sex in enumerate(["M", "F", "M"]):
        folds = {kind: p[i:i + 1] for kind, p in models.fold_predictions(bank, sex).items()}
        assert out[gate.ZONE_SPREAD][i] == pytest.approx(gate.one_fold_zone_spread(folds, [rows["id"][i]])[0])
    # With a calibration, the tiny bundle's (untrained) models are outside a narrow label range.
    models.gate = {"label_range": {"F": [ba + 1000, ba + 1001], "M": [ba + 1000, ba + 1001]}}
    try:
        out = score.score_rows(rows, models)
    finally:
        models.gate = {}
    assert out.reject_reason.tolist() == ["outside_label_range", "outside_label_range",
                                          "registration_doubtful;outside_label_range"]
    assert columns.summary(out)["rejected_by_reason"] == {"outside_label_range": 3, "registration_doubtful": 1}
    # The parquet names the scale.
    import pyarrow as pa
    pq.write_table(columns.with_metadata(pa.Table.from_pandas(out)), tmp_path / "t.parquet")
    meta = pq.read_schema(tmp_path / "t.parquet").metadata
    assert b"Greulich-Pyle" in meta[b"boneage.sds"]


def cross_fit_table() -> pd.DataFrame:
    # Two folds (alternate rows) of girls with the same labels, 50-90; predictions exact, kinds 1 month
    # apart, except the planted row 3 (kinds 40 months apart, 30 months off) and row 6 (registration flagged).
    rows = [{"id": str(i), "male": False, "boneage": 50.0 + 10 * (i // 2), "fold": i % 2,
             "registration_doubtful": i == 6, "mask_doubtful": False} for i in range(10)]
    table = pd.DataFrame(rows)
    table["pred"], table["A-reg"], table["B-cls"] = table.boneage, table.boneage, table.boneage + 1
    table.loc[3, ["pred", "B-cls"]] = [table.loc[3, "boneage"] + 30, table.loc[3, "boneage"] + 40]
    return table


def test_cross_fitted_gate_uses_the_other_folds_thresholds():
    table = cross_fit_table()
    accepted, reason = gate.cross_fitted(table, KINDS, table["pred"], quantile=1.0)
    # quantile 1: the largest zone spread of the other fold (sqrt(0.5)). Calibrated on its own fold too,
    # row 3 would set its own threshold and pass.
    assert reason.tolist() == [None] * 3 + ["zone_models_disagree", None, None, "registration_doubtful"] + [None] * 3
    assert accepted.tolist() == [r is None for r in reason]
    in_sample, _ = gate.gate(table.assign(sex="F", sex_unknown=False, boneage_months=table.pred,
                                          boneage_sd_months=np.nan), KINDS, gate.calibrate(table, KINDS, quantile=1.0))
    assert in_sample[3]
    # The label range is the other fold's too: without row 1, fold 1's labels start at 60, so row 0
    # (fold 0, label and prediction 50) is outside it; fold 1's rows are inside fold 0's 50-90.
    narrow = table.drop(index=1).reset_index(drop=True)
    accepted, reason = gate.cross_fitted(narrow, KINDS, narrow["pred"], quantile=1.0)
    assert reason.tolist() == ["outside_label_range", None, "zone_models_disagree", None, None,
                               "registration_doubtful", None, None, None]
    with pytest.raises(ValueError, match="two folds"):
        gate.cross_fitted(table.assign(fold=0), KINDS, table["pred"])


def test_effect_counts_reasons_and_splits_the_error():
    accepted = [True, True, False, False, False]
    reasons = [None, None, "mask_doubtful", "mask_doubtful;zone_models_disagree", "not_scored"]
    pred, truth = [10.0, 12.0, 30.0, 50.0, np.nan], [11.0, 15.0, 10.0, 10.0, 20.0]
    e = gate.effect(accepted, reasons, pred, truth)
    assert e["images"] == 5 and e["rejected"] == 3 and e["rejected_fraction"] == pytest.approx(0.6)
    assert e["mae_accepted"] == pytest.approx(2.0) and e["mae_rejected"] == pytest.approx(30.0)
    assert e["n_rejected_scored"] == 2
    assert e["by_reason"] == {"not_scored": {"n": 1, "mae": pytest.approx(np.nan, nan_ok=True)},
                              "mask_doubtful": {"n": 2, "mae": pytest.approx(30.0)},
                              "zone_models_disagree": {"n": 1, "mae": pytest.approx(40.0)}}


def test_an_interval_that_straddles_minus_2_sd_is_uncertain():
    # Boys at 72 months (SD 9.17): bone age 50 (SDS -2.4) with the interval 40-60 (SDS -3.5 to -1.3)
    # straddles -2 SD -> uncertain; 40-52 (to -2.2) lies wholly below -> delayed; 70-80 within -> normal;
    # no bounds (an older bundle) -> the point SDS decides, as before.
    out = pd.DataFrame({"id": list("abcd"), "sex": ["M"] * 4, "sex_unknown": [False] * 4,
                        "boneage_months": [50.0, 46.0, 75.0, 50.0], "boneage_lower_months": [40.0, 40.0, 70.0, np.nan],
                        "boneage_upper_months": [60.0, 52.0, 80.0, np.nan], "boneage_sd_months": [1.0] * 4,
                        "chronological_age_months": [72.0] * 4, "registration_doubtful": [False] * 4,
                        "mask_doubtful": [False] * 4, "status": ["ok"] * 4})
    out = columns.add_columns(out, [], {})
    assert out.boneage_interpretation.tolist() == ["uncertain", "delayed", "normal", "delayed"]
    assert out.boneage_sds_lower[0] == pytest.approx((40 - 72) / 9.17)
    assert out.boneage_sds_upper[0] == pytest.approx((60 - 72) / 9.17)
    assert np.isnan(out.boneage_sds_lower[3])
    counts = columns.summary(out)["interpretation"]
    assert counts == {"delayed": 2, "normal": 1, "advanced": 0, "uncertain": 1}
    assert "1 uncertain" in columns.describe(out, {})
