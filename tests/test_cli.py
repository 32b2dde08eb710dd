"""The `boneage` command as a user meets it: help, synthetic data, clear errors for bad arguments."""

from __future__ import annotations

import csv
import subprocess
import sys

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
    assert "no such folder" in capsys.readouterr().err


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
