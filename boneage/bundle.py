"""The model bundle: one folder (local or s3://) with everything scoring needs, loaded by path.

    BUNDLE/manifest.json              format, version, packages, kinds, sexes, folds, zones, the file list
    BUNDLE/models/<trial>.safetensors          every fold model of every kind and sex (CV/models)
    BUNDLE/keypoints/keypoint_model.safetensors   the key point model (absent: geometric key points)
    BUNDLE/ensemble.json              the ensemble weights per sex (every fit, and which one scoring uses)
    BUNDLE/config.yaml                the run's resolved configuration (preprocessing, key points, CV)
    BUNDLE/training.json              a summary of the training data and the CV metrics

The manifest's and training.json's `data` say what the models were trained on: `kind` ("synthetic",
from `boneage synth`; "real"; "mixed"; absent in older bundles: training_data() gives "unknown"), the
number of training images and the label file's name.

The manifest is written last and lists every file with its size and SHA-256: a bundle without a
manifest is incomplete (a run cut off while writing it), and one whose files do not match is damaged.
Every file is checked against it before anything is loaded, the key point model included (the scoring
actors check it again when they load it). Weights are safetensors (boneage.model.weights): loading a bundle
never unpickles anything, so a bundle from elsewhere cannot run code. A bundle of another format
version (1: pickled .pt weights), or cut with other zones than this code's, is refused.
"""

from __future__ import annotations

import hashlib
import json
import platform
import time
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any, Mapping

import fsspec
import yaml

import boneage
from boneage.registration import frame
from boneage.data import storage
from boneage.errors import UserError

BUNDLE_FORMAT = "boneage-bundle"
BUNDLE_VERSION = 2  # 2: safetensors weights (1 had pickled .pt files)
MANIFEST = "manifest.json"
PACKAGES = ("boneage", "torch", "ray", "numpy", "pillow", "pyarrow", "scikit-image", "scipy")


class BundleError(UserError):
    """The bundle cannot be used: missing, incomplete, damaged or from an incompatible version."""


