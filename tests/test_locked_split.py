"""The locked test split sets nothing the bundle ships (issue #23, item 4): the bundle's weights,
thresholds and calibration are bit-identical whatever the test split holds, the key point model never
trains on its images, and every scoring of the split is recorded. Fast: no Ray (the scorer is faked)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from boneage import bundle
from boneage.clinical import gate
from boneage.config import load_config
from boneage.model import weights
from boneage.run import bundling, holdout, preparation
from boneage.validation import cv, ensemble

from tiny_bundle import KINDS, WEIGHTS, fold_state

K = 2


def fake_cv_output(out: Path, synthetic: dict, train_ids: list[str]):
    """OUTPUT/cv and OUTPUT/qa as the CV stage leaves them, for `train_ids` of the synthetic images."""
    labels = pd.read_csv(synthetic["labels"], dtype={"id": str}).set_index("id").loc[train_ids].reset_index()
    folds = labels.assign(fold=np.arange(len(labels)) % K)
    rng = np.random.default_rng(0)
    oof = folds.assign(**{kind: folds.boneage + rng.normal(0, 5, len(folds)) for kind in KINDS})
    record = ensemble.make_record("lad", KINDS, WEIGHTS)
    oof["ensemble_lad"] = ensemble.predict(record, oof[list(KINDS)], oof["male"].to_numpy(bool))
    (out / "cv" / "models").mkdir(parents=True)
    (out / "qa").mkdir()
    folds.to_parquet(out / "cv" / "folds.parquet")
    oof.to_parquet(out / "cv" / "ensemble_oof.parquet")
    trials = cv.cv_trials(KINDS, ("F", "M"), K)
    pd.DataFrame({"trial": [t.name for t in trials], "oof_mae": 5.0}).to_parquet(out / "cv" / "trials.parquet")
    for t in trials:
        (out / "cv" / "models" / f"{t.name}.pt").write_bytes(weights.to_bytes(fold_state(t.kind, t.sex, t.fold)))
    (out / "cv" / "ensemble.json").write_text(json.dumps({"use": "lad", "fits": {"lad": record}}))
    (out / "cv" / "summary.json").write_text(json.dumps({"mae": []}))
    (out / "qa" / "preprocess_summary.json").write_text(json.dumps({"items": len(folds)}))


def write_test_split(out: Path, synthetic: dict, ids: list[str], shift: float, uri_of) -> pd.DataFrame:
    labels = pd.read_csv(synthetic["labels"], dtype={"id": str}).set_index("id").loc[ids].reset_index()
    split = labels.assign(uri=[uri_of(i) for i in ids], boneage=labels.boneage + shift, source="test_fraction")
    (out / "test").mkdir(exist_ok=True)
    split[["id", "uri", "male", "boneage", "source"]].to_csv(out / "test" / "split.csv", index=False)
    return split


def hashed_content(path: Path) -> dict[str, bytes]:
    """Every file the manifest hashes, and the manifest without its creation time."""
    manifest = json.loads((path / "manifest.json").read_text())
    files = {f["path"]: (path / f["path"]).read_bytes() for f in manifest["files"]}
    files["manifest.json"] = json.dumps({k: v for k, v in manifest.items() if k != "created"}, sort_keys=True).encode()
    return files


@pytest.fixture()
def run_dir(tmp_path, synthetic_small):
    ids = sorted(pd.read_csv(synthetic_small["labels"], dtype={"id": str})["id"])
    out = tmp_path / "run"
    fake_cv_output(out, synthetic_small, ids[:4])
    config = load_config(None, {"output": str(out), "data": {"images": synthetic_small["images"],
                                                             "labels": synthetic_small["labels"]},
                                "cv": {"k": K, "kinds": list(KINDS), "sex_kind": None},
                                "keypoints": {"source": "geometric"}})
    return out, config, ids


def fake_score(spread: float, error: float):
    """holdout.score without Ray: every test image scored, off by `error`, with fold spread `spread`."""
    def score(uris, bundle_uri, out_uri, subjects=None, storage_options=None, resume=True):
        split = pd.read_csv(Path(subjects).parent / "split.csv", dtype={"id": str})
        return pd.DataFrame({"id": split["id"], "status": "ok", "error": None,
                             "boneage_months": split["boneage"] + error, "boneage_sd_months": spread,
                             "boneage_lower_months": np.nan, "boneage_upper_months": np.nan})
    return score


@pytest.mark.parametrize("test_a, test_b", [((0.0, 0.5, 1.0), (-40.0, 25.0, 30.0))])
def test_what_the_test_split_holds_changes_nothing_the_bundle_ships(run_dir, synthetic_small, monkeypatch,
                                                                   tmp_path, test_a, test_b):
    out, config, ids = run_dir
    images = Path(synthetic_small["images"])
    shipped = {}
    for name, (shift, spread, error), uri_of in (("a", test_a, lambda i: str(images / f"{i}.png")),
                                                 ("b", test_b, lambda i: str(images / f"{ids[0]}.png"))):
        # Other test images (uris) and labels; the bundle is written with the split in place, then
        # the split is scored (its predictions, spreads and errors differ too) and its accuracy recorded.
        write_test_split(out, synthetic_small, ids[4:], shift, uri_of)
        uri = bundling.write_bundle(config)
        monkeypatch.setattr(holdout, "score", fake_score(spread, error))
        result = holdout.evaluate_test(config, uri, n_boot=10)
        assert result["accuracy"]["all"]["mae"] == pytest.approx(abs(error))
        loaded = bundle.load_bundle(uri)
        shipped[name] = {"content": hashed_content(Path(uri)), "gate": gate.calibration_of(loaded.training),
                         "sha": loaded.sha256, "test_mae": loaded.manifest["accuracy"]["test_split"]["mae"]}
        shutil.copytree(uri, tmp_path / f"bundle-{name}")
    assert shipped["a"]["test_mae"] != shipped["b"]["test_mae"]  # the measurement differs ...
    assert shipped["a"]["content"] == shipped["b"]["content"]  # ... nothing hashed does: weights, ensemble, training.json
    assert shipped["a"]["gate"] == shipped["b"]["gate"] and "fold_spread_max" not in shipped["a"]["gate"]
    # The predictions' bundle hash is the finished bundle's: recorded after scoring, it did not change.
    assert json.loads((out / "test" / "metrics.json").read_text())["bundle_sha256"] == shipped["b"]["sha"]
    assert hashlib.sha256((tmp_path / "bundle-b" / "manifest.json").read_bytes()).hexdigest() == shipped["b"]["sha"]
    # Both scorings are recorded.
    evaluations = holdout.read_evaluations(config)
    assert len(evaluations) == 2 and [e["mae"] for e in evaluations] == pytest.approx([test_a[2], abs(test_b[2])])
    assert all(e["n"] == 2 and e["bundle_sha256"] and e["at"].endswith("Z") for e in evaluations)


def test_the_key_point_model_never_trains_on_the_test_split():
    ids = [f"img{i:02d}" for i in range(30)]
    manifest = pd.DataFrame({"id": ids, "uri": [f"/x/{i}.png" for i in ids], "status": "ok"})
    annotations = {i: np.zeros((3, 2)) for i in ids[:15]}
    test_ids = set(ids[::3])  # annotated test images and others
    rows, train_ids = preparation.keypoint_training_rows(manifest, annotations, test_ids, 100, seed=0)
    assert not (set(rows["id"]) | train_ids) & test_ids
    outside = {i: a for i, a in annotations.items() if i not in test_ids}
    assert train_ids == preparation.split_annotations(outside, 0)[0]
    # The test split's annotated images measure the key point error with the held-out fifth.
    held = preparation.keypoint_annotation_split(annotations, test_ids, 0)[1]
    assert held == preparation.split_annotations(outside, 0)[1] | (set(annotations) & test_ids)
    assert set(rows["id"]) == (set(ids) - test_ids - set(annotations)) | train_ids
    # What the test images are (their rows, their annotations) cannot move the training set.
    changed = manifest.assign(uri=[f"/elsewhere/{i}.dcm" if i in test_ids else u for i, u in zip(ids, manifest.uri)])
    other_annotations = {**annotations, **{i: np.ones((3, 2)) for i in test_ids}}  # more, and other, annotations
    rows_b, train_b = preparation.keypoint_training_rows(changed, other_annotations, test_ids, 100, seed=0)
    assert rows_b.equals(rows) and train_b == train_ids
    # Without a test split (test_fraction 0), everything may train it.
    rows_all, _ = preparation.keypoint_training_rows(manifest, annotations, set(), 100, seed=0)
    held_all = preparation.split_annotations(annotations, 0)[1]
    assert set(rows_all["id"]) == set(ids) - held_all and test_ids & set(rows_all["id"])
