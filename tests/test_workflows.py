"""The workflows end to end on the embedded default (a small synthetic set), on a real local Ray."""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import re
from pathlib import Path

import pandas as pd
import pytest

from boneage.bundle import load_bundle
from boneage.validation.metrics import roc_auc
from boneage.validation import sex_calls
from boneage.distributed.ray_prepare import read_registered

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _load_workflow(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "workflows" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, ray_local) -> Path:
    """full_cv.py on a shrunken embedded default (30 synthetic images, one kind and the default sex
    classifier A-sex, 2 folds, 2 epochs), run
    as a user would: from a working directory that is not the repository, with relative paths
    (Ray Tune runs each trial in a directory of its own: a relative path must still work there)."""
    tmp_path = tmp_path_factory.mktemp("embedded")
    (tmp_path / "tiny.yaml").write_text(
        "data:\n  synthetic_size: [320, 240]\nkeypoints:\n  epochs: 2\n"
        "cv:\n  k: 2\n  kinds: [A-reg]\n  epochs: 2\n  input_scale: 0.125\n  width_mult: 0.0625\n"
        "  fc: 32\n  batch_size: 4\n")
    with _working_directory(tmp_path):
        assert _load_workflow("full_cv").main(["--config", "tiny.yaml", "--synthetic-n", "30",
                                               "--output", "run"]) == 0
    return tmp_path / "run"


@contextlib.contextmanager
def _working_directory(path: Path):
    before = os.getcwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(before)


