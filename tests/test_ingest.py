"""The manifest: every image and every labelled id is a row, problems become per-row errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from boneage.errors import error_code
from boneage.data.ingest import MANIFEST_COLUMNS, UID_COLUMNS, build_manifest

from conftest import REAL_DIR
from test_io import IDENTIFYING, dicom_bytes, hand_like


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
    shutil.copy(REAL_DIR / "1402.png", images / "1402.dcm")  # one id, two files: which one is labelled?
    manifest = build_manifest(str(images), str(labels))
    dup = manifest[manifest.id == "1402"]
    assert len(dup) == 2 and set(dup.error.map(error_code)) == {"duplicate_id"}
    assert (manifest[manifest.id != "1402"].status == "ok").all()


def _pacs_export(root: Path) -> dict[str, bytes]:
    """Two studies that both hold an IM0001 (one extension-less), beside a flat file at the root."""
    pixels = hand_like(dtype=np.uint16, hi=4000)
    files = {"patientA/study1/IM0001.dcm": dicom_bytes(pixels), "patientB/study7/IM0001": dicom_bytes(pixels),
             "1402.png": (REAL_DIR / "1402.png").read_bytes()}
    for path, data in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(data)
    return files


def test_pacs_export_ids_are_relative_paths_and_match_labels(tmp_path):
    _pacs_export(tmp_path / "export")
    labels = tmp_path / "labels.csv"
    labels.write_text("id,boneage,male\n1402.png,24,False\npatientA/study1/IM0001.dcm,100,True\n"
                      "patientB/study7/IM0001,50,False\n")
    manifest = build_manifest(str(tmp_path / "export"), str(labels)).set_index("id")
    assert list(manifest.index) == ["1402", "patientA/study1/IM0001", "patientB/study7/IM0001"]
    assert (manifest.status == "ok").all()  # no duplicate_id: the flat file keeps its stem
    assert manifest.loc["patientA/study1/IM0001", "path"] == "patientA/study1/IM0001.dcm"
    assert manifest.loc["patientA/study1/IM0001", "boneage"] == 100 and manifest.loc["1402", "boneage"] == 24
    # A list's ids are relative to the deepest folder holding all its entries.
    listed = build_manifest([str(tmp_path / "export" / "patientA"), str(tmp_path / "export" / "patientB")])
    assert list(listed.id) == ["patientA", "patientB"]


def test_ids_from_sop_instance_uid_and_uid_columns(tmp_path):
    files = _pacs_export(tmp_path / "export")
    (tmp_path / "export" / "copy.dcm").write_bytes(files["patientA/study1/IM0001.dcm"])  # one image, twice
    manifest = build_manifest(str(tmp_path / "export"), id_from="sop", keep_uids=True)
    assert set(UID_COLUMNS) <= set(manifest.columns)
    sop = manifest.dropna(subset=["SOPInstanceUID"])
    assert (sop.id == sop.SOPInstanceUID).all() and len(sop) == 3 and sop.StudyInstanceUID.notna().all()
    twice = manifest[manifest.path.isin(["copy.dcm", "patientA/study1/IM0001.dcm"])]
    assert set(twice.error.map(error_code)) == {"duplicate_id"}  # the same SOP instance listed twice
    png = manifest[manifest.path == "1402.png"].iloc[0]
    assert png.id == "1402" and png.status == "ok" and pd.isna(png.SOPInstanceUID)  # no UID: its path id
    assert "SOPInstanceUID" not in build_manifest(str(tmp_path / "export")).columns  # off by default


def test_without_labels_every_image_is_ok(tmp_path):
    images, _ = _folder_with_labels(tmp_path, "")
    manifest = build_manifest(str(images))
    assert list(manifest.status) == ["ok"] * 3 and manifest.boneage.isna().all()


def test_patient_groups_from_the_labels_and_from_dicom_patient_id_are_hashed(tmp_path):
    from boneage.data.patients import patient_group

    # A patient column in the labels: every image of one patient shares a hashed group.
    (tmp_path / "png").mkdir()
    images, labels = _folder_with_labels(tmp_path / "png", "id,boneage,male,patient_id\n1402,24,False,MRN-7\n"
                                                           "1563,36,False,MRN-7\n1675,50,True,\n")
    manifest = build_manifest(str(images), str(labels)).set_index("id")
    assert manifest.loc["1402", "group"] == manifest.loc["1563", "group"] == patient_group("MRN-7")
    assert pd.isna(manifest.loc["1675", "group"])  # no patient: the image is its own group
    assert not manifest.astype(str).apply(lambda c: c.str.contains("MRN-7")).any().any()

    # No patient column: a labelled DICOM's PatientID groups it, hashed; a PNG has no group.
    _pacs_export(tmp_path / "export")
    dicom_labels = tmp_path / "dicom_labels.csv"
    dicom_labels.write_text("id,boneage,male\n1402.png,24,False\npatientA/study1/IM0001.dcm,100,False\n"
                            "patientB/study7/IM0001,50,False\n")
    manifest = build_manifest(str(tmp_path / "export"), str(dicom_labels)).set_index("id")
    mrn = IDENTIFYING["PatientID"]
    assert manifest.loc["patientA/study1/IM0001", "group"] == manifest.loc["patientB/study7/IM0001", "group"] \
        == patient_group(mrn) and patient_group(mrn) != mrn
    assert pd.isna(manifest.loc["1402", "group"])
    assert not manifest.astype(str).apply(lambda c: c.str.contains(mrn)).any().any()
    # One PatientID on images of both sexes: a de-identification placeholder, not a patient: no group.
    dicom_labels.write_text(dicom_labels.read_text().replace("50,False", "50,True"))
    manifest = build_manifest(str(tmp_path / "export"), str(dicom_labels))
    assert (manifest.status == "ok").all() and manifest.group.isna().all()
    # Scoring (no labels) reads no header for groups.
    assert build_manifest(str(tmp_path / "export"))["group"].isna().all()


def test_a_patient_labelled_with_both_sexes_is_a_bad_label(tmp_path):
    images, labels = _folder_with_labels(tmp_path, "id,boneage,male,patient\n1402,24,False,p1\n"
                                                   "1563,36,True,p1\n1675,50,True,p2\n")
    manifest = build_manifest(str(images), str(labels)).set_index("id")
    assert manifest.loc["1402", "error"].startswith("bad_label: patient group g")
    assert manifest.loc["1563", "status"] == "error" and manifest.loc["1675", "status"] == "ok"
    assert "p1" not in manifest.loc["1402", "error"].split("group ")[1]
