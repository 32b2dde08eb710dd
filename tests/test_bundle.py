"""The model bundle: written, read back locally and on S3, and refused with a clear error when it is
incomplete, damaged or from another version."""

from __future__ import annotations

import hashlib
import json
import shutil
from io import BytesIO

import pytest
import torch

from boneage import bundle
from boneage.model import weights
from boneage.bundle import BundleError, load_bundle

from tiny_bundle import FOLDS, KINDS, fold_state, write_tiny_bundle


@pytest.fixture()
def tiny(tmp_path):
    path = tmp_path / "bundle"
    write_tiny_bundle(str(path))
    return path


def test_round_trip(tiny):
    loaded = load_bundle(str(tiny))
    assert loaded.kinds == list(KINDS) and loaded.sexes == ["F", "M"]
    assert sorted(loaded.models) == sorted((k, s) for k in KINDS for s in ("F", "M"))
    assert all([s["fold"] for s in states] == list(range(FOLDS)) for states in loaded.models.values())
    assert loaded.keypoint_model is None and loaded.ensemble["use"] == "lad"
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert manifest["format"] == "boneage-bundle" and manifest["version"] == bundle.BUNDLE_VERSION
    assert torch.__version__.startswith(manifest["packages"]["torch"]) and manifest["packages"]["ray"] == "2.60.0"
    listed = {f["path"] for f in manifest["files"]}
    assert listed == {p.relative_to(tiny).as_posix() for p in tiny.rglob("*") if p.is_file()} - {"manifest.json"}


def test_missing_bundle_and_missing_manifest(tmp_path, tiny):
    with pytest.raises(BundleError, match="does not exist"):
        load_bundle(str(tmp_path / "nowhere"))
    (tiny / "manifest.json").unlink()
    with pytest.raises(BundleError, match="incomplete .no manifest.json"):
        load_bundle(str(tiny))


def test_missing_or_damaged_file(tiny):
    model = tiny / "models" / "B-cls-M-fold1.safetensors"
    data = model.read_bytes()
    model.unlink()
    with pytest.raises(BundleError, match="models/B-cls-M-fold1.safetensors is missing"):
        load_bundle(str(tiny))
    model.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))  # same size, one byte changed
    with pytest.raises(BundleError, match="does not match its checksum"):
        load_bundle(str(tiny))
    shutil.rmtree(tiny / "models")
    with pytest.raises(BundleError, match=r"and \d+ more|is missing"):
        load_bundle(str(tiny))


@pytest.mark.parametrize("change, message", [
    ({"version": 99}, "format version 99"),
    ({"format": "something-else"}, "not a boneage bundle"),
    ({"zones": {"A": {"x0": 0}}}, "other zones"),
])
def test_incompatible_manifest(tiny, change, message):
    manifest = json.loads((tiny / "manifest.json").read_text())
    (tiny / "manifest.json").write_text(json.dumps({**manifest, **change}))
    with pytest.raises(BundleError, match=message):
        load_bundle(str(tiny))


@pytest.mark.s3
def test_bundle_on_s3(s3_server):
    uri = f"s3://{s3_server['bucket']}/bundles/tiny"
    write_tiny_bundle(uri, s3_server["storage_options"])
    loaded = load_bundle(uri, s3_server["storage_options"])
    assert len(loaded.models) == 2 * len(KINDS)


class _RunsCodeWhenUnpickled:
    """What an attacker would put in a weights file: unpickling it calls open(marker, "w")."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("where", ["models/A-reg-F-fold0.safetensors", "keypoints/keypoint_model.safetensors"])
def test_a_pickle_that_would_run_code_is_refused(tiny, tmp_path, where):
    """A fold model or the key point model replaced by a pickle carrying code, with the manifest's
    checksum updated to match (as whoever could swap the file could do): refused, and the code never ran."""
    marker = tmp_path / "payload_ran"
    buffer = BytesIO()
    torch.save({"spec": {"kind": "A-reg"}, "best": _RunsCodeWhenUnpickled(str(marker))}, buffer)
    data = buffer.getvalue()
    manifest = json.loads((tiny / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != where] + [
        {"path": where, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}]
    manifest["keypoint_model"] = "keypoints/keypoint_model.safetensors"
    if where.startswith("models/"):  # the key point model the manifest now names: a good one
        good = weights.to_bytes(fold_state("A-reg", "F", 0))
        (tiny / "keypoints").mkdir()
        (tiny / "keypoints" / "keypoint_model.safetensors").write_bytes(good)
        manifest["files"] += [{"path": "keypoints/keypoint_model.safetensors", "bytes": len(good),
                               "sha256": hashlib.sha256(good).hexdigest()}]
    (tiny / where).parent.mkdir(exist_ok=True)
    (tiny / where).write_bytes(data)
    (tiny / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"{where} refused: not a safetensors file"):
        load_bundle(str(tiny))
    assert not marker.exists()
    # The same bytes given as a key point model (.pt) elsewhere: torch's weights_only refuses them too.
    with pytest.raises(weights.UnsafeWeights, match="not loadable as tensors only"):
        weights.load_state(data)
    assert not marker.exists()
    # The payload is real: a plain unpickling would have run it.
    torch.load(BytesIO(data), weights_only=False)
    assert marker.exists()


def test_weights_round_trip_and_a_file_not_in_the_manifest_is_refused(tiny):
    state = fold_state("B-cls", "M", 1)
    back = weights.from_bytes(weights.to_bytes({**state, "metrics": {"mae": float("nan"), "kinds": ("a", "b")}}))
    assert back["trial"] == state["trial"] and back["metrics"]["kinds"] == ["a", "b"]
    assert all(torch.equal(back["best"]["model"][k], v) for k, v in state["best"]["model"].items())
    manifest = json.loads((tiny / "manifest.json").read_text())
    manifest["files"] = [f for f in manifest["files"] if f["path"] != "models/A-reg-F-fold0.safetensors"]
    (tiny / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not in the manifest's file list"):
        load_bundle(str(tiny))


def test_an_older_bundle_without_its_training_data_loads_as_unknown(tiny):
    loaded = load_bundle(tiny)  # write_tiny_bundle writes no "data": as a bundle from before it existed
    assert "data" not in loaded.manifest
    assert bundle.training_data(loaded.manifest) == {"kind": "unknown", "images": None, "labels_from": None}


def test_the_bundle_records_synthetic_or_real_the_image_count_and_the_label_files_name(synthetic_small):
    from pathlib import Path

    from boneage.config import Config
    from boneage.run import bundling

    config = Config()
    config.data.images, config.data.labels = synthetic_small["images"], synthetic_small["labels"]
    data = bundling.training_data(config, {"1", "2", "3", "4"})
    assert data == {"kind": "synthetic", "images": 4, "checked": 4, "checked_synthetic": 4,
                    "images_from": "images", "labels_from": "labels.csv"}  # names: no path of this machine
    real = Path(__file__).parent / "fixtures" / "real"
    config.data.images, config.data.labels = str(real), str(real / "labels.csv")
    data = bundling.training_data(config, {"1402", "1563", "1675", "1684"})
    assert (data["kind"], data["images"], data["checked"], data["labels_from"]) == ("real", 4, 4, "labels.csv")
