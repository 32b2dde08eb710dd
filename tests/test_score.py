"""Scoring without Ray: the bundle's fold models and ensemble on registered rows, sex and age sources,
and the subjects CSV."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from boneage.clinical import columns
from boneage.validation import ensemble
from boneage.registration import prepare
from boneage import score
from boneage.model import train
from boneage.data.labels import read_subjects
from boneage.bundle import load_bundle
from boneage.model.networks import model_kind

from tiny_bundle import KINDS, WEIGHTS, write_tiny_bundle


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle")
    write_tiny_bundle(str(path))
    return score.BundleModels(load_bundle(str(path)))


@pytest.fixture(scope="module")
def registered(synthetic_small):
    """Four registered synthetic hands and one failed row, as the registered table has them."""
    labels = pd.read_csv(synthetic_small["labels"])
    rows = []
    for rid in labels["id"].astype(str):
        row = prepare.prepare_row({"id": rid, "uri": f"{synthetic_small['images']}/{rid}.png",
                                   "boneage": None, "male": None, "status": "ok", "error": None})
        rows += [row] if row["status"] == "ok" and len(rows) < 4 else []
    rows.append({"id": "broken", "uri": "broken.png", "status": "error", "error": "empty_file: broken.png",
                 "male": None, "registered_png": None})
    table = pd.DataFrame(rows)
    assert (table.status == "ok").sum() == 4
    return table


def by_hand(models, png: bytes, sex: str) -> tuple[float, float, list[float]]:
    """Bone age, fold spread and fold-wise ensembles of one image, from the fold models and weights."""
    bank = torch.from_numpy(prepare.decode_png(png).copy())[None, None]
    fold_preds = {k: [float(train.predict(m, bank, [0], model_kind(k, 0.125))[0]) for m, _ in models.models[(k, sex)]]
                  for k in KINDS}
    intercept, weights = WEIGHTS[sex]
    per_fold = [intercept + sum(weights[k] * fold_preds[k][f] for k in KINDS) for f in range(2)]
    return float(np.mean(per_fold)), float(np.std(per_fold, ddof=1)), per_fold


def test_scores_every_row_by_its_sex(models, registered):
    rows = registered.copy()
    rows["male"] = [True, False, None, None, None]  # from the CSV
    rows["image_sex"] = [None, "M", "F", None, None]  # from DICOM PatientSex: the CSV wins
    rows["age_months"] = [100.0, np.nan, np.nan, np.nan, 50.0]
    rows["image_age_months"] = [np.nan, 90.0, np.nan, np.nan, np.nan]
    rows["image_age_source"] = [None, "dates", None, None, None]
    out = score.score_rows(rows, models)

    assert list(out.columns) == list(score.OUTPUT_COLUMNS) + list(KINDS)
    assert list(out.id) == list(rows.id)  # one row per input, in order
    assert out.sex.tolist()[:3] == ["M", "F", "F"] and pd.isna(out.sex[3])
    assert out.sex_source.tolist() == ["csv", "csv", "dicom", "unknown", "unknown"]
    for i, sex in ((0, "M"), (1, "F"), (2, "F")):
        expected, spread, _ = by_hand(models, rows.registered_png[i], sex)
        assert out.boneage_months[i] == pytest.approx(expected, abs=1e-3)
        assert out.boneage_sd_months[i] == pytest.approx(spread, abs=1e-3)
        assert np.isnan(out.boneage_if_female_months[i]) and np.isnan(out.boneage_if_male_months[i])
    # Unknown sex: both estimates, their mean, flagged; no per-kind columns (they differ by sex).
    unknown = out.iloc[3]
    assert unknown.sex_unknown and not out.sex_unknown[0]
    female, _, female_folds = by_hand(models, rows.registered_png[3], "F")
    male, _, male_folds = by_hand(models, rows.registered_png[3], "M")
    assert unknown.boneage_if_female_months == pytest.approx(female, abs=1e-3)
    assert unknown.boneage_if_male_months == pytest.approx(male, abs=1e-3)
    assert unknown.boneage_months == pytest.approx((female + male) / 2, abs=1e-3)
    assert unknown.boneage_sd_months == pytest.approx(np.std(female_folds + male_folds, ddof=1), abs=1e-3)
    # Chronological age: CSV first, then DICOM dates; the difference from bone age.
    assert out.chronological_age_months.tolist()[:2] == [100.0, 90.0]
    assert out.age_source.tolist()[:2] == ["csv", "dicom_dates"] and pd.isna(out.age_source[2])
    assert out.boneage_minus_age_months[0] == pytest.approx(out.boneage_months[0] - 100.0)
    # The failed row stays, with its error and no bone age.
    broken = out.iloc[4]
    assert broken.status == "error" and broken.error.startswith("empty_file") and np.isnan(broken.boneage_months)


def test_summary_counts(models, registered):
    out = score.score_rows(registered.assign(male=[True, False, True, None, None]), models)
    result = score.summary(out)
    assert result["files"] == 5 and result["scored"] == 4 and result["failed"] == 1
    assert result["failed_by_code"] == {"empty_file": 1}
    assert result["sex_source"] == {"csv": 3, "unknown": 1}


def test_an_older_bundle_scores_per_sex_without_test_time_views(models):
    """A manifest without sex_models / tta_views (bundles before them) loads as per-sex models scored on
    the plain crop, each sex by its own fold models."""
    assert models.sex_models == "per_sex" and models.tta_views == 1
    assert models.models[("A-reg", "F")] is not models.models[("A-reg", "M")]
    assert not any(getattr(m, "sex_input", False) for fold_models in models.models.values() for m, _ in fold_models)


def test_ensemble_weights_are_the_bundles(models):
    preds = pd.DataFrame({"A-reg": [100.0], "B-cls": [120.0]})
    assert ensemble.predict(models.record, preds, [False])[0] == pytest.approx(6 + 25 + 90)


def test_subjects_csv(tmp_path):
    path = tmp_path / "subjects.csv"
    path.write_text("id,sex,age_months,boneage\n1,M,100,50\n2,F,,\n3,,36.5,\n4,X,10,\n5,M,999,\n")
    table, errors = read_subjects(str(path))
    assert table.set_index("id").to_dict("index") == {
        "1": {"male": True, "age_months": 100.0}, "2": {"male": False, "age_months": pytest.approx(np.nan, nan_ok=True)},
        "3": {"male": None, "age_months": 36.5}}
    assert sorted(errors) == ["4", "5"] and "unknown_sex" in str(errors["4"]) and "outside" in str(errors["5"])
    manifest = pd.DataFrame({"id": ["1", "4", "9"], "uri": ["a", "b", "c"], "boneage": None, "male": None,
                             "status": "ok", "error": None})
    joined = score.with_subjects(manifest, table, errors)
    assert joined.male.tolist() == [True, None, None] and joined.status.tolist() == ["ok", "error", "ok"]
    with pytest.raises(ValueError, match="needs an id column"):
        (tmp_path / "bad.csv").write_text("id,boneage\n1,50\n")
        read_subjects(str(tmp_path / "bad.csv"))


# training.json's record of a classifier that earned its calls beyond 0.2 / 0.8 (boneage.validation.sex_calls)
EARNED = {"on": True, "p_low": 0.2, "p_high": 0.8, "max_error_rate": 0.02, "min_confident_calls": 30,
          "cross_fitted": {"calls": 100, "wrong": 1, "error_rate": 0.01}}


@pytest.fixture(scope="module")
def models_with_sex(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle_sex")
    write_tiny_bundle(str(path), sex_kind="A-sex", sex_prediction=EARNED)
    return score.BundleModels(load_bundle(str(path)))


@pytest.fixture(scope="module", params=["old bundle", "not earned"])
def models_sex_off(request, tmp_path_factory):
    """A sex classifier whose calls scoring must not use: a bundle made before the rate was stored, and
    one whose out-of-fold calls missed the target."""
    path = tmp_path_factory.mktemp("bundle_sex_off")
    record = None if request.param == "old bundle" else {
        "on": False, "p_low": 0.2, "p_high": 0.8, "off_reason": "out-of-fold error rate of confident calls 18% > 2% target"}
    write_tiny_bundle(str(path), sex_kind="A-sex", sex_prediction=record)
    return score.BundleModels(load_bundle(str(path)))


def _set_p_male(models, per_fold: list[float]) -> None:
    """Make fold model f of the sex classifier answer P(male) = per_fold[f] for every image."""
    with torch.no_grad():
        for (model, _), p in zip(models.models[("A-sex", "all")], per_fold):
            model.out.weight.zero_()
            model.out.bias.fill_(float(np.log(p / (1 - p))))


def test_unknown_sex_is_scored_by_the_predicted_sex(models_with_sex, registered):
    rows = registered.assign(male=[True, False, None, None, None])  # rows 2-3 of unknown sex; 4 failed
    _set_p_male(models_with_sex, [0.95, 0.75])  # mean 0.85: male, sure
    out = score.score_rows(rows, models_with_sex)
    assert list(out.columns) == list(score.OUTPUT_COLUMNS) + list(KINDS)
    assert out.p_male[:4].tolist() == pytest.approx([0.85] * 4) and np.isnan(out.p_male[4])  # the mean P
    assert out.sex.tolist()[:4] == ["M", "F", "M", "M"]  # a known sex stays what the CSV says
    assert out.sex_source.tolist() == ["csv", "csv", "predicted", "predicted", "unknown"]
    assert not out.sex_unknown[:4].any() and not out.sex_unsure.any()
    assert out.sex_unknown.dtype == bool and out.sex_unsure.dtype == bool
    expected, spread, _ = by_hand(models_with_sex, rows.registered_png[2], "M")  # as a boy of known sex gets
    assert out.boneage_months[2] == pytest.approx(expected, abs=1e-3)
    assert out.boneage_sd_months[2] == pytest.approx(spread, abs=1e-3)
    assert out["A-reg"][2:4].notna().all() and not out.reject_reason[2:4].fillna("").str.contains("sex_unknown").any()
    # A predicted sex keeps both estimates, and says how far a wrong call would move the bone age.
    female = by_hand(models_with_sex, rows.registered_png[2], "F")[0]
    assert out.boneage_if_female_months[2] == pytest.approx(female, abs=1e-3)
    assert out.boneage_if_male_months[2] == pytest.approx(expected, abs=1e-3)
    assert out.sex_uncertainty_months[2] == pytest.approx(abs(female - expected), abs=1e-3)
    assert out.sex_uncertainty_months[2] > 0
    assert out.sex_uncertainty_months[:2].tolist() == [0.0, 0.0] and np.isnan(out.sex_uncertainty_months[4])
    assert np.isnan(out.boneage_if_female_months[:2]).all()  # a given sex: one estimate
    # Row 1 is a girl by the CSV, the classifier is sure of a boy: flagged, not rejected, not re-sexed.
    assert out.sex_mismatch.tolist() == [False, True, False, False, False] and out.sex_mismatch.dtype == bool
    assert "sex" not in str(out.reject_reason[1]) and columns.summary(out)["sex_mismatch"] == 1
    assert "1 images whose given sex the sex classifier contradicts" in columns.describe(out, {})

    _set_p_male(models_with_sex, [0.1, 0.2])  # 0.15: female
    out = score.score_rows(rows, models_with_sex)
    assert out.sex.tolist()[2:4] == ["F", "F"] and set(out.sex_source[2:4]) == {"predicted"}
    assert out.sex_mismatch.tolist() == [True, False, False, False, False]  # now the boy of row 0
    assert out.boneage_months[2] == pytest.approx(by_hand(models_with_sex, rows.registered_png[2], "F")[0], abs=1e-3)

    _set_p_male(models_with_sex, [0.3, 0.9])  # 0.6: unsure → both sexes' mean, as without a classifier
    out = score.score_rows(rows, models_with_sex)
    assert out.sex_unsure.tolist() == [False, False, True, True, False] and out.sex_unknown[2:4].all()
    assert not out.sex_mismatch.any()  # unsure contradicts nothing
    assert pd.isna(out.sex[2]) and out.sex_source[2] == "unknown" and out.p_male[2] == pytest.approx(0.6)
    female, male = (by_hand(models_with_sex, rows.registered_png[2], s)[0] for s in ("F", "M"))
    assert out.boneage_months[2] == pytest.approx((female + male) / 2, abs=1e-3)
    assert "sex_unknown" in out.reject_reason[2]  # the gate still rejects an unsure sex
    assert out.sex_uncertainty_months[2] == pytest.approx(abs(female - male) / 2, abs=1e-3)
    assert score.summary(out)["sex_unsure"] == 2


def test_a_classifier_that_has_not_earned_its_calls_never_sets_a_sex(models_sex_off, registered):
    rows = registered.assign(male=[True, False, None, None, None])
    _set_p_male(models_sex_off, [0.99, 0.99])  # as sure as it gets: still not used
    out = score.score_rows(rows, models_sex_off)
    assert models_sex_off.sex_calls["on"] is False and models_sex_off.sex_calls["p_low"] is None
    assert out.p_male[:4].tolist() == pytest.approx([0.99] * 4)  # still reported
    assert out.sex_source.tolist()[:4] == ["csv", "csv", "unknown", "unknown"] and out.sex[2:4].isna().all()
    assert out.sex_unknown[2:4].all() and out.sex_unsure.tolist() == [False, False, True, True, False]
    # unknown sex, no confident call: both sexes' estimates, rejected sex_unknown
    female, male = (by_hand(models_sex_off, rows.registered_png[2], s)[0] for s in ("F", "M"))
    assert out.boneage_if_female_months[2] == pytest.approx(female, abs=1e-3)
    assert out.boneage_if_male_months[2] == pytest.approx(male, abs=1e-3)
    assert out.boneage_months[2] == pytest.approx((female + male) / 2, abs=1e-3)
    assert not out.accepted[2:4].any() and all("sex_unknown" in r for r in out.reject_reason[2:4])
    assert not out.sex_mismatch.any()  # the girl of row 1 at P(male) 0.99: not at earned confidence


def test_a_row_without_a_given_sex_is_accepted_only_as_predicted(models_with_sex, registered):
    rows = registered.assign(male=None)
    for p in (0.1, 0.5, 0.79, 0.9):  # (not exactly 0.2 or 0.8: float32 decides those)
        _set_p_male(models_with_sex, [p, p])
        out = score.score_rows(rows, models_with_sex)
        ok = out.status == "ok"
        accepted = out.accepted.astype(bool) & ok
        sure = p < 0.2 or p > 0.8
        assert (out.sex_source[accepted] == "predicted").all(), p
        assert (out.sex_source[ok] == ("predicted" if sure else "unknown")).all(), p
        assert (out.sex_uncertainty_months[ok] > 0).all() and out.boneage_if_male_months[ok].notna().all(), p


def test_sex_mismatch_needs_a_given_sex_and_an_earned_threshold():
    p = [0.2, 0.21, 0.8, 0.79, 0.1, 0.95, np.nan, 0.05]
    sex = ["M", "M", "F", "F", "F", "M", "M", None]
    assert score.sex_mismatch(p, sex, 0.2, 0.8).tolist() == [True, False, True, False, False, False, False, False]
    assert score.sex_mismatch(p, sex, 0.1, 0.9).tolist() == [False] * 8  # the bundle's own threshold
    assert score.sex_mismatch([0.0, 1.0], ["M", "F"], None, None).tolist() == [False, False]  # not earned


def test_predicted_sex_at_the_bundles_thresholds():
    sexes, unsure = score.predicted_sex([0.0, 0.2, 0.21, 0.5, 0.79, 0.8, 1.0, np.nan], 0.2, 0.8)
    assert sexes == ["F", "F", None, None, None, "M", "M", None]
    assert unsure.tolist() == [False, False, True, True, True, False, False, True]
    sexes, unsure = score.predicted_sex([0.0, 0.05, 0.2, 0.96], 0.05, 0.95)
    assert sexes == ["F", "F", None, "M"]
    assert score.predicted_sex([0.0, 1.0], None, None) == ([None, None], pytest.approx([True, True]))



def test_auto_scores_lean_on_cpu_and_staged_on_gpus():
    from boneage.errors import UserError
    from boneage.run.scoring import scoring_pipeline

    assert scoring_pipeline("auto", None, cluster_gpus=0) == "lean"
    assert scoring_pipeline("auto", None, cluster_gpus=4) == "staged"
    assert scoring_pipeline("auto", 0.0, cluster_gpus=4) == "lean"  # CPU actors asked for on a GPU cluster
    assert scoring_pipeline("staged", None, cluster_gpus=0) == "staged"
    with pytest.raises(UserError, match="--pipeline lean scores on CPU"):
        scoring_pipeline("lean", 1.0, cluster_gpus=4)


def test_scoring_resources_are_the_scorers_not_the_bundles():
    from pathlib import Path

    from boneage.config import load_config
    from boneage.run import scoring_config, scoring_resources

    assert scoring_resources(None, None, cluster_gpus=0) == (1, 0.0)  # a CPU machine: one CPU actor
    assert scoring_resources(None, None, cluster_gpus=4) == (4, 1.0)  # one actor per GPU
    assert scoring_resources(None, 0.5, cluster_gpus=2) == (4, 0.5)
    assert scoring_resources(3, 0.0, cluster_gpus=8) == (3, 0.0)  # what the user asks for
    # the lean pipeline (CPU): one actor per core, a parquet write still fitting beside them
    assert scoring_resources(None, None, 0, "lean", cluster_cpus=2, cpus_per_write=0.1) == (2, 0.0)
    assert scoring_resources(None, None, 0, "lean", cluster_cpus=1, cpus_per_write=0.1) == (1, 0.0)
    assert scoring_resources(None, None, 0, "lean", cluster_cpus=16, cpus_per_write=0.1) == (17, 0.0)
    # A bundle trained with configs/rsna.yaml (GPU key point actors) scored on a CPU machine.
    trained = load_config(Path(__file__).resolve().parents[1] / "configs" / "rsna.yaml")
    assert trained.keypoints.gpus_per_actor > 0 and trained.keypoints.use_gpu
    config = scoring_config(trained, *scoring_resources(None, None, cluster_gpus=0))
    assert (config.keypoints.actors, config.keypoints.gpus_per_actor, config.keypoints.use_gpu) == (1, 0.0, False)


def _synthetic_bundle_manifest(images: int = 216, test_images: int = 24) -> dict:
    accuracy = {"n": test_images, "mae": 8.3, "rmse": 10.1, "median_ae": 7.0, "within_12": 0.8, "bias": 0.5}
    return {"data": {"kind": "synthetic", "images": images, "labels_from": "labels.csv"},
            "accuracy": {"test_split": {"images": test_images, "scored": test_images, **accuracy},
                         "out_of_fold": accuracy}}


def test_a_synthetic_bundle_on_real_radiographs_warns_loudly(synthetic_small):
    from pathlib import Path

    from boneage.run import scoring

    real = sorted(str(p) for p in (Path(__file__).parent / "fixtures" / "real").glob("*.png"))
    synthetic = sorted(str(p) for p in Path(synthetic_small["images"]).glob("*.png"))
    manifest = _synthetic_bundle_manifest()
    banner = scoring.synthetic_warning(manifest, real)
    assert banner.startswith("WARNING") and len(banner.splitlines()) >= 4
    assert "216 SYNTHETIC hand radiographs" in banner and "4 of the 4 input images checked are not synthetic" in banner
    assert "mean nothing for real hands" in banner
    assert scoring.synthetic_warning(manifest, synthetic[:1] + real[:1]) is not None  # one real image is enough
    # not for the synthetic images it was made for (the embedded run's own test split), nor for a
    # bundle trained on real images, nor for an older bundle that does not say
    assert scoring.synthetic_warning(manifest, synthetic) is None
    assert scoring.synthetic_warning({**manifest, "data": {"kind": "real", "images": 700}}, real) is None
    assert scoring.synthetic_warning({}, real) is None


def test_the_measured_accuracy_line_says_what_it_was_measured_on():
    from boneage.run import scoring

    manifest = _synthetic_bundle_manifest()
    assert scoring.measured_accuracy_line(manifest).startswith(
        "[score] the bundle's measured accuracy on its locked test split of 24 synthetic radiographs: MAE 8.30")
    manifest["accuracy"].pop("test_split")
    assert scoring.measured_accuracy_line(manifest).startswith(
        "[score] the bundle's measured accuracy, out of fold on the 216 synthetic radiographs it was trained on: MAE")
    assert "locked test split of 24 radiographs:" in scoring.measured_accuracy_line(
        {"accuracy": _synthetic_bundle_manifest()["accuracy"]})  # an older bundle: no kind to name


# A calibration as the bundle stores it (boneage.validation.intervals.fit_interval): per sex.
INTERVAL = {"level": 0.9, "method": "sex", "rows": {"all": 200, "F": 100, "M": 100}, "left_out": 0,
            "half_width": {"all": 12.0, "F": 10.0, "M": 15.0}}


@pytest.fixture(scope="module")
def models_with_interval(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle_interval")
    write_tiny_bundle(str(path), training={"images": 0, "interval": INTERVAL})
    return score.BundleModels(load_bundle(str(path)))


def test_every_scored_row_gets_the_bundles_interval(models_with_interval, registered):
    rows = registered.assign(male=[True, False, None, True, None], age_months=[100.0, 100.0, 100.0, np.nan, np.nan])
    out = score.score_rows(rows, models_with_interval)
    assert models_with_interval.interval["method"] == "sex"
    assert list(out.columns) == list(score.OUTPUT_COLUMNS) + list(KINDS)
    ok = out.boneage_months.notna()
    assert ok.tolist() == [True, True, True, True, False]
    assert (out.boneage_lower_months[ok] <= out.boneage_months[ok]).all()
    assert (out.boneage_months[ok] <= out.boneage_upper_months[ok]).all()
    # Known sex: the sex's half-width around the bone age (the lower bound is cut at 0 months).
    for i, h in ((0, 15.0), (1, 10.0), (3, 15.0)):
        assert out.boneage_upper_months[i] == pytest.approx(out.boneage_months[i] + h)
        assert out.boneage_lower_months[i] == pytest.approx(max(out.boneage_months[i] - h, 0.0))
    # Unknown sex: the union of the girl's interval around her estimate and the boy's around his.
    female, male = out.boneage_if_female_months[2], out.boneage_if_male_months[2]
    assert out.boneage_upper_months[2] == pytest.approx(max(female + 10, male + 15))
    assert out.boneage_lower_months[2] == pytest.approx(max(min(female - 10, male - 15), 0.0))
    assert np.isnan(out.boneage_lower_months[4]) and np.isnan(out.boneage_upper_months[4])  # the failed row
    # Several images of unknown sex in one batch (each sex's interval around that sex's estimate, per image;
    # the per-sex method once took the sex given for all of them as one row's, and the batch failed)
    several = score.score_rows(rows.assign(male=None), models_with_interval)
    for i in np.flatnonzero(several.boneage_months.notna()):
        female, male = several.boneage_if_female_months[i], several.boneage_if_male_months[i]
        assert several.boneage_upper_months[i] == pytest.approx(max(female + 10, male + 15))
    # The SDS's interval is the bone age interval's, on the same scale.
    known = out.boneage_sds.notna()
    assert known.any()
    assert (out.boneage_sds_lower[known] <= out.boneage_sds[known]).all()
    assert (out.boneage_sds[known] <= out.boneage_sds_upper[known]).all()


def test_an_older_bundle_gives_null_bounds_and_says_so(models, registered):
    from boneage.validation import intervals

    out = score.score_rows(registered.assign(male=[True, False, None, True, None]), models)
    assert models.interval is None
    assert out.boneage_months[:4].notna().all()
    assert out.boneage_lower_months.isna().all() and out.boneage_upper_months.isna().all()
    assert "no prediction interval calibration (an older bundle)" in intervals.describe(None, {"images": 0})
    assert "too few" in intervals.describe(None, {"interval": {"error": "too few rows"}})
    assert "90% conformal (sex)" in intervals.describe(INTERVAL)


def test_a_resumed_run_retries_transient_errors_and_keeps_one_row_per_file():
    """Parts are append-only: run 1 wrote a read_failed row (the network) and a corrupt_image row (the
    file); the resume scores the first again and keeps the second; the output then has one row per file,
    the rescored one replacing the transient error."""
    from boneage.score import latest_rows, settled_uris

    run1 = pd.Timestamp("2025-01-01T10:00:00Z")
    parts = pd.DataFrame({"id": ["a", "b", "c"], "uri": ["s3://x/a.png", "s3://x/b.png", "s3://x/c.png"],
                          "status": ["ok", "error", "error"],
                          "error": [None, "read_failed: s3://x/b.png: ReadTimeoutError: timed out",
                                    "corrupt_image: s3://x/c.png: broken"],
                          "scored_at": [run1] * 3})
    assert settled_uris(parts) == {"s3://x/a.png", "s3://x/c.png"}  # b is scored again, c is not
    rescored = pd.DataFrame({"id": ["b"], "uri": ["s3://x/b.png"], "status": ["ok"], "error": [None],
                             "scored_at": [run1 + pd.Timedelta(hours=1)]})
    both = pd.concat([rescored, parts], ignore_index=True)  # part order is no guide: scored_at is
    assert settled_uris(both) == {"s3://x/a.png", "s3://x/b.png", "s3://x/c.png"}
    table = latest_rows(both)
    assert sorted(table.uri) == ["s3://x/a.png", "s3://x/b.png", "s3://x/c.png"]
    assert table.set_index("id").loc["b", "status"] == "ok"
    # Failing again transiently: retried again, still one row for it.
    again = pd.concat([both, rescored.assign(status="error", error="read_failed: again",
                                             scored_at=run1 + pd.Timedelta(hours=2))], ignore_index=True)
    assert settled_uris(again) == {"s3://x/a.png", "s3://x/c.png"} and latest_rows(again).uri.is_unique


def test_read_output_keeps_the_latest_row_per_file(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from boneage.distributed.ray_score import read_output, scored_uris

    folder = tmp_path / "out"
    folder.mkdir()
    old = pd.DataFrame({"id": ["a", "b"], "uri": ["/i/a.png", "/i/b.png"], "status": ["ok", "error"],
                        "error": [None, "read_failed: timed out"], "bundle_sha256": ["h", "h"],
                        "scored_at": pd.to_datetime(["2025-01-01T10:00:00Z"] * 2)})
    pq.write_table(pa.Table.from_pandas(old, preserve_index=False), folder / "part-20250101T100000Z-1.parquet")
    assert scored_uris(str(folder), "h") == {"/i/a.png"}
    new = old.iloc[[1]].assign(status="ok", error=None, scored_at=pd.to_datetime(["2025-01-01T11:00:00Z"]))
    pq.write_table(pa.Table.from_pandas(new, preserve_index=False), folder / "part-20250101T110000Z-2.parquet")
    assert scored_uris(str(folder), "h") == {"/i/a.png", "/i/b.png"}
    table = read_output(str(folder), ("id", "uri", "status"))
    assert table.to_dict("list") == {"id": ["a", "b"], "uri": ["/i/a.png", "/i/b.png"], "status": ["ok", "ok"]}


def test_gather_keeps_the_newest_row_per_file_and_copes_with_an_empty_part(tmp_path):
    # An empty part happens: a rerun's write of an empty block, or a cut-off run's rows removed by hand.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from boneage.distributed.ray_score import gather, parts_uri

    out = tmp_path / "predictions.parquet"
    parts = tmp_path / parts_uri(out.name)
    parts.mkdir()
    rows = pd.DataFrame({"id": ["a", "b"], "uri": ["/i/a.png", "/i/b.png"], "status": ["ok", "error"]})
    pq.write_table(pa.Table.from_pandas(rows, preserve_index=False), parts / "part-20250101T100000Z-1.parquet")
    pq.write_table(pa.Table.from_pandas(rows.iloc[:0], preserve_index=False),
                   parts / "part-20250101T110000Z-2.parquet")
    newer = rows.iloc[[1]].assign(status="ok")
    pq.write_table(pa.Table.from_pandas(newer, preserve_index=False), parts / "part-20250101T120000Z-3.parquet")
    gather(str(out), {"run": "r"})
    table = pq.read_table(out).to_pandas().sort_values("id")
    assert table.to_dict("list") == {"id": ["a", "b"], "uri": ["/i/a.png", "/i/b.png"], "status": ["ok", "ok"]}
    assert json.loads(pq.read_schema(out).metadata[score.PROVENANCE_KEY]) == {"run": "r"}


def test_an_unused_dicom_age_leaves_the_age_empty_with_its_reason():
    rows = pd.DataFrame({"age_months": [np.nan, 50.0, np.nan, np.nan],
                         "image_age_months": [96.0, 96.0, np.nan, np.nan],
                         "image_age_source": ["dates", "dates", "unused: image date before birth date", None]})
    ages, sources = score.resolve_age(rows)
    assert ages[:2].tolist() == [96.0, 50.0] and np.isnan(ages[2:]).all()
    assert sources == ["dicom_dates", "csv", "dicom_unused: image date before birth date", None]


# A correction as the bundle stores it (boneage.validation.age_calibration.fit): per sex, prediction = a + b x label.
AGE_CALIBRATION = {"method": "linear", "by_sex": {"F": {"a": 20.0, "b": 0.8, "rows": 100},
                                                  "M": {"rows": 10, "skipped": "too few"}}}


def test_the_bundles_age_correction_moves_the_bone_age_and_its_folds(tmp_path, models, registered):
    write_tiny_bundle(str(tmp_path), training={"images": 0, "age_calibration": AGE_CALIBRATION})
    corrected = score.BundleModels(load_bundle(str(tmp_path)))
    rows = registered.assign(male=[False, True, None, None, None])
    plain, out = score.score_rows(rows, models), score.score_rows(rows, corrected)
    # A girl: (prediction - 20) / 0.8, and her fold spread scales by 1 / 0.8; a boy: his sex has no fit.
    assert out.boneage_months[0] == pytest.approx(max((plain.boneage_months[0] - 20) / 0.8, 0), abs=1e-4)
    assert out.boneage_sd_months[0] == pytest.approx(plain.boneage_sd_months[0] / 0.8, abs=1e-4)
    assert out.boneage_months[1] == pytest.approx(plain.boneage_months[1], abs=1e-6)
    # Unknown sex: the girl's estimate corrected, the boy's not; the per-kind means are the models' own.
    assert out.boneage_if_female_months[2] == pytest.approx((plain.boneage_if_female_months[2] - 20) / 0.8, abs=1e-4)
    assert out.boneage_if_male_months[2] == pytest.approx(plain.boneage_if_male_months[2], abs=1e-6)
    assert out[list(KINDS)].equals(plain[list(KINDS)])
