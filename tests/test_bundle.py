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


def _sha(path) -> str:
    return hashlib.sha256((path / "manifest.json").read_bytes()).hexdigest()


def _replacement(tiny, monkeypatch, fail_at):
    """Write a bundle with other ensemble weights over `tiny`, `fail_at` breaking the write."""
    manifest = json.loads((tiny / "manifest.json").read_text())
    files = {f["path"]: (tiny / f["path"]).read_bytes() for f in manifest["files"]}
    files["ensemble.json"] = json.dumps({"use": "lad", "fits": {"lad": {"changed": True}}}).encode()
    info = {k: v for k, v in manifest.items() if k not in ("models", "files")}
    fail_at(monkeypatch)
    bundle.write_bundle(str(tiny), files, manifest["models"], info)


def test_a_crash_while_a_bundle_is_replaced_leaves_the_old_or_the_new_one(tiny, monkeypatch):
    old_sha, old_ensemble = _sha(tiny), (tiny / "ensemble.json").read_bytes()
    writes = []

    def die_after_the_first_file(mp):
        real = bundle.storage.write_bytes

        def write(uri, data, options=None):
            if any(w.endswith("ensemble.json") for w in writes):
                raise KeyboardInterrupt("killed")  # the run dies after the changed file, before the rest
            writes.append(uri)
            real(uri, data, options)
        mp.setattr(bundle.storage, "write_bytes", write)

    with pytest.raises(KeyboardInterrupt):
        _replacement(tiny, monkeypatch, die_after_the_first_file)
    monkeypatch.undo()
    loaded = load_bundle(str(tiny))  # the old bundle, whole: the new one was being written beside it
    assert loaded.sha256 == old_sha == _sha(tiny) and (tiny / "ensemble.json").read_bytes() == old_ensemble

    # Killed between the two renames (the old one moved aside, the new one not yet in place, and no
    # chance to put the old one back): the old bundle is complete beside, and the error says where.
    renames = []

    def die_between_the_renames(mp):
        real = bundle.os.rename

        def rename(a, b):
            renames.append((a, b))
            if len(renames) > 1:
                raise KeyboardInterrupt("killed")
            real(a, b)
        mp.setattr(bundle.os, "rename", rename)

    with pytest.raises(KeyboardInterrupt):
        _replacement(tiny, monkeypatch, die_between_the_renames)
    monkeypatch.undo()
    aside = renames[0][1]
    with pytest.raises(BundleError, match="previous bundle is complete at .*previous-"):
        load_bundle(str(tiny))
    assert load_bundle(aside).sha256 == old_sha == _sha(type(tiny)(aside))

    # A rename that fails with an error puts the old bundle back; one that succeeds gives the new one.
    bundle.os.rename(aside, tiny)
    failed = []

    def fail_the_second_rename(mp):
        real = bundle.os.rename

        def rename(a, b):
            failed.append(a)
            if len(failed) == 2:
                raise OSError("disk trouble")
            real(a, b)
        mp.setattr(bundle.os, "rename", rename)

    with pytest.raises(OSError, match="disk trouble"):
        _replacement(tiny, monkeypatch, fail_the_second_rename)
    monkeypatch.undo()
    assert load_bundle(str(tiny)).sha256 == old_sha
    _replacement(tiny, monkeypatch, lambda mp: None)
    monkeypatch.undo()
    new = load_bundle(str(tiny))
    assert new.ensemble["fits"]["lad"] == {"changed": True} and new.sha256 == _sha(tiny) != old_sha
    assert not list(tiny.parent.glob("bundle.previous-*"))


def _test_result(mae: float) -> dict:
    return {"images": 4, "scored": 4, "source": "test_fraction", "accuracy": {"all": {"n": 4, "mae": mae}}}


def test_the_test_accuracy_lives_beside_the_hashed_bundle(tiny, monkeypatch):
    sha, files = _sha(tiny), {p: p.read_bytes() for p in tiny.rglob("*") if p.is_file()}
    measured = bundle.add_test_accuracy(str(tiny), _test_result(7.5), sha)
    # Nothing hashed changed: the hash the test predictions carry is the finished bundle's.
    assert {p: p.read_bytes() for p in files} == files and _sha(tiny) == sha
    loaded = load_bundle(str(tiny))
    assert loaded.sha256 == sha and loaded.measured == measured and measured["bundle_sha256"] == sha
    assert loaded.manifest["accuracy"]["test_split"]["mae"] == 7.5 and loaded.training["test"]["scored"] == 4
    assert "measured.json" not in {f["path"] for f in loaded.manifest["files"]}

    # Killed while measured.json is replaced: the old measurement stays, whole.
    def killed(a, b):
        raise KeyboardInterrupt("killed")
    monkeypatch.setattr(bundle.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        bundle.add_test_accuracy(str(tiny), _test_result(9.0), sha)
    monkeypatch.undo()
    assert load_bundle(str(tiny)).manifest["accuracy"]["test_split"]["mae"] == 7.5

    # A bundle that changed since it was scored gets no accuracy; a measurement of another bundle is ignored.
    with pytest.raises(BundleError, match="changed while its test split was scored"):
        bundle.add_test_accuracy(str(tiny), _test_result(9.0), "0" * 64)
    (tiny / "measured.json").write_text(json.dumps({**measured, "bundle_sha256": "0" * 64}))
    loaded = load_bundle(str(tiny))
    assert loaded.measured is None and "test_split" not in loaded.manifest.get("accuracy", {})
    # A new bundle written over it does not inherit the old one's measurement.
    (tiny / "measured.json").write_text(json.dumps(measured))
    write_tiny_bundle(str(tiny))
    assert not (tiny / "measured.json").exists() and load_bundle(str(tiny)).measured is None
