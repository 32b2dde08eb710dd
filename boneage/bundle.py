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

    BUNDLE/measured.json              beside the hashed content, not listed in the manifest: the accuracy
                                      measured on the locked test split, with the manifest SHA-256 it measured

The manifest is written last and lists every file with its size and SHA-256: a bundle without a
manifest is incomplete (a run cut off while writing it), and one whose files do not match is damaged.
The bundle's hash (`bundle_sha256` in every output) is the SHA-256 of manifest.json, which never changes
once written: the test split's accuracy, measured after the bundle is finished, goes into measured.json
beside it (load_bundle shows it as manifest["accuracy"]["test_split"] and training["test"] only when its
recorded hash is this manifest's), so the bundle that was measured is the bundle that ships.

Replacing a bundle: on a local disk the new one is written into a sibling folder (BUNDLE.partial-*) and
renamed into place, the old one moved aside to BUNDLE.previous-* for that moment: a crash leaves the
old bundle or the new one at BUNDLE, or (between the two renames) the complete old one at
BUNDLE.previous-*, which read_manifest names. On s3:// there is no rename: the old manifest and
measured.json are deleted first, the files written in place and the manifest last, so a cut-off write
leaves a bundle that reads as incomplete, never one that loads with mixed files.
Every file is checked against it before anything is loaded, the key point model included (the scoring
actors check it again when they load it). Weights are safetensors (boneage.model.weights): loading a bundle
never unpickles anything, so a bundle from elsewhere cannot run code. A bundle of another format
version (1: pickled .pt weights), or cut with other zones than this code's, is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import time
import uuid
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
MEASURED = "measured.json"  # beside the hashed content: the test split's accuracy (add_test_accuracy)
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
    sexes, folds, keypoint_model, ensemble... merged into the manifest. An existing bundle at `uri` is
    replaced whole (the module docstring says how a crash leaves it). Returns the manifest."""
    listed = [{"path": path, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
              for path, data in sorted(files.items())]
    manifest = {
        "format": BUNDLE_FORMAT, "version": BUNDLE_VERSION, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "packages": package_versions(), "frame": {"width": frame.FRAME_W, "height": frame.FRAME_H,
                                                  "store_scale": frame.STORE_SCALE},
        "zones": zones_record(), **info, "models": models, "files": listed,
    }
    fs, base = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    local = _is_local(fs)
    target = uri
    if local:
        base = os.path.abspath(base.rstrip("/"))
        target = f"{base}.partial-{uuid.uuid4().hex[:8]}"  # a sibling: the rename stays on one file system
    else:
        for name in (MANIFEST, MEASURED):  # first: a write cut off from here on reads as incomplete
            if fs.exists(f"{base.rstrip('/')}/{name}"):
                fs.rm(f"{base.rstrip('/')}/{name}")
    for path, data in sorted(files.items()):
        storage.write_bytes(storage.join_uri(target, path), data, storage_options)
    storage.write_bytes(storage.join_uri(target, MANIFEST), json.dumps(manifest, indent=2).encode(), storage_options)
    if local:
        _swap_into_place(target, base)
    return manifest


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocol))


def _swap_into_place(new: str, base: str) -> None:
    """Rename the finished folder `new` to `base`; an existing `base` is moved aside first and removed
    after. A directory cannot be replaced by one atomic rename, so between the two renames the old
    bundle is complete at base.previous-* (read_manifest says so); an error there puts it back."""
    if not os.path.exists(base):
        os.rename(new, base)
        return
    previous = f"{base}.previous-{uuid.uuid4().hex[:8]}"
    os.rename(base, previous)
    try:
        os.rename(new, base)
    except BaseException:
        os.rename(previous, base)
        raise
    shutil.rmtree(previous, ignore_errors=True)


def manifest_sha256(uri: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """The bundle's hash: SHA-256 of its manifest.json (which lists every file's SHA-256)."""
    return hashlib.sha256(storage.read_bytes(storage.join_uri(uri, MANIFEST), storage_options)).hexdigest()


def add_test_accuracy(uri: str, test: Mapping[str, Any], bundle_sha256: str,
                      storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Record the bundle's accuracy on the locked test split in BUNDLE/measured.json, beside the hashed
    content: the manifest and every listed file stay as they were, so the hash the test predictions
    carry (`bundle_sha256`, the bundle that scored them) stays the bundle's hash. Refused when the bundle
    at `uri` is no longer that one. One file written whole (locally: a temporary file renamed over it;
    on s3:// one PUT): a crash leaves the old measured.json or the new one. Returns its content."""
    now = manifest_sha256(uri, storage_options)
    if now != bundle_sha256:
        raise BundleError(f"bundle {uri} changed while its test split was scored (manifest sha256 {now[:12]}, "
                          f"scored with {bundle_sha256[:12]}): its accuracy is not recorded")
    measured = {"bundle_sha256": bundle_sha256, "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "accuracy": {"test_split": {"images": test["images"], "scored": test["scored"],
                                            "source": test.get("source"), **test["accuracy"]["all"]}},
                "test": dict(test)}
    if (test.get("interval") or {}).get("all"):  # the bone age interval's coverage on the split
        i = test["interval"]
        measured["accuracy"]["test_split"]["interval"] = {"level": i["level"], "method": i["method"], **i["all"]}
    data = json.dumps(measured, indent=2).encode()
    fs, base = fsspec.core.url_to_fs(uri, **dict(storage_options or {}))
    if _is_local(fs):
        path = os.path.join(base, MEASURED)
        partial = f"{path}.partial-{uuid.uuid4().hex[:8]}"
        with open(partial, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, path)
    else:
        storage.write_bytes(storage.join_uri(uri, MEASURED), data, storage_options)
    return measured


