"""The key point model through Ray Train and a Ray Data actor pool, on a real local Ray (tiny model,
two epochs: this checks the wiring and the bookkeeping, not accuracy; accuracy is in docs/benchmarks.md)."""

from __future__ import annotations

import numpy as np
import pytest

from boneage.registration import prepare
from boneage import run
from boneage.data import storage, synth
from boneage.model import weights
from boneage.config import load_config
from boneage.data.ingest import build_manifest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def synthetic_30(tmp_path_factory):
    folder = tmp_path_factory.mktemp("synthetic24")
    return {k: str(v) for k, v in synth.write_dataset(30, folder, seed=3, size=(384, 288), progress=False).items()}


@pytest.mark.parametrize("local_train", [None, False], ids=["local-mode-on-cpu", "train-worker"])
def test_train_then_register_with_the_model(tmp_path, ray_local, synthetic_30, local_train):
    config = load_config(overrides={
        "data": {"images": synthetic_30["images"], "labels": synthetic_30["labels"],
                 "keypoints": synthetic_30["keypoints"]},
        "keypoints": {"epochs": 2, "width_mult": 0.25, "batch_size": 8, "local_train": local_train},
        "output": str(tmp_path / "run"),
    })
    manifest = build_manifest(config.data.images, config.data.labels)
    annotations = run.read_annotations(config)
    assert len(annotations) == 30
    train_ids, held_out = run.split_annotations(annotations, seed=0)
    assert len(held_out) == 6 and not train_ids & held_out

    model_uri = run.keypoint_model(config, manifest, annotations)
    assert model_uri is not None
    state = weights.from_bytes(storage.read_bytes(model_uri))  # safetensors: no pickle
    assert state["spec"]["kind"] == "keypoints" and "val_dist_px" in state["metrics"]
    # A Train worker (as on a GPU) keeps a resumable checkpoint under the run's storage path; local
    # mode (the CPU default) trains in this process and keeps none
    checkpoints = list((tmp_path / "run" / "train" / "keypoints").glob("checkpoint_*"))
    assert bool(checkpoints) == (local_train is False)

    from boneage.distributed.ray_prepare import run_prepare

    table = run_prepare(manifest, str(tmp_path / "run" / "registered"), config, model_uri)
    assert len(table) == 30 and (table.status == "ok").all()
    assert set(table.keypoint_source) <= {"model", "geometric"}
    assert table.keypoint_disagreement.notna().all()  # the model predicted for every image
    assert table.keypoint_confidence.between(0, 1).all()


def test_training_set_uses_annotations_and_confident_pseudo_labels():
    import pandas as pd

    blank = prepare.encode_png(np.zeros(prepare.KEYPOINT_INPUT_HW, np.uint8))
    points = {c: 10.0 for c in prepare.KEYPOINT_COLUMNS}
    analysed = pd.DataFrame([
        {"id": "a", "status": "ok", "width": 100, "height": 200, "keypoint_input": blank, "keypoint_confidence": 0.1, **points},
        {"id": "b", "status": "ok", "width": 100, "height": 200, "keypoint_input": blank, "keypoint_confidence": 0.9, **points},
        {"id": "c", "status": "ok", "width": 100, "height": 200, "keypoint_input": blank, "keypoint_confidence": 0.2, **points},
        {"id": "d", "status": "error", "width": None, "height": None, "keypoint_input": None, "keypoint_confidence": None,
         **{c: None for c in prepare.KEYPOINT_COLUMNS}},
    ])
    from boneage.distributed.ray_keypoints import training_set

    annotation = np.array([[50.0, 20.0], [50.0, 150.0], [90.0, 100.0]])
    inputs, targets, is_annotation = training_set(analysed, {"a": annotation}, min_confidence=0.8)
    assert inputs.shape == (2, 1, *prepare.KEYPOINT_INPUT_HW)
    np.testing.assert_allclose(targets[0], annotation / [100, 200])  # normalised by (width, height)
    np.testing.assert_allclose(targets[1], np.full((3, 2), 10.0) / [100, 200])  # b's pseudo-label
    assert list(is_annotation) == [True, False]  # c is not confident enough, d failed
    # Rows in any order (Ray Data's, as tasks finish) give the same training set, in id order
    again = training_set(analysed.iloc[::-1], {"a": annotation}, min_confidence=0.8)
    for mine, theirs in zip((inputs, targets, is_annotation), again):
        np.testing.assert_array_equal(mine, theirs)