def training_data(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What the bundle was trained on (boneage.run.bundling.training_data): kind "synthetic", "real",
    "mixed", or "unknown" for a bundle written before boneage recorded it; images; labels_from."""
    return {"kind": "unknown", "images": None, "labels_from": None, **(manifest.get("data") or {})}


def package_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def zones_record() -> dict[str, dict[str, float]]:
    """The zone boxes in the frame, as the models were trained on them."""
    return {name: {k: v for k, v in asdict(zone).items() if k != "name"} for name, zone in frame.ZONES.items()}


def write_bundle(uri: str, files: Mapping[str, bytes], models: list[dict[str, Any]], info: Mapping[str, Any],
                 storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write `files` ({relative path: bytes}) under `uri`, then the manifest (last: it marks the bundle
    complete). `models`: one record per fold model (file, kind, sex, fold, oof_mae); `info`: kinds,
    sexes, folds, keypoint_model, ensemble... merged into the manifest. Returns the manifest."""
    listed = []
    for path, data in sorted(files.items()):
        storage.write_bytes(storage.join_uri(uri, path), data, storage_options)
        listed.append({"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()})
    manifest = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "packages": package_versions(), "frame": {"width": frame.FRAME_W, "height": frame.FRAME_H,
                                                  "store_scale": frame.STORE_SCALE},
        "zones": zones_record(), **info, "models": models, "files": listed,
    }
    storage.write_bytes(storage.join_uri(uri, MANIFEST), json.dumps(manifest, indent=2).encode(), storage_options)
    return manifest


def add_test_accuracy(uri: str, test: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None
                      ) -> dict[str, Any]:
    """Record the bundle's measured accuracy on the locked test split: training.json gains "test", the
    manifest "accuracy" (the test split's overall numbers), with training.json's new size and hash."""
    manifest = read_manifest(uri, storage_options)
    training_uri = storage.join_uri(uri, manifest.get("training", "training.json"))
    training = json.loads(storage.read_bytes(training_uri, storage_options))
    training["test"] = dict(test)
    data = json.dumps(training, indent=2).encode()
    storage.write_bytes(training_uri, data, storage_options)
    for entry in manifest["files"]:
        if entry["path"] == manifest.get("training", "training.json"):
            entry.update(bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    manifest.setdefault("accuracy", {})["test_split"] = {"images": test["images"], "scored": test["scored"],
                                           "source": test.get("source"), **test["accuracy"]["all"]}
    if (test.get("interval") or {}).get("all"):  # the bone age interval's coverage on the split
        i = test["interval"]
        manifest["accuracy"]["test_split"]["interval"] = {"level": i["level"], "method": i["method"], **i["all"]}
    storage.write_bytes(storage.join_uri(uri, MANIFEST), json.dumps(manifest, indent=2).encode(), storage_options)
    return manifest


@dataclass
class Bundle:
    """A loaded bundle: its manifest, the fold models' training states grouped by (kind, sex), the key
    point model's URI (None: geometric key points), the ensemble record and the run's configuration."""

    uri: str
    manifest: dict[str, Any]
    models: dict[tuple[str, str], list[dict[str, Any]]]
    keypoint_model: str | None
    ensemble: dict[str, Any]
    config: dict[str, Any]
    training: dict[str, Any] = field(default_factory=dict)

    @property
    def kinds(self) -> list[str]:
        return list(self.manifest["kinds"])

    @property
    def sexes(self) -> list[str]:
        return list(self.manifest["sexes"])


def read_manifest(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    fs, path = fsspec.core.url_to_fs(storage.join_uri(uri, MANIFEST), **dict(storage_options or {}))
    if not fs.exists(path):
        base_fs, base = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
        why = "is incomplete (no manifest.json: was the run that writes it cut off?)" if base_fs.exists(base) \
            else "does not exist"
        raise BundleError(f"bundle {uri} {why}")
    try:
        manifest = json.loads(fs.cat_file(path))
    except ValueError as err:
        raise BundleError(f"bundle {uri}: manifest.json is not valid JSON ({err})") from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{uri} is not a boneage bundle (format {manifest.get('format')!r})")
    if manifest.get("version") != BUNDLE_VERSION:
        raise BundleError(f"bundle {uri} has format version {manifest.get('version')}; this boneage "
                          f"{boneage.__version__} reads version {BUNDLE_VERSION}: score with the boneage that wrote it "
                          f"({(manifest.get('packages') or {}).get('boneage')}) or retrain")
    if manifest.get("zones") != zones_record():
        raise BundleError(f"bundle {uri} was trained on other zones than this boneage cuts "
                          f"({manifest.get('zones')} vs {zones_record()}): its models would see the wrong crops")
    return manifest


def check_files(uri: str, manifest: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> None:
    """Every listed file present with its listed size (BundleError naming the ones that are not)."""
    fs, base = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    problems = []
    for item in manifest["files"]:
        path = base.rstrip("/") + "/" + item["path"]
        if not fs.exists(path):
            problems.append(f"{item['path']} is missing")
        elif fs.size(path) != item["bytes"]:
            problems.append(f"{item['path']} has {fs.size(path)} bytes, the manifest says {item['bytes']}")
    if problems:
        raise BundleError(f"bundle {uri} is incomplete or damaged: " + "; ".join(problems[:10])
                          + (f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""))


def read_verified(uri: str, path: str, sha256: str | None, storage_options=None) -> bytes:
    """The bytes of `path` in the bundle at `uri`, refused unless they hash to `sha256` (the manifest's)."""
    if not sha256:
        raise BundleError(f"bundle {uri}: {path} is not listed with a checksum in the manifest")
    data = storage.read_bytes(storage.join_uri(uri, path), storage_options)
    if hashlib.sha256(data).hexdigest() != sha256:
        raise BundleError(f"bundle {uri}: {path} does not match its checksum in the manifest (damaged)")
    return data


def _read(uri: str, path: str, manifest: Mapping[str, Any], storage_options) -> bytes:
    listed = {f["path"]: f for f in manifest["files"]}
    return read_verified(uri, path, (listed.get(path) or {}).get("sha256"), storage_options)


def load_weights(uri: str, path: str, data: bytes) -> dict[str, Any]:
    """A model's state from verified bundle bytes: safetensors only, never a pickle."""
    from boneage.model import weights  # torch: imported when a model is loaded, not by `boneage --version`

    try:
        return weights.from_bytes(data)
    except weights.UnsafeWeights as err:
        raise BundleError(f"bundle {uri}: {path} refused: {err}") from None


def load_bundle(uri: str, storage_options: Mapping[str, Any] | None = None) -> Bundle:
    """Read and check a bundle; every fold model's state is loaded (on the CPU)."""
    manifest = read_manifest(uri, storage_options)
    check_files(uri, manifest, storage_options)
    # Every listed file is hashed before anything is loaded: a damaged or swapped file stops here.
    data = {item["path"]: _read(uri, item["path"], manifest, storage_options) for item in manifest["files"]}
    models: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for record in manifest["models"]:
        if record["file"] not in data:
            raise BundleError(f"bundle {uri}: model {record['file']} is not in the manifest's file list")
        state = load_weights(uri, record["file"], data[record["file"]])
        models.setdefault((record["kind"], record["sex"]), []).append(state)
    if manifest.get("keypoint_model"):
        if manifest["keypoint_model"] not in data:
            raise BundleError(f"bundle {uri}: key point model {manifest['keypoint_model']} is not in the "
                              "manifest's file list")
        load_weights(uri, manifest["keypoint_model"], data[manifest["keypoint_model"]])  # refused here, not on a worker
    for key in models:
        models[key].sort(key=lambda s: s["fold"])
    missing = [f"{k}-{s}" for k in manifest["kinds"] for s in manifest["sexes"] if (k, s) not in models]
    if missing:
        raise BundleError(f"bundle {uri} has no fold models for {', '.join(missing)}")
    for name in ("ensemble.json", "config.yaml", "training.json"):
        if name not in data:
            raise BundleError(f"bundle {uri}: {name} is not in the manifest's file list")
    ensemble = json.loads(data["ensemble.json"])
    config = yaml.safe_load(data["config.yaml"]) or {}
    training = json.loads(data["training.json"])
    return Bundle(uri=uri, manifest=manifest, models=models, keypoint_model=keypoint_model_uri(uri, manifest),
                  ensemble=ensemble, config=config, training=training)


def keypoint_model_uri(uri: str, manifest: Mapping[str, Any]) -> str | None:
    """Where the bundle's key point model is (None: the bundle registers with geometric key points)."""
    path = manifest.get("keypoint_model")
    return storage.join_uri(uri, path) if path else None


def keypoint_model_sha256(manifest: Mapping[str, Any]) -> str | None:
    """The manifest's SHA-256 of the key point model, which its loader checks (None: none listed)."""
    listed = {f["path"]: f for f in manifest.get("files", [])}
    return (listed.get(manifest.get("keypoint_model")) or {}).get("sha256")