def read_measured(uri: str, sha256: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """BUNDLE/measured.json when it measured the bundle whose manifest hashes to `sha256`; None without
    one (not yet measured, or a bundle from before measured.json: its manifest holds the accuracy)."""
    fs, path = fsspec.core.url_to_fs(storage.join_uri(uri, MEASURED), **dict(storage_options or {}))
    if not fs.exists(path):
        return None
    try:
        measured = json.loads(fs.cat_file(path))
    except ValueError as err:
        raise BundleError(f"bundle {uri}: {MEASURED} is not valid JSON ({err})") from None
    if measured.get("bundle_sha256") != sha256:
        print(f"[bundle] {uri}: {MEASURED} measured another bundle (sha256 {str(measured.get('bundle_sha256'))[:12]}): "
              "ignored")
        return None
    return measured


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
    sha256: str | None = None  # of manifest.json: the bundle's hash
    measured: dict[str, Any] | None = None  # measured.json, when it measured this bundle

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
        aside = sorted(base_fs.glob(base.rstrip("/") + ".previous-*")) if _is_local(base_fs) else []
        if aside:
            why += (f"; a bundle write was cut off between its two renames: the previous bundle is complete "
                    f"at {aside[-1]} (rename it back)")
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
    """Read and check a bundle; every fold model's state is loaded (on the CPU). Its measured.json, when
    it measured this bundle, shows as manifest["accuracy"]["test_split"] and training["test"]."""
    manifest = read_manifest(uri, storage_options)
    sha256 = manifest_sha256(uri, storage_options)
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
    # pooled bundles (manifest sex_models "pooled"; older bundles: per sex) hold one set per kind, sex "all"
    model_sexes = ["all"] if manifest.get("sex_models") == "pooled" else manifest["sexes"]
    missing = [f"{k}-{s}" for k in manifest["kinds"] for s in model_sexes if (k, s) not in models]
    if missing:
        raise BundleError(f"bundle {uri} has no fold models for {', '.join(missing)}")
    for name in ("ensemble.json", "config.yaml", "training.json"):
        if name not in data:
            raise BundleError(f"bundle {uri}: {name} is not in the manifest's file list")
    ensemble = json.loads(data["ensemble.json"])
    config = yaml.safe_load(data["config.yaml"]) or {}
    training = json.loads(data["training.json"])
    measured = read_measured(uri, sha256, storage_options)
    if measured:
        manifest.setdefault("accuracy", {}).update(measured.get("accuracy") or {})
        training["test"] = measured.get("test")
    return Bundle(uri=uri, manifest=manifest, models=models, keypoint_model=keypoint_model_uri(uri, manifest),
                  ensemble=ensemble, config=config, training=training, sha256=sha256, measured=measured)


def keypoint_model_uri(uri: str, manifest: Mapping[str, Any]) -> str | None:
    """Where the bundle's key point model is (None: the bundle registers with geometric key points)."""
    path = manifest.get("keypoint_model")
    return storage.join_uri(uri, path) if path else None


def keypoint_model_sha256(manifest: Mapping[str, Any]) -> str | None:
    """The manifest's SHA-256 of the key point model, which its loader checks (None: none listed)."""
    listed = {f["path"]: f for f in manifest.get("files", [])}
    return (listed.get(manifest.get("keypoint_model")) or {}).get("sha256")

