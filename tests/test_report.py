"""boneage.report: the static CV report, written, checked, and rendered in headless Chromium."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage.validation import ensemble
from boneage.clinical import gate
from boneage.registration import prepare
from boneage import report
from boneage.registration.frame import STORE_H, STORE_W

from system_tools import program_or_skip
from test_ensemble import synthetic_oof

KINDS = ["A-reg", "A-cls", "B-reg", "B-cls"]
# Debian's package, Ubuntu's and Google's builds, whichever is on PATH first
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
# CI sets it (.ci/run): there a missing browser is a failure, not a skip.
REQUIRE_CHROMIUM = "BONEAGE_REQUIRE_CHROMIUM"
ODD_ID = "<b>x&y</b>"  # ids are data: they must come out escaped


def _oof(n_per_sex: int = 45, k: int = 3, seed: int = 0) -> pd.DataFrame:
    oof = synthetic_oof(n_per_sex, k, seed, kinds=KINDS)
    oof.loc[0, "id"] = ODD_ID
    oof.loc[0, "A-reg"] = oof.loc[0, "boneage"] + 150  # a gross error: among the worst cases
    return oof


def _registered_png(seed: int) -> bytes:
    """A registered-size image with some structure (a bright 'hand' on black)."""
    rng = np.random.default_rng(seed)
    image = np.zeros((STORE_H, STORE_W), np.uint8)
    yy, xx = np.mgrid[0:STORE_H, 0:STORE_W]
    image[(xx - 400) ** 2 / 300**2 + (yy - 600) ** 2 / 380**2 < 1] = 140
    for finger in range(5):
        x0 = 160 + 120 * finger
        image[80 + 20 * finger: 600, x0: x0 + 60] = 200
    return prepare.encode_png(np.clip(image + rng.integers(0, 30, image.shape), 0, 255).astype(np.uint8))


@pytest.fixture(scope="module")
def inputs():
    oof = _oof()
    ensembles, preds = {}, {}
    for method in ("lad", "nnls"):
        ensembles[method], preds[method] = ensemble.fit_ensemble(oof, KINDS, method)
    worst = report.worst_cases(oof, preds["lad"], 8)
    images = pd.DataFrame({"id": worst["id"].iloc[:2].tolist(),
                           "registered_png": [_registered_png(1), _registered_png(2)],
                           "registration_doubtful": [True, False], "keypoint_source": ["model", "geometric"]})
    trials = pd.DataFrame([{"trial": f"{k}-{s}-fold{f}", "kind": k, "sex": s, "fold": f, "best_epoch": 3, "select_mae": 19.0,
                            "oof_mae": 20.0 + f, "epochs_run": 5, "seconds": 12.5}
                           for k in KINDS for s in "FM" for f in range(3)])
    qa = {"items": 95, "ok": 90, "errors": 5, "errors_by_code": {"bad_image": 5}, "registration_doubtful": 7,
          "mask_doubtful": 2, "keypoint_error_on_held_out_annotations": {"images": 20, "capitate_median_pct": 5.8},
          "failed_items": [{"id": "14", "uri": "/data/14.png", "error": "bad_image: <no hand>"}]}
    flags = pd.DataFrame({"id": oof["id"], "registration_doubtful": oof["id"].isin(REGISTRATION_FLAGGED),
                          "mask_doubtful": oof["id"].isin(MASK_FLAGGED)})
    return {"oof": oof, "ensembles": ensembles, "preds": preds, "images": images, "trials": trials, "qa": qa,
            "flags": flags, "test_gate": _test_gate()}


REGISTRATION_FLAGGED, MASK_FLAGGED = ["f1", "f2", "m3"], ["f4", "m5"]


def _test_gate() -> pd.DataFrame:
    """A scored test split: 8 accepted rows 1-8 months off (MAE 4.5), 2 rejected 20 and 40 months off."""
    truth = np.arange(10, 110, 10, dtype=float)
    return pd.DataFrame({"id": [f"t{i}" for i in range(10)], "boneage": truth,
                         "boneage_months": truth + [1, 2, 3, 4, 5, 6, 7, 8, 20, -40],
                         "accepted": [True] * 8 + [False] * 2,
                         "reject_reason": [None] * 8 + ["mask_doubtful", "mask_doubtful;fold_models_disagree"]})


def _write_full(inputs, out: Path) -> Path:
    uri = report.write_report(str(out), inputs["oof"], KINDS, inputs["ensembles"], inputs["preds"],
                              trials=inputs["trials"], preprocess_summary=inputs["qa"],
                              worst_images=inputs["images"], n_worst=8, gate_flags=inputs["flags"],
                              test_gate=inputs["test_gate"])
    assert uri == str(out / "report.html")
    return Path(uri)


def test_worst_cases_are_the_largest_absolute_errors_first():
    oof = _oof()
    pred = oof["boneage"].to_numpy() + np.linspace(-1, 1, len(oof))
    pred[5], pred[7] = np.nan, oof.loc[7, "boneage"] - 90
    worst = report.worst_cases(oof, pred, 3)
    assert worst["id"].tolist()[0] == oof.loc[7, "id"] and len(worst) == 3
    assert (np.diff(np.abs(worst["error"])) <= 0).all() and worst["error"].notna().all()


def test_report_links_existing_pngs_and_has_every_section(inputs, tmp_path):
    page_path = _write_full(inputs, tmp_path / "report")
    page = page_path.read_text()
    sources = re.findall(r'src="([^"]+)"', page)
    assert {"mae_by_band.png", "pred_vs_true.png", "bland_altman.png", "weights.png",
            "worst_01.png", "worst_02.png"} <= set(sources)
    for src in sources:
        assert "/" not in src and (page_path.parent / src).is_file()  # relative, beside the page
    with Image.open(page_path.parent / "worst_01.png") as thumb:
        assert thumb.size == (report.THUMB_WIDTH, round(STORE_H * report.THUMB_WIDTH / STORE_W))
    for section in ("Out-of-fold MAE", "Predicted vs true", "Bland-Altman", "Ensemble weights", "Worst cases",
                    "Registration QA", "Trials", "0-2 y", "15-19 y", "per-sex median", "registration doubtful"):
        assert section in page, section
    assert "&lt;b&gt;x&amp;y&lt;/b&gt;" in page and ODD_ID not in page
    assert "&lt;no hand&gt;" in page
    assert page.count("no image") == 6  # 8 worst cases, 2 with images
    lad_mae = inputs["ensembles"]["lad"]["cv_mae"]["all"]
    assert f"{lad_mae:.2f}" in page  # the headline carries the cross-validated MAE


def test_report_renders_with_missing_pieces_and_says_so(tmp_path):
    oof = _oof(n_per_sex=20)
    record, pred = ensemble.fit_ensemble(oof, KINDS, "lad")
    page = Path(report.write_report(str(tmp_path / "bare"), oof, KINDS, {"lad": record}, {"lad": pred})).read_text()
    assert "No CV trials table was given" in page
    assert "No preprocessing summary was given" in page
    assert "No registered images were given" in page
    assert "No QA flags were given" in page and "No locked test split was scored: its part" in page
    nothing = Path(report.write_report(str(tmp_path / "none"), oof, KINDS, {}, {})).read_text()
    assert "No ensemble prediction was given" in nothing and "No ensemble was given" in nothing
    assert "A-reg" in nothing  # the kinds' table is still there


def _gate_cells(page: str, row: str) -> list[str]:
    match = re.search(rf'<tr data-row="{row}">(.*?)</tr>', page)
    assert match, row
    return re.findall(r"<td>(.*?)</td>", match.group(1))


def test_report_gives_the_gates_effect_out_of_fold_and_on_the_test_split(inputs, tmp_path):
    page_path = _write_full(inputs, tmp_path / "report")
    page = page_path.read_text()
    assert "Rejection gate: its effect" in page and 'src="gate_effect.png"' in page
    with Image.open(page_path.parent / "gate_effect.png") as picture:
        assert picture.size[0] >= 900 and np.asarray(picture.convert("L")).std() > 10
    oof, pred = inputs["oof"], inputs["preds"]["lad"]
    # Out of fold: every flagged row is rejected for its flag, and the planted gross error (row 0: one kind
    # 150 months off) for the zone models' disagreement.
    assert _gate_cells(page, "images") == [str(len(oof)), "10"]
    assert _gate_cells(page, "registration_doubtful")[0].startswith(f"{len(REGISTRATION_FLAGGED)}, ")
    assert _gate_cells(page, "mask_doubtful")[0].startswith(f"{len(MASK_FLAGGED)}, ")
    accepted, reasons = gate.cross_fitted(oof.merge(inputs["flags"], on="id"), KINDS, pred)
    assert "zone_models_disagree" in reasons[0] and not accepted[0]
    error = np.abs(pred - oof["boneage"].to_numpy())
    rejected = int((~accepted).sum())
    assert rejected >= 6
    assert _gate_cells(page, "rejected")[0] == f"{rejected} ({100 * rejected / len(oof):.1f} %)"
    assert _gate_cells(page, "mae_accepted")[0] == f"{error[accepted].mean():.2f} ({int(accepted.sum())})"
    assert _gate_cells(page, "mae_rejected")[0] == f"{error[~accepted].mean():.2f} ({rejected})"
    assert error[~accepted].mean() > error[accepted].mean()  # the planted error lands among the rejected
    # The test split, as scored: worked out by hand.
    assert _gate_cells(page, "rejected")[1] == "2 (20.0 %)"
    assert _gate_cells(page, "mae_accepted")[1] == "4.50 (8)"
    assert _gate_cells(page, "mae_rejected")[1] == "30.00 (2)"
    assert _gate_cells(page, "mask_doubtful")[1] == "2, 30.0"
    assert _gate_cells(page, "fold_models_disagree") == ["0", "1, 40.0"]


@pytest.mark.s3
def test_report_writes_to_s3(s3_server):
    import fsspec

    oof = _oof(n_per_sex=15)
    record, pred = ensemble.fit_ensemble(oof, KINDS, "nnls")
    base = f"s3://{s3_server['bucket']}/report-test"
    uri = report.write_report(base, oof, KINDS, {"nnls": record}, {"nnls": pred},
                              storage_options=s3_server["storage_options"])
    fs, _ = fsspec.core.url_to_fs(base, **s3_server["storage_options"])
    names = {p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_server['bucket']}/report-test")}
    assert uri == base + "/report.html" and {"report.html", "pred_vs_true.png", "weights.png"} <= names


def chromium_or_skip() -> str:
    """Chromium's path; where there is none, a skip saying so, or a failure with BONEAGE_REQUIRE_CHROMIUM=1."""
    return program_or_skip(CHROMIUM_NAMES, "Chromium", REQUIRE_CHROMIUM, "Debian/Ubuntu: apt-get install chromium",
                           "to render the report")


