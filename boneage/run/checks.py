"""Checks that run before any work: settings and input paths, the embedded data set, and what a stage
needs from an earlier one (the registered table, enough images for k folds). Each failure is a
UserError: one line, exit status 2, before Ray starts."""

from __future__ import annotations

from pathlib import Path

import fsspec

from boneage import config as config_module
from boneage.config import Config
from boneage.data import storage, synth
from boneage.data.images import list_images
from boneage.errors import MissingInput, UserError
from boneage.run.holdout import read_test_ids


def check_config(config: Config, need_data: bool = True, need_labels: bool = True) -> None:
    """Settings and input paths that would fail every trial or image, checked before any work starts.
    The settings' types, ranges and choices are boneage.config's models, validated again here (a stage
    may have assigned one); then, with need_data, the input paths must exist; need_labels: given
    images need labels (to train). A UserError, one line a problem."""
    config_module.check(config)
    if not need_data:
        return
    d = config.data
    for flag, uri in (("--images", d.images), ("--labels", d.labels), ("--keypoints", d.keypoints),
                      ("--keypoint-model", config.keypoints.model), ("--test-images", d.test_images),
                      ("--test-labels", d.test_labels)):
        if uri:
            fs, path = fsspec.core.url_to_fs(uri, **d.storage_options)
            if not fs.exists(path):
                raise MissingInput(f"{flag} {uri} does not exist")
    if need_labels and d.images and not d.labels:
        raise UserError("--images needs --labels (bone age and sex of each image) to train")


def save_config(config: Config) -> None:
    storage.write_bytes(storage.join_uri(config.output, "config.yaml"), config.to_yaml().encode(), config.data.storage_options)


def resolve_data(config: Config) -> Config:
    """With no images given, write the embedded synthetic data set (once) and point the config at it.
    Given images are listed once here, so that a wrong folder fails before Ray starts."""
    if config.data.images:
        if not list_images(config.data.images, storage_options=config.data.storage_options):
            raise UserError(f"no images (.png, .jpg, .jpeg, .dcm, .dicom) found in {config.data.images}")
        return config
    if "://" in config.output:
        raise UserError("the embedded synthetic data set is written locally: give --images, or a local --output")
    folder = Path(config.output) / "synthetic"
    if not (folder / "labels.csv").exists():  # a rerun reuses it: it is deterministic by seed anyway
        print(f"[data] writing {config.data.synthetic_n} synthetic radiographs to {folder}")
        synth.write_dataset(config.data.synthetic_n, folder, seed=config.data.seed,
                            size=tuple(config.data.synthetic_size), workers=1)
    config.data.images = str(folder / "images")
    config.data.labels = str(folder / "labels.csv")
    config.data.keypoints = str(folder / "keypoints.csv")
    return config


def check_registered(config: Config) -> str:
    """The registered table's URI; FileNotFoundError (before Ray starts) when there is none."""
    uri = storage.join_uri(config.output, "registered")
    fs, path = fsspec.core.url_to_fs(uri, **config.data.storage_options)
    if not fs.exists(path) or not fs.glob(path.rstrip("/") + "/*.parquet"):
        raise MissingInput(f"no registered table in {uri}: run `boneage preprocess` (or "
                                "workflows/full_cv.py without --skip-preprocess) on this --output first")
    return uri


def check_folds(config: Config) -> None:
    """A UserError, before Ray starts, when the registered table cannot be dealt into cv.k folds (too few
    labelled images of a sex); an output that already has its folds keeps them (cv.ray_cv checks k)."""
    from boneage.validation import cv
    from boneage.distributed import ray_prepare

    fs, path = fsspec.core.url_to_fs(storage.join_uri(config.output, "cv", "folds.parquet"),
                                     **config.data.storage_options)
    if fs.exists(path):
        return
    table = ray_prepare.read_registered(check_registered(config), config.data.storage_options, with_images=False)
    cv.assign_folds(table[~table["id"].isin(read_test_ids(config))], config.cv.k, config.data.seed)
