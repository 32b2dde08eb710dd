"""The model bundle: written, read back locally and on S3, and refused with a clear error when it is
incomplete, damaged or from another version."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from boneage import bundle
from boneage.bundle import BundleError, load_bundle

from tiny_bundle import FOLDS, KINDS, write_tiny_bundle


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
    model = tiny / "models" / "B-cls-M-fold1.pt"
    data = model.read_bytes()
    model.unlink()
    with pytest.raises(BundleError, match="models/B-cls-M-fold1.pt is missing"):
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