def test_chromium_is_found_on_path_skipped_without_and_required_by_ci(tmp_path, monkeypatch):
    browser = tmp_path / "chromium-browser"
    browser.write_text("#!/bin/sh\n")
    browser.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert chromium_or_skip() == str(browser)
    browser.unlink()

    def outcome():  # a skip or a failure, caught: neither may end this test
        try:
            return chromium_or_skip()
        except (pytest.skip.Exception, pytest.fail.Exception) as raised:
            return raised

    monkeypatch.delenv(REQUIRE_CHROMIUM, raising=False)
    skipped = outcome()
    assert isinstance(skipped, pytest.skip.Exception) and "no Chromium on PATH" in str(skipped), skipped
    monkeypatch.setenv(REQUIRE_CHROMIUM, "1")
    failed = outcome()
    assert isinstance(failed, pytest.fail.Exception) and "BONEAGE_REQUIRE_CHROMIUM=1 requires it" in str(failed), failed


def test_report_renders_in_headless_chromium(inputs, tmp_path):
    chromium = chromium_or_skip()
    page_path = _write_full(inputs, tmp_path / "report")
    shot = tmp_path / "shot.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400", f"--screenshot={shot}",
                    page_path.as_uri()], check=True, timeout=180, capture_output=True)
    with Image.open(shot) as image:
        assert image.size == (1280, 2400)
        rgb = np.asarray(image.convert("RGB")).astype(int)
    non_white = (rgb.min(axis=2) < 235).mean()
    colours = len(np.unique(rgb.reshape(-1, 3) @ np.array([65536, 256, 1])))
    assert 0.05 < non_white < 0.8, non_white  # text, tables and plots on a white page
    assert colours > 500, colours  # anti-aliased text and plots, not a blank or error page
    # The plots were loaded, not just their alt text: matplotlib's first bar colour (#1f77b4) fills
    # the age-band bars in the first screen.
    bars = (np.abs(rgb - np.array([31, 119, 180])).max(axis=2) < 12).sum()
    assert bars > 2000, bars


