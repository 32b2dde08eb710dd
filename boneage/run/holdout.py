"""The locked test split: set aside before anything is fit (OUTPUT/test/split.csv), never seen by any
stage, and scored once at the end by the finished bundle through `boneage score`'s code path."""

from __future__ import annotations

import json
import time
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from boneage.config import Config
from boneage.data import ingest, storage
from boneage.errors import STATUS_OK, UserError
from boneage.run.scoring import score


def test_split_uri(config: Config) -> str:
    return storage.join_uri(config.output, "test", "split.csv")


def split_test(config: Config) -> pd.DataFrame:
    """The locked test split, set aside before anything is fit: OUTPUT/test/split.csv (id, uri, male,
    boneage, source). config.data.test_images + test_labels: that test set; else test_fraction of the
    labelled images, stratified by sex and age and fixed by seed (none when 0). A rerun keeps the split
    it finds, so that no image ever moves between test and training."""
    from boneage.validation import cv

    options, uri = config.data.storage_options, test_split_uri(config)
    split = read_test_split(config)
    if split is not None:
        print(f"[test] keeping the locked test split of {len(split)} images in {uri}")
        return split
    if config.data.test_images:
        if not config.data.test_labels:
            raise UserError("--test-images needs --test-labels (the test set's bone ages and sexes)")
        manifest = ingest.build_manifest(config.data.test_images, config.data.test_labels, options)
        split = manifest[manifest.status == STATUS_OK].assign(source="test_images")
        if len(manifest) > len(split):
            print(f"[test] {len(manifest) - len(split)} test items unusable, e.g. "
                  f"{manifest[manifest.status != STATUS_OK].error.iloc[0]}")
    else:
        manifest = ingest.build_manifest(config.data.images, config.data.labels, options)
        manifest = manifest[cv.labelled(manifest)].reset_index(drop=True)
        split = manifest.iloc[pick_test_rows(manifest, config.data.test_fraction, config.data.seed + 1)]
        split = split.assign(source="test_fraction")
    split = split[["id", "uri", "male", "boneage", "source"]].reset_index(drop=True)
    with storage.open_output(uri, "wb", options) as f:
        split.to_csv(f, index=False)
    print(f"[test] {len(split)} images locked away as the test split ({int((~split.male.astype(bool)).sum())} F, "
          f"{int(split.male.astype(bool).sum())} M; {split.source.iloc[0] if len(split) else 'none'}) → {uri}")
    return split


def pick_test_rows(manifest: pd.DataFrame, fraction: float, seed: int) -> np.ndarray:
    """Positions of the test split's rows among the labelled manifest rows: `fraction` of each sex's
    patients (cv.grouped_inner_split: all images of a child on one side; without a patient column each
    image is its own patient, as before), stratified by age, fixed by seed."""
    from boneage.validation import cv

    picks = []
    for male in (False, True):
        rows = np.flatnonzero(manifest["male"].to_numpy(bool) == male)
        picks.append(cv.grouped_inner_split(manifest, rows, fraction, seed)[1])
    return np.sort(np.concatenate(picks))