def test_full_cv_on_the_embedded_default(embedded_run):
    out = embedded_run
    assert (out / "config.yaml").exists() and "synthetic_n: 30" in (out / "config.yaml").read_text()
    assert f"output: {out}" in (out / "config.yaml").read_text()  # resolved against the working directory
    assert len(list((out / "synthetic" / "images").iterdir())) == 30
    table = read_registered(str(out / "registered"), with_images=False)
    assert len(table) == 30 and set(table.status) == {"ok"}
    summary = json.loads((out / "qa" / "preprocess_summary.json").read_text())
    assert summary["items"] == 30 and summary["keypoint_model"].endswith("keypoint_model.safetensors")
    assert (out / "qa" / "registered_sheet.png").stat().st_size > 10_000
    # The locked test split: 10% of the images, both sexes, set aside before anything was fit.
    split = pd.read_csv(out / "test" / "split.csv", dtype={"id": str})
    n_test = len(split)
    # The key point model trained on none of them: its error is measured on a fifth of the other
    # annotated images and on the (annotated) test images.
    assert summary["keypoint_error_on_held_out_annotations"]["images"] == round(0.2 * (30 - n_test)) + n_test
    assert 2 <= n_test <= 4 and split.male.nunique() == 2 and set(split.source) == {"test_fraction"}
    # k-fold CV: 1 kind x 2 sexes x 2 folds, an out-of-fold prediction for every other labelled image;
    # the sex classifier: 1 trial per fold on both sexes, an out-of-fold P(male) for every image
    oof = pd.read_parquet(out / "cv" / "oof.parquet")
    assert len(oof) == 30 - n_test and oof["A-reg"].notna().all() and not set(oof.id) & set(split.id)
    assert oof["p_male"].between(0, 1).all()
    trials = pd.read_parquet(out / "cv" / "trials.parquet")
    assert len(trials) == 4 + 2 and set(trials.trial) >= {"A-sex-all-fold0", "A-sex-all-fold1"}
    assert len(list((out / "cv" / "models").glob("A-reg-*-fold*.pt"))) == 4
    for row in trials[trials.kind == "A-sex"].itertuples():  # each trial's AUC is its scored fold's
        scored = oof[oof.fold == row.fold]
        assert row.n_val == len(scored) and row.oof_auc == roc_auc(scored.p_male, scored.male)
    cv_summary = json.loads((out / "cv" / "summary.json").read_text())
    assert {row["model"] for row in cv_summary["mae"]} == {"A-reg", "per-sex median"}
    sex = cv_summary["sex_classifier"]
    assert sex["kind"] == "A-sex" and sex["views"] == 1 and sex["all"]["n"] == len(oof) and sex["all"]["auc"] == roc_auc(oof.p_male, oof.male)
    assert sum(band["n"] for band in sex["by_age_band"].values()) == len(oof)
    # Ensemble: three fits, each with a cross-validated MAE; the one that scores was fixed beforehand.
    ensembles = json.loads((out / "cv" / "ensemble.json").read_text())
    assert set(ensembles["fits"]) == {"tune", "lad", "nnls"} and ensembles["use"] == "tune"
    assert pd.read_parquet(out / "cv" / "ensemble_oof.parquet")[["ensemble_tune", "ensemble_lad"]].notna().all().all()
    # The bundle: every fold model, the key point model, weights, config; loads for scoring; carries
    # the accuracy measured on the test split it never saw, and its out-of-fold accuracy.
    bundle = load_bundle(str(out / "bundle"))
    assert sorted(bundle.models) == [("A-reg", "F"), ("A-reg", "M"), ("A-sex", "all")]
    assert bundle.manifest["sex_kind"] == "A-sex"
    # fewer out-of-fold images than sex_min_confident_calls: predicted sex is off for this bundle
    calls = bundle.training["sex_prediction"]
    assert calls["images"] == len(oof) and calls["on"] is False and calls["off_reason"]
    assert all(len(states) == 2 for states in bundle.models.values())
    assert bundle.keypoint_model.endswith("keypoints/keypoint_model.safetensors") and bundle.training["images"] == 30 - n_test
    # what it was trained on: synthetic hands, how many, from which label file (its name, not its path)
    assert bundle.manifest["data"] == bundle.training["data"]
    assert {k: bundle.manifest["data"][k] for k in ("kind", "images", "labels_from")} == {
        "kind": "synthetic", "images": 30 - n_test, "labels_from": "labels.csv"}
    test = json.loads((out / "test" / "metrics.json").read_text())
    assert test["images"] == n_test and test["scored"] + len(test["failed"]) == n_test
    acc = test["accuracy"]["all"]
    assert set(acc) >= {"n", "mae", "rmse", "median_ae", "within_12", "bias", "ci"} and acc["n"] == test["scored"]
    assert acc["ci"]["mae"][0] <= acc["mae"] <= acc["ci"]["mae"][1]
    predictions = pd.read_parquet(out / "test" / "predictions.parquet").set_index("id")
    truth = split.set_index("id").boneage
    ok = predictions.status == "ok"
    assert abs((predictions.boneage_months[ok] - truth[ok[ok].index]).abs().mean() - acc["mae"]) < 1e-9
    assert bundle.manifest["accuracy"]["test_split"]["mae"] == acc["mae"] and bundle.training["test"]["scored"] == test["scored"]
    assert bundle.manifest["accuracy"]["out_of_fold"]["n"] == 30 - n_test
    # The hash the test predictions carry is the finished bundle's; the scoring is on record.
    assert set(predictions.bundle_sha256) == {bundle.sha256} == {test["bundle_sha256"]}
    evaluations = [json.loads(line) for line in (out / "test" / "evaluations.jsonl").read_text().splitlines()]
    assert evaluations[-1]["bundle_sha256"] == bundle.sha256 and evaluations[-1]["mae"] == acc["mae"]
    # The report, test split first, with every picture it links to.
    html = (out / "report" / "report.html").read_text()
    assert html.index("Locked test split") < html.index("Cross-validation (out of fold)")
    pictures = re.findall(r'src="([^"]+\.png)"', html)
    assert len(pictures) >= 4 and all((out / "report" / p).stat().st_size > 1000 for p in pictures)
    assert "Sex classifier A-sex (out of fold)" in html
    assert "data-sex-prediction='off'" in html  # and that scoring will not use a predicted sex, as the bundle says