def test_the_interval_section_states_level_method_coverage_and_width():
    from boneage.report import sections
    from boneage.validation import intervals

    rng = np.random.default_rng(0)
    y = rng.uniform(0, 228, 600)
    oof = pd.DataFrame({"boneage": y, "male": rng.random(600) < 0.5, "prediction": y + rng.normal(0, 8, 600),
                        "fold": np.arange(600) % 3})
    calibration = intervals.calibrate(oof, 0.9)
    test = {"method": calibration["method"], **intervals.coverage_report(
        [90.0, 10.0], [110.0, 30.0], [100.0, 50.0], [True, False], 0.9)}
    html = sections.interval_section(calibration, test)
    assert "90 % interval" in html and f"<b>{calibration['method']}</b>" in html
    assert "<td class='text'>all</td><td>2</td><td>50.0 %</td><td>20.0</td>" in html  # the test split: 1 of 2
    for method in intervals.METHODS:
        assert f"<td class='text'>{method}</td><td>600</td>" in html  # every method compared, out of fold
    assert "No prediction interval" in sections.interval_section({"error": "too few rows"}, None)
    assert "not measured on a locked test split" in sections.interval_section(calibration, None)


def test_the_gate_section_shows_each_checks_nominal_and_measured_rate(inputs, tmp_path):
    scored = inputs["test_gate"].copy()
    scored.loc[3, ["accepted", "reject_reason"]] = [False, "zone_models_disagree"]  # 1 of 10
    page = Path(report.write_report(str(tmp_path / "r"), inputs["oof"], KINDS, inputs["ensembles"], inputs["preds"],
                                    gate_flags=inputs["flags"], test_gate=scored)).read_text()
    oof, pred = inputs["oof"], inputs["preds"]["lad"]
    _, reasons = gate.cross_fitted(oof.merge(inputs["flags"], on="id"), KINDS, pred)
    oof_rate = gate.rejected_for(reasons, "zone_models_disagree").mean()
    nominal = f"{100 * (1 - gate.QUANTILE):.1f} %"
    assert _gate_cells(page, "rate_zone_models_disagree") == [f"{100 * oof_rate:.1f} % ({nominal})", f"10.0 % ({nominal})"]


