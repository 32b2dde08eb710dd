"""The rejection gate: thresholds measured on an out-of-fold table, each reason firing on its own, and
the clinical columns through boneage.score on a real (tiny) bundle."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from boneage import clinical, gate, prepare, score
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
    fold = gate.calibrate_fold_spread([1.0, 2.0, 3.0, np.nan, 5.0], quantile=0.5)
    assert fold["fold_spread_max"] == 2.5 and fold["images"] == 4
    assert gate.calibrate_fold_spread([np.nan]) is None
    # A bundle's training.json: "gate" from bundle time, the fold spread from the test split.
    merged = gate.calibration_of({"gate": cal, "test": {"gate_fold_spread": fold}})
    assert merged["fold_spread_max"] == 2.5 and merged["label_range"] == cal["label_range"]
    assert gate.missing_checks(merged) == []
    assert gate.missing_checks({}) == ["outside_label_range", "zone_models_disagree", "fold_models_disagree"]


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
    # With a calibration, the tiny bundle's (untrained) models are outside a narrow label range.
    models.gate = {"label_range": {"F": [ba + 1000, ba + 1001], "M": [ba + 1000, ba + 1001]}}
    try:
        out = score.score_rows(rows, models)
    finally:
        models.gate = {}
    assert out.reject_reason.tolist() == ["outside_label_range", "outside_label_range",
                                          "registration_doubtful;outside_label_range"]
    assert clinical.summary(out)["rejected_by_reason"] == {"outside_label_range": 3, "registration_doubtful": 1}
    # The parquet names the scale.
    import pyarrow as pa
    pq.write_table(clinical.with_metadata(pa.Table.from_pandas(out)), tmp_path / "t.parquet")
    meta = pq.read_schema(tmp_path / "t.parquet").metadata
    assert b"Greulich-Pyle" in meta[b"boneage.sds"]
