"""The `boneage` command as a user meets it: help, synthetic data, clear errors for bad arguments."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from boneage.cli import main


def test_help_lists_the_commands(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "synth" in out and "preprocess" in out


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "boneage.cli", "preprocess", "--help"],
                            capture_output=True, text=True, check=True)
    assert "--images" in result.stdout and "--keypoint-source" in result.stdout


def test_synth_writes_images_labels_and_keypoints(tmp_path, capsys):
    assert main(["synth", "--n", "3", "--out", str(tmp_path), "--size", "256x192", "--masks"]) == 0
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["1.png", "2.png", "3.png"]
    assert len(list((tmp_path / "masks").iterdir())) == 3
    with open(tmp_path / "labels.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == ["1", "2", "3"] and set(rows[0]) == {"id", "boneage", "male"}
    with open(tmp_path / "keypoints.csv") as f:
        assert next(csv.reader(f)) == ["id", "finger_tip_x", "finger_tip_y", "capitate_x", "capitate_y",
                                       "thumb_tip_x", "thumb_tip_y"]


def test_bad_size_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["synth", "--n", "1", "--out", "x", "--size", "big"])
    assert exit_info.value.code == 2
    assert "HEIGHTxWIDTH" in capsys.readouterr().err


def test_missing_image_folder_is_a_message_not_a_traceback(tmp_path, capsys):
    assert main(["preprocess", "--images", str(tmp_path / "nowhere"), "--output", str(tmp_path / "run")]) == 2
    assert f"--images {tmp_path / 'nowhere'} does not exist" in capsys.readouterr().err


def test_empty_image_folder_is_a_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["preprocess", "--images", str(tmp_path / "empty"), "--output", str(tmp_path / "run")]) == 2
    assert "no images" in capsys.readouterr().err


def test_saved_config_never_holds_credentials():
    from boneage.config import load_config

    config = load_config(overrides={"data": {"storage_options": {
        "key": "AKIAEXAMPLE", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"}}}})
    text = config.to_yaml()
    assert "AKIAEXAMPLE" not in text and "s3cr3t" not in text
    assert "http://127.0.0.1:9" in text and config.data.storage_options["secret"] == "s3cr3t"


def test_local_paths_are_resolved_against_the_working_directory(tmp_path, monkeypatch):
    from boneage.cli import add_cv_args, add_run_args, add_test_args, config_from_args
    import argparse

    parser = argparse.ArgumentParser()
    add_run_args(parser)
    add_cv_args(parser)
    add_test_args(parser)
    monkeypatch.chdir(tmp_path)
    config = config_from_args(parser.parse_args([
        "--images", "data/images", "--labels", "../labels.csv", "--keypoints", "~/kp.csv",
        "--keypoint-model", "s3://bucket/kp.pt", "--test-images", "test", "--test-labels", "test.csv",
        "--output", "runs/x"]))
    assert config.output == str(tmp_path / "runs" / "x")
    assert config.data.images == str(tmp_path / "data" / "images")
    assert config.data.labels == str(tmp_path.parent / "labels.csv")
    assert config.data.keypoints == str(Path("~/kp.csv").expanduser())
    assert config.keypoints.model == "s3://bucket/kp.pt"  # URIs as they are
    assert config.data.test_images == str(tmp_path / "test") and config.data.test_labels == str(tmp_path / "test.csv")
    default = config_from_args(parser.parse_args([]))
    assert default.output == str(tmp_path / "runs" / "embedded") and default.data.images is None


def test_the_locked_test_split_is_stratified_fixed_and_kept(tmp_path):
    from boneage import run
    from boneage.data import synth
    from boneage.config import load_config

    data = synth.write_dataset(60, tmp_path / "synthetic", seed=2, size=(128, 96), progress=False)
    config = load_config(overrides={"data": {"images": str(data["images"]), "labels": str(data["labels"]),
                                             "test_fraction": 0.2}, "output": str(tmp_path / "run")})
    split = run.split_test(config)
    labels = pd.read_csv(data["labels"], dtype={"id": str})
    assert 10 <= len(split) <= 14 and split.id.is_unique and set(split.id) <= set(labels.id)
    assert split.male.sum() >= 4 and (~split.male.astype(bool)).sum() >= 4  # both sexes
    assert split.boneage.min() < labels.boneage.quantile(0.3) and split.boneage.max() > labels.boneage.quantile(0.7)
    assert run.read_test_ids(config) == set(split.id)
    other = load_config(overrides={"data": {"images": str(data["images"]), "labels": str(data["labels"]),
                                            "test_fraction": 0.2}, "output": str(tmp_path / "again")})
    pd.testing.assert_frame_equal(run.split_test(other), split)  # fixed by seed
    config.data.test_fraction = 0.4  # a rerun keeps the split it finds: no image changes sides
    pd.testing.assert_frame_equal(run.split_test(config), split)


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
    from boneage.cli import user_errors
    from boneage.errors import MissingInput

    def bad_input():
        raise MissingInput("no such folder or prefix: scans/")

    def bug():
        return {}["missing"]  # an internal error: must not pass for a user's mistake

    assert user_errors("boneage score")(bad_input)() == 2
    assert capsys.readouterr().err == "boneage score: error: no such folder or prefix: scans/\n"
    with pytest.raises(KeyError):
        user_errors("boneage score")(bug)()
    with pytest.raises(ValueError):  # a plain ValueError from inside is a bug too
        user_errors("boneage score")(lambda: int("x"))()


def test_bad_config_key_is_a_message(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("cv:\n  foldz: 3\n")
    assert main(["cv", "--config", str(config), "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"boneage cv: error: cv.foldz=3 ({config}): unknown setting; known: k, kinds, ")
    assert len(err.splitlines()) == 1


def test_more_folds_than_images_is_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    """k larger than a sex's labelled images is the user's setting: exit status 2 and one line naming
    it, found from the registered table before Ray starts or anything is trained."""
    from boneage.distributed import ray_env

    def no_ray(*args, **kwargs):  # whether or not this test session has a Ray up already
        raise AssertionError("boneage cv started Ray before checking its folds")

    monkeypatch.setattr(ray_env, "init_ray", no_ray)
    registered = tmp_path / "run" / "registered"
    registered.mkdir(parents=True)
    pd.DataFrame({"id": [f"{i}" for i in range(9)], "status": "ok", "boneage": [60.0 + 10 * i for i in range(9)],
                  "male": [True] * 6 + [False] * 3}).to_parquet(registered / "part-0.parquet")
    assert main(["cv", "--folds", "5", "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == "boneage cv: error: 3 labelled F images cannot fill 5 folds: need at least 5\n"
    assert not (tmp_path / "run" / "cv").exists()


def test_version_names_boneage_ray_torch_python_and_the_bundle_format_without_starting_ray():
    import platform
    import tomllib

    import boneage
    from boneage.bundle import BUNDLE_VERSION

    # The real command, as installed: fast, and Ray is neither started nor imported.
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "boneage.cli", "--version"],
                            capture_output=True, text=True, check=True, timeout=60)
    lines = result.stdout.splitlines()
    assert lines == [f"boneage {boneage.__version__}", "ray 2.60.0", f"torch {lines[2].split()[1]}",
                     f"python {platform.python_version()}", f"bundle format {BUNDLE_VERSION} (boneage-bundle)"]
    assert lines[2].startswith("torch 2.13.0"), lines
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines() if "|" in line}
    assert "ray" not in imported and "torch" not in imported, "--version imports Ray or torch"
    # One version: pyproject.toml reads it from boneage.__version__ (setuptools, statically)
    pyproject = tomllib.loads(Path(__file__).resolve().parents[1].joinpath("pyproject.toml").read_text())
    assert "version" not in pyproject["project"] and "version" in pyproject["project"]["dynamic"]
    assert pyproject["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "boneage.__version__"}