def test_scoring_with_the_trained_bundle(embedded_run, tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((embedded_run / "synthetic" / "images").iterdir())[:5]:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    bundle = os.path.relpath(embedded_run / "bundle", tmp_path)
    # The subjects' sexes, but two left blank: the bundle's sex classifier decides those.
    labels = pd.read_csv(embedded_run / "synthetic" / "labels.csv", dtype={"id": str})
    names = sorted(p.stem for p in images.iterdir())
    labels["male"] = labels["male"].astype(object).where(~labels.id.isin(names[:2]), None)
    labels[["id", "male"]].to_csv(tmp_path / "subjects.csv", index=False)
    with _working_directory(tmp_path):  # relative paths, from a directory that is not the repository
        assert _load_workflow("score").main(["images", "--bundle", bundle, "--out", "predictions.parquet",
                                             "--subjects", "subjects.csv"]) == 0
    printed = capsys.readouterr()
    # synthetic images scored by a bundle trained on synthetic images: no warning, and the accuracy it
    # prints says what it was measured on
    assert "WARNING" not in printed.err + printed.out
    n_test = len(pd.read_csv(embedded_run / "test" / "split.csv"))
    assert f"measured accuracy on its locked test split of {n_test} synthetic radiographs: MAE" in printed.out
    table = pd.read_parquet(tmp_path / "predictions.parquet")
    assert len(table) == 6 and table.set_index("id").loc["broken", "status"] == "error"
    ok = table[table.status == "ok"]
    assert len(ok) >= 4 and ok.boneage_months.between(0, 240).all() and ok.p_male.between(0, 1).all()
    blank = ok.id.isin(names[:2])
    assert set(ok.sex_source[~blank]) == {"csv"} and not ok.sex_unsure[~blank].any()
    # no sex given: the predicted one where the bundle earned it (said once) and P(male) is beyond its
    # threshold, else both sexes' mean (flagged unsure)
    calls = sex_calls.of_bundle(load_bundle(str(embedded_run / "bundle")).training, "A-sex")
    assert printed.out.count("[score] sex prediction " + ("on" if calls["on"] else "off")) == 1
    sure = ((ok.p_male <= calls["p_low"]) | (ok.p_male >= calls["p_high"])) if calls["on"] else ok.p_male < 0
    assert (ok.sex_source[blank] == sure[blank].map({True: "predicted", False: "unknown"})).all()
    assert (ok.sex_unsure[blank] == ~sure[blank]).all() and (ok.sex_unknown == ok.sex_unsure).all()
    assert (ok.sex[blank & sure] == ok.p_male[blank & sure].gt(0.5).map({True: "M", False: "F"})).all()
    assert ok["A-reg"][~blank].notna().all()


def test_full_cv_reports_a_bad_config_key(tmp_path, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text("keypoints:\n  epoch: 2\n")
    assert _load_workflow("full_cv").main(["--config", str(preset), "--output", str(tmp_path / "run")]) == 2
    assert f"keypoints.epoch=2 ({preset}): unknown setting; did you mean epochs?" in capsys.readouterr().err


def test_full_cv_checks_its_settings_before_any_work(tmp_path, capsys):
    code = _load_workflow("full_cv").main(["--kinds", "A-reg,D-reg", "--folds", "1", "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and "cv.kinds" in err and "D-reg" in err and "cv.k=1" in err
    assert not (tmp_path / "run").exists()  # nothing was written, no Ray was started for it
    code = _load_workflow("full_cv").main(["--images", str(tmp_path / "nowhere"), "--labels", "x.csv",
                                           "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and f"--images {tmp_path / 'nowhere'} does not exist" in err


def test_the_report_of_a_bundle_that_applied_the_age_correction_heads_with_the_corrected_prediction(
        embedded_run, tmp_path, monkeypatch):
    """A run whose bundle applied the age correction (training.json age_calibration.applied): the report's
    primary prediction is the ensemble corrected cross-fitted, named so, with its MAE in the headline (the
    branch was dead once: such a report showed the uncorrected ensemble)."""
    import shutil

    import numpy as np

    from boneage.config import load_config
    from boneage.run import reporting
    from boneage.validation import age_calibration

    monkeypatch.setattr(age_calibration, "MIN_ROWS", 4)  # the tiny run's ~13 rows per sex: corrected anyway
    run = tmp_path / "run"
    shutil.copytree(embedded_run, run)
    table = pd.read_parquet(run / "cv" / "ensemble_oof.parquet")
    use = json.loads((run / "cv" / "ensemble.json").read_text())["use"]
    record, corrected = age_calibration.calibrate(table, f"ensemble_{use}", "linear")
    training = json.loads((run / "bundle" / "training.json").read_text())
    (run / "bundle" / "training.json").write_text(json.dumps({**training, "age_calibration": record}))
    reporting.report(load_config(run / "config.yaml", {"output": str(run)}))
    html = (run / "report" / "report.html").read_text()
    assert f"Ensemble {use}, age-corrected, out of fold, every metric" in html
    mae = float(np.mean(np.abs(corrected - table["boneage"].to_numpy(float))))
    assert f"{mae:.2f}" in html.split("Cross-validation (out of fold)")[1]