def test_the_test_section_says_how_many_times_the_split_was_scored():
    from boneage.report import sections
    from boneage.validation import metrics

    acc = metrics.accuracy_report(np.array([10.0, 20.0]), np.array([12.0, 19.0]), np.array([True, False]), n_boot=10)
    test = {"images": 2, "scored": 2, "source": "test_fraction", "accuracy": acc}
    once = [{"bundle_sha256": "a" * 64, "at": "2025-01-01T00:00:00Z", "n": 2, "mae": 1.5}]
    assert "scored 1 time, by 1 bundle " in sections.test_section({**test, "evaluations": once}, None)
    twice = sections.test_section({**test, "evaluations": once + [{**once[0], "bundle_sha256": "b" * 64}]}, None)
    assert "scored 2 times, by 2 bundles" in twice and "no longer a clean estimate" in twice
    assert "bundle aaaaaaaaaaaa MAE 1.50" in twice


def test_the_sex_section_says_whether_a_predicted_sex_is_used_and_its_views():
    from boneage.report import sections
    from boneage.validation import sex_calls

    rng = np.random.default_rng(0)
    male = rng.random(400) < 0.5
    summary = {"kind": "B-sex", "views": 5, "all": {"n": 400, "auc": 0.8}}
    # a classifier that is always right with confidence: predicted sex earns its place
    sure = pd.DataFrame({"male": male, "fold": np.arange(400) % 4, "p_male": np.where(male, 0.99, 0.01)})
    on = sections.sex_section(summary, sex_calls.calibrate(sure, 0.02, 30))
    assert "data-sex-prediction='on'" in on and "wrong 0 of 400 times" in on
    assert "the mean logit over 5 test-time views" in on
    # a coin: off, with the reason scoring prints
    coin = sure.assign(p_male=np.where(rng.random(400) < 0.5, 0.95, 0.05))
    calls = sex_calls.calibrate(coin, 0.02, 30)
    off = sections.sex_section({**summary, "views": 1}, calls)
    assert "data-sex-prediction='off'" in off and sections.escape(calls["off_reason"]) in off
    assert "test-time views" not in off
    assert sections.sex_section(None, calls) == ""
