"""The workflows end to end on the embedded default (a small synthetic set), on a real local Ray."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pandas as pd
import pytest

from boneage.bundle import load_bundle
from boneage.ray_prepare import read_registered

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


def _load_workflow(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "workflows" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def embedded_run(tmp_path_factory, ray_local) -> Path:
    """full_cv.py on a shrunken embedded default: 30 synthetic images, one kind, 2 folds, 1 epoch."""
    tmp_path = tmp_path_factory.mktemp("embedded")
    preset = tmp_path / "tiny.yaml"
    preset.write_text("data:\n  synthetic_size: [320, 240]\nkeypoints:\n  epochs: 2\n  width_mult: 0.25\n"
                      "cv:\n  k: 2\n  kinds: [A-reg]\n  epochs: 1\n  input_scale: 0.125\n  width_mult: 0.0625\n"
                      "  fc: 32\n  batch_size: 4\n")
    out = tmp_path / "run"
    assert _load_workflow("full_cv").main(["--config", str(preset), "--synthetic-n", "30",
                                           "--output", str(out)]) == 0
    return out


def test_full_cv_on_the_embedded_default(embedded_run):
    out = embedded_run
    assert (out / "config.yaml").exists() and "synthetic_n: 30" in (out / "config.yaml").read_text()
    assert len(list((out / "synthetic" / "images").iterdir())) == 30
    table = read_registered(str(out / "registered"), with_images=False)
    assert len(table) == 30 and set(table.status) == {"ok"}
    summary = json.loads((out / "qa" / "preprocess_summary.json").read_text())
    assert summary["items"] == 30 and summary["keypoint_model"].endswith("keypoint_model.pt")
    assert summary["keypoint_error_on_held_out_annotations"]["images"] == 6
    assert (out / "qa" / "registered_sheet.png").stat().st_size > 10_000
    # k-fold CV: 1 kind x 2 sexes x 2 folds, an out-of-fold prediction for every labelled ok image
    oof = pd.read_parquet(out / "cv" / "oof.parquet")
    assert len(oof) == 30 and oof["A-reg"].notna().all()
    assert len(pd.read_parquet(out / "cv" / "trials.parquet")) == 4
    assert len(list((out / "cv" / "models").glob("A-reg-*-fold*.pt"))) == 4
    cv_summary = json.loads((out / "cv" / "summary.json").read_text())
    assert {row["model"] for row in cv_summary["mae"]} == {"A-reg", "per-sex median"}
    # Ensemble: three fits, each with a cross-validated MAE; scoring uses the lowest.
    ensembles = json.loads((out / "cv" / "ensemble.json").read_text())
    assert set(ensembles["fits"]) == {"tune", "lad", "nnls"}
    assert ensembles["use"] == min(ensembles["fits"], key=lambda m: ensembles["fits"][m]["cv_mae"]["all"])
    assert pd.read_parquet(out / "cv" / "ensemble_oof.parquet")[["ensemble_tune", "ensemble_lad"]].notna().all().all()
    # The bundle: every fold model, the key point model, weights, config; loads for scoring.
    bundle = load_bundle(str(out / "bundle"))
    assert sorted(bundle.models) == [("A-reg", "F"), ("A-reg", "M")]
    assert all(len(states) == 2 for states in bundle.models.values())
    assert bundle.keypoint_model.endswith("keypoints/keypoint_model.pt") and bundle.training["images"] == 30
    # The report, with every picture it links to.
    html = (out / "report" / "report.html").read_text()
    pictures = re.findall(r'src="([^"]+\.png)"', html)
    assert len(pictures) >= 4 and all((out / "report" / p).stat().st_size > 1000 for p in pictures)


def test_scoring_with_the_trained_bundle(embedded_run, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for path in sorted((embedded_run / "synthetic" / "images").iterdir())[:5]:
        (images / path.name).write_bytes(path.read_bytes())
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    out = tmp_path / "predictions.parquet"
    assert _load_workflow("score").main([str(images), "--bundle", str(embedded_run / "bundle"), "--out", str(out),
                                         "--subjects", str(embedded_run / "synthetic" / "labels.csv")]) == 0
    table = pd.read_parquet(out)
    assert len(table) == 6 and table.set_index("id").loc["broken", "status"] == "error"
    ok = table[table.status == "ok"]
    assert len(ok) >= 4 and ok.boneage_months.between(0, 240).all() and ok["A-reg"].notna().all()
    assert set(ok.sex_source) == {"csv"}


def test_full_cv_reports_a_bad_config_key(tmp_path, capsys):
    preset = tmp_path / "bad.yaml"
    preset.write_text("keypoints:\n  epoch: 2\n")
    assert _load_workflow("full_cv").main(["--config", str(preset), "--output", str(tmp_path / "run")]) == 2
    assert "unknown config key keypoints.'epoch'" in capsys.readouterr().err