def read_test_split(config: Config) -> pd.DataFrame | None:
    """OUTPUT/test/split.csv, or None when the run has none."""
    fs, path = fsspec.core.url_to_fs(test_split_uri(config), **config.data.storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return pd.read_csv(f, dtype={"id": str})


def read_test_ids(config: Config) -> set[str]:
    """The ids of the locked test split (empty when the run has none)."""
    split = read_test_split(config)
    return set() if split is None else set(split["id"])


def evaluations_uri(config: Config) -> str:
    return storage.join_uri(config.output, "test", "evaluations.jsonl")


def record_evaluation(config: Config, bundle_sha256: str, result: dict[str, Any]) -> dict[str, Any]:
    """Append one line to OUTPUT/test/evaluations.jsonl: every scoring of the locked test split (bundle
    hash, UTC time, n, MAE). A split scored more than once is a clean estimate only for the first
    bundle: anything changed after seeing its number was chosen on it."""
    record = {"bundle_sha256": bundle_sha256, "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "images": result["images"], "n": result["scored"], "mae": result["accuracy"]["all"].get("mae")}
    uri, options = evaluations_uri(config), config.data.storage_options
    earlier = storage.read_bytes(uri, options) if _exists(uri, options) else b""
    if earlier and not earlier.endswith(b"\n"):
        earlier += b"\n"
    # Read and written whole: s3:// has no append; the file is one line per evaluation.
    storage.write_bytes(uri, earlier + json.dumps(record).encode() + b"\n", options)
    return record


def read_evaluations(config: Config) -> list[dict[str, Any]]:
    """Every recorded scoring of the locked test split, oldest first ([] when none)."""
    uri, options = evaluations_uri(config), config.data.storage_options
    if not _exists(uri, options):
        return []
    return [json.loads(line) for line in storage.read_bytes(uri, options).decode().splitlines() if line.strip()]


def _exists(uri: str, options) -> bool:
    fs, path = fsspec.core.url_to_fs(uri, **dict(options or {}))
    return fs.exists(path)


def evaluate_test(config: Config, bundle_uri: str, n_boot: int = 2000) -> dict[str, Any] | None:
    """Score the locked test split with the finished bundle through `boneage score`'s code path
    (the bundle's models: fold-averaged, or the refits; ensemble, QA); OUTPUT/test/predictions.parquet
    and metrics.json; the accuracy goes beside the bundle (BUNDLE/measured.json, outside its hash) and the evaluation is
    appended to OUTPUT/test/evaluations.jsonl. Nothing here is fitted on the split: the bundle is
    complete before it is scored. None without a test split."""
    from boneage import bundle
    from boneage.validation import metrics

    options = config.data.storage_options
    split = read_test_split(config)
    if split is None:
        return None
    if not len(split):
        print("[test] no test split (test_fraction 0 and no --test-images): no locked-test accuracy")
        return None
    subjects = storage.join_uri(config.output, "test", "subjects.csv")
    with storage.open_output(subjects, "wb", options) as f:
        split[["id", "male"]].to_csv(f, index=False)
    bundle_sha256 = bundle.manifest_sha256(bundle_uri, options)  # the bundle measured; checked again on record
    table = score(split["uri"].tolist(), bundle_uri, storage.join_uri(config.output, "test", "predictions.parquet"),
                  subjects=subjects, storage_options=options, resume=False)  # the bundle may be new: afresh
    scored = split.merge(table[["id", "status", "error", "boneage_months", "boneage_lower_months",
                                "boneage_upper_months"]], on="id", how="left")
    ok = scored["status"] == STATUS_OK
    manifest = bundle.read_manifest(bundle_uri, options)
    acc = metrics.accuracy_report(scored.loc[ok, "boneage_months"], scored.loc[ok, "boneage"],
                                  scored.loc[ok, "male"].astype(bool), n_boot=n_boot, seed=config.data.seed)
    result = {"images": int(len(split)), "scored": int(ok.sum()), "source": str(split["source"].iloc[0]),
              "bootstrap_resamples": n_boot, "failed": [{"id": r.id, "error": r.error} for r in scored[~ok].itertuples()],
              "accuracy": acc, "bundle_sha256": bundle_sha256,
              # which bone age models scored it: the fold models' mean, or one refit per kind (cv.ship)
              "ship": manifest.get("ship", "folds"),
              "interval": interval_coverage(scored[ok], storage.read_json(storage.join_uri(
                  bundle_uri, manifest.get("training", "training.json")), options))}
    storage.write_bytes(storage.join_uri(config.output, "test", "metrics.json"), json.dumps(result, indent=2).encode(), options)
    bundle.add_test_accuracy(bundle_uri, result, bundle_sha256, options)  # the interval's coverage goes with it
    record_evaluation(config, bundle_sha256, result)
    times = len(read_evaluations(config))
    print(f"[test] the shipped bundle on the locked test split ({result['scored']}/{result['images']} scored): "
          f"{metrics.describe(acc['all'])}" + (f"; the split has now been scored {times} times" if times > 1 else ""))
    if result["interval"].get("all", {}).get("n"):
        i = result["interval"]
        print(f"[test] its {i['level']:.0%} bone age interval ({i['method']}) covered {i['all']['coverage']:.1%} of "
              f"{i['all']['n']} images, mean width {i['all']['mean_width']:.1f} months")
    return result


def interval_coverage(scored: pd.DataFrame, training: dict[str, Any]) -> dict[str, Any]:
    """The bone age interval's coverage and mean width on the scored test rows (boneage, male,
    boneage_lower/upper_months): overall, by sex and by age band, with counts; {"error"} when the bundle
    has no interval calibration."""
    from boneage.validation import intervals

    calibration = intervals.calibration_of(training)
    if calibration is None:
        return {"error": ((training or {}).get("interval") or {}).get("error", "the bundle has no interval calibration")}
    return {"method": calibration["method"], **intervals.coverage_report(
        scored["boneage_lower_months"], scored["boneage_upper_months"], scored["boneage"],
        scored["male"].astype(bool), calibration["level"])}
