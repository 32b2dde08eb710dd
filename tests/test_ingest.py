"""The manifest: every image and every labelled id is a row, problems become per-row errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

from boneage.errors import error_code
from boneage.ingest import MANIFEST_COLUMNS, build_manifest

from conftest import REAL_DIR


def _folder_with_labels(tmp_path: Path, label_text: str) -> tuple[Path, Path]:
    images = tmp_path / "images"
    images.mkdir()
    for name in ("1402.png", "1563.png", "1675.png"):
        shutil.copy(REAL_DIR / name, images / name)
    labels = tmp_path / "labels.csv"
    labels.write_text(label_text)
    return images, labels


def test_join_labels_and_report_every_problem(tmp_path):
    images, labels = _folder_with_labels(tmp_path, "id,boneage,male\n1402,24,False\n1563,300,False\n9999,50,True\n")
    manifest = build_manifest(str(images), str(labels))
    assert tuple(manifest.columns) == MANIFEST_COLUMNS
    by_id = manifest.set_index("id")
    assert by_id.loc["1402", "status"] == "ok" and by_id.loc["1402", "boneage"] == 24 and not by_id.loc["1402", "male"]
    assert error_code(by_id.loc["1563", "error"]) == "bad_label"  # 300 months is outside 0-240
    assert error_code(by_id.loc["1675", "error"]) == "label_missing"  # image without a label row
    assert error_code(by_id.loc["9999", "error"]) == "missing_file"  # label row without an image
    assert pd.isna(by_id.loc["9999", "uri"])
    assert len(manifest) == 4


def test_two_images_with_one_id_are_both_errors(tmp_path):
    images, labels = _folder_with_labels(tmp_path, "id,boneage,male\n1402,24,False\n1563,192,False\n1675,96,True\n")
    (images / "sub").mkdir()
    shutil.copy(REAL_DIR / "1402.png", images / "sub" / "1402.png")
    manifest = build_manifest(str(images), str(labels))
    dup = manifest[manifest.id == "1402"]
    assert len(dup) == 2 and set(dup.error.map(error_code)) == {"duplicate_id"}
    assert (manifest[manifest.id != "1402"].status == "ok").all()


def test_without_labels_every_image_is_ok(tmp_path):
    images, _ = _folder_with_labels(tmp_path, "")
    manifest = build_manifest(str(images))
    assert list(manifest.status) == ["ok"] * 3 and manifest.boneage.isna().all()
