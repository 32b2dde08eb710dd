"""boneage.clinical.dicom_out: a scored row as a DICOM Structured Report and its card as a Secondary
Capture, validated by dciodvfy (dicom3tools) and read back by highdicom."""

from __future__ import annotations

import io
import subprocess

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from boneage.clinical import dicom_out

from system_tools import program_or_skip

BUNDLE = "ab" * 32  # a bundle manifest's SHA-256
DX_CLASS = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def source_dicom(seed: int = 0) -> pydicom.Dataset:
    """An uncompressed MONOCHROME2 DX hand-like image with patient and study tags, as a PACS holds it."""
    rng = np.random.default_rng(seed)
    pixels = np.zeros((256, 200), np.uint16)
    pixels[40:230, 50:150] = 2000 + rng.integers(0, 500, (190, 100))  # a bright "hand" on a dark field
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DX_CLASS
    ds.SOPClassUID = DX_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["sop", str(seed)])
    ds.StudyInstanceUID = generate_uid(entropy_srcs=["study", str(seed)])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["series", str(seed)])
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Doe^Jane", "P0001", "20150301", "F"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20230601", "101500", "S1", "A123"
    ds.ReferringPhysicianName = "Who^Ever"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "DX", 1, 1
    ds.BodyPartExamined, ds.Laterality = "HAND", "L"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.tobytes()
    return ds


def scored_row(**changes) -> dict:
    """A scoring row (boneage.score.OUTPUT_COLUMNS' names) of an accepted, normal bone age."""
    row = {"id": "patientA/IM0001", "status": "ok", "error": None, "sex": "F", "sex_source": "dicom",
           "boneage_months": 98.4, "boneage_lower_months": 85.1, "boneage_upper_months": 111.7,
           "chronological_age_months": 99.0, "boneage_sds": -0.05, "boneage_sds_lower": -1.2,
           "boneage_sds_upper": 1.1, "reference_sd_months": 11.5, "boneage_interpretation": "normal",
           "sds_note": None, "accepted": True, "reject_reason": None}
    return {**row, **changes}


def card() -> np.ndarray:
    rgb = np.zeros((120, 160, 3), np.uint8)
    rgb[..., 0], rgb[20:60, 30:90, 1] = 200, 255
    return rgb


def dciodvfy(path) -> tuple[list[str], list[str]]:
    """(errors, warnings): dciodvfy's lines that start with Error / Warning (it exits 0 either way)."""
    program = program_or_skip(("dciodvfy",), "dciodvfy", "BONEAGE_REQUIRE_DCIODVFY",
                              "Debian/Ubuntu: apt-get install dicom3tools", "to validate the DICOM output")
    done = subprocess.run([program, str(path)], capture_output=True, text=True, timeout=60)
    lines = (done.stdout + done.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def written(result, tmp_path):
    sr, sc = tmp_path / "sr.dcm", tmp_path / "card.dcm"
    result.sr.save_as(sr, enforce_file_format=True)
    result.sc.save_as(sc, enforce_file_format=True)
    return sr, sc


@pytest.mark.parametrize("sparse", [False, True])
def test_sr_and_sc_are_valid_dicom(tmp_path, sparse):
    source = source_dicom()
    if sparse:  # many real headers lack type 2 attributes, and do not say which hand
        for keyword in ("Laterality", "StudyID", "AccessionNumber", "ReferringPhysicianName", "PatientBirthDate",
                        "StudyTime", "PatientName"):
            delattr(source, keyword)
    result = dicom_out.build(scored_row(), source, card(), BUNDLE, "3", interval_level=0.9)
    assert result.reason is None
    for path in written(result, tmp_path):
        errors, warnings = dciodvfy(path)
        print(path.name, *warnings, sep="\n  ")
        assert errors == [], (path.name, errors)


def _numbers(sr, code_value: str, scheme: str) -> list[float]:
    """The numeric values of every measurement named (code_value, scheme) in the SR, found by highdicom."""
    from pydicom.sr.coding import Code

    group = sr.content.get_image_measurement_groups()[0]
    return [float(m.value) for m in group.get_measurements(name=Code(code_value, scheme, "x"))]


def test_highdicom_reads_the_sr_back_to_the_row(tmp_path):
    import highdicom as hd

    row = scored_row(boneage_interpretation="uncertain", accepted=False, boneage_sds=-1.9,
                     reject_reason="registration_doubtful;zone_models_disagree", sex=None, sex_source="unknown")
    result = dicom_out.build(row, source_dicom(), card(), BUNDLE, "3")
    sr_path, _ = written(result, tmp_path)
    sr = hd.sr.srread(sr_path)
    # By the codes themselves (LOINC bone age, the private interval and SDS items), not through the module:
    assert _numbers(sr, "85151-9", "LN") == [row["boneage_months"]]
    assert _numbers(sr, "BA-PI-LOWER", "99BONEAGE") == [row["boneage_lower_months"]]
    assert _numbers(sr, "BA-PI-UPPER", "99BONEAGE") == [row["boneage_upper_months"]]
    assert _numbers(sr, "BA-SDS", "99BONEAGE") == [row["boneage_sds"]]
    back = dicom_out.read_report(pydicom.dcmread(sr_path))
    for column in ("boneage_months", "boneage_lower_months", "boneage_upper_months", "boneage_sds",
                   "boneage_sds_lower", "boneage_sds_upper", "chronological_age_months", "reference_sd_months",
                   "boneage_interpretation", "accepted", "reject_reason", "sex", "sex_source"):
        assert back[column] == row[column], column
    assert back["source_sop_instance_uid"] == source_dicom().SOPInstanceUID


@pytest.mark.parametrize("verdict", ["delayed", "normal", "advanced", "uncertain"])
def test_every_verdict_reads_back(verdict):
    result = dicom_out.build(scored_row(boneage_interpretation=verdict), source_dicom(), card(), BUNDLE)
    assert dicom_out.read_report(result.sr)["boneage_interpretation"] == verdict


def test_a_row_without_interval_or_sds_leaves_those_items_out():
    row = scored_row(boneage_lower_months=float("nan"), boneage_upper_months=None, boneage_sds=None,
                     boneage_sds_lower=None, boneage_sds_upper=None, boneage_interpretation=None,
                     chronological_age_months=None, reference_sd_months=None, sds_note="age_unknown")
    back = dicom_out.read_report(dicom_out.build(row, source_dicom(), card(), BUNDLE, interval_level=0.9).sr)
    assert back["boneage_months"] == row["boneage_months"]
    assert all(back[c] is None for c in ("boneage_lower_months", "boneage_upper_months", "boneage_sds",
                                         "boneage_interpretation", "chronological_age_months"))


def test_patient_and_study_come_from_the_source_in_a_new_series():
    source = source_dicom()
    result = dicom_out.build(scored_row(), source, card(), BUNDLE)
    for made in (result.sr, result.sc):
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
                        "StudyDate", "AccessionNumber"):
            assert str(made[keyword].value) == str(source[keyword].value), keyword
        assert made.SeriesInstanceUID != source.SeriesInstanceUID
    assert result.sr.SeriesInstanceUID == result.sc.SeriesInstanceUID
    assert result.sc.PhotometricInterpretation == "RGB" and result.sc.SamplesPerPixel == 3
    assert np.array_equal(result.sc.pixel_array, card())
    assert result.sc.PatientOrientation == ""  # a card is a figure: no patient direction is claimed


def test_uids_are_deterministic_per_source_and_bundle():
    source, other = source_dicom(0), source_dicom(1)
    first = dicom_out.build(scored_row(), source, card(), BUNDLE)
    again = dicom_out.build(scored_row(boneage_months=70.0), source, card(), BUNDLE)  # a rerun, new numbers
    rebundled = dicom_out.build(scored_row(), source, card(), "cd" * 32)
    elsewhere = dicom_out.build(scored_row(), other, card(), BUNDLE)

    def ids(r):
        return (r.sr.SeriesInstanceUID, r.sr.SOPInstanceUID, r.sc.SOPInstanceUID)
    assert ids(first) == ids(again)
    assert len(set(ids(first))) == 3
    assert not set(ids(first)) & set(ids(rebundled)) and not set(ids(first)) & set(ids(elsewhere))
    assert first.sr_uid == first.sr.SOPInstanceUID


def test_png_card_bytes_give_the_same_pixels():
    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(card()).convert("RGBA").save(png, format="PNG")
    result = dicom_out.build(scored_row(), source_dicom(), png.getvalue(), BUNDLE)
    assert np.array_equal(result.sc.pixel_array, card())


@pytest.mark.parametrize("row, source, card_given, why", [
    (scored_row(), None, True, "not_dicom: "),
    (scored_row(status="error", error="not_a_hand: ...", boneage_months=None), "dicom", True, "error_row: "),
    (scored_row(boneage_months=float("nan")), "dicom", True, "no_boneage: "),
    (scored_row(), "dicom", False, "no_card: "),
    (scored_row(boneage_interpretation="weird"), "dicom", True, "unknown boneage_interpretation"),
])
def test_rows_that_cannot_give_dicom_say_why(row, source, card_given, why):
    result = dicom_out.build(row, source_dicom() if source else None, card() if card_given else None, BUNDLE)
    assert result.sr is None and result.sc is None and result.sr_uid is None
    assert why in result.reason


def test_a_source_without_uids_says_which():
    source = source_dicom()
    del source.StudyInstanceUID
    result = dicom_out.build(scored_row(), source, card(), BUNDLE)
    assert result.sr is None and "lacks StudyInstanceUID" in result.reason


def test_a_bad_card_is_a_reason_not_a_crash():
    result = dicom_out.build(scored_row(), source_dicom(), np.zeros((10, 10), np.uint8), BUNDLE)
    assert result.sr is None and "a card must be (H, W, 3) uint8 RGB" in result.reason


def test_write_outputs_writes_dicom_rows_and_says_why_for_the_others(tmp_path):
    """The --dicom-out writer without Ray: the header is read again from the file; a PNG row, an error
    row, a row without a card and an unsafe id get a reason each, and the batch goes on."""
    import pandas as pd

    source = source_dicom()
    source.save_as(tmp_path / "scan.dcm", enforce_file_format=True)
    long_header = source_dicom(1)  # a header longer than dicom.HEADER_BYTES: read from the whole file
    long_header.private_block(0x0021, "boneage test", create=True).add_new(0x01, "OB", bytes(70_000))
    long_header.save_as(tmp_path / "long.dcm", enforce_file_format=True)
    rows = [scored_row(id="a/scan", uri=str(tmp_path / "scan.dcm"), format="dicom"),
            scored_row(id="long", uri=str(tmp_path / "long.dcm"), format="dicom"),
            scored_row(id="plain", uri=str(tmp_path / "plain.png"), format="png"),
            scored_row(id="bad", uri=str(tmp_path / "bad.dcm"), format="dicom", status="error",
                       error="bad_dicom: x", boneage_months=None),
            scored_row(id="nocard", uri=str(tmp_path / "scan.dcm"), format="dicom"),
            scored_row(id="../escape", uri=str(tmp_path / "scan.dcm"), format="dicom")]
    cards = [card(), card(), card(), None, None, card()]
    out = tmp_path / "out"
    card_errors = [None, None, None, "no card: the image has no bone age", "card failed: boom", None]
    sr_uids, reasons = dicom_out.write_outputs(pd.DataFrame(rows), cards, str(out), BUNDLE, "3", 0.9,
                                               card_errors=card_errors)
    assert [r.split(":")[0] if r else None for r in reasons] == [None, None, "not_dicom", "error_row", "no_card",
                                                                  "failed"]
    assert "not a safe relative file name" in reasons[5] and reasons[4].endswith(": card failed: boom")
    assert sr_uids[0] == dicom_out.uids(source.SOPInstanceUID, BUNDLE)["sr"] and sr_uids[2:] == [None] * 4
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "a/scan/card.dcm", "a/scan/sr.dcm", "long/card.dcm", "long/sr.dcm"]
    assert not (tmp_path / "escape").exists()
    made = pydicom.dcmread(out / "long" / "sr.dcm")
    assert made.StudyInstanceUID == long_header.StudyInstanceUID and made.SOPInstanceUID == sr_uids[1]
    assert dicom_out.read_report(pydicom.dcmread(out / "a" / "scan" / "sr.dcm"))["boneage_months"] == 98.4


def test_the_run_summary_counts_dicom_output_and_why_not():
    import pandas as pd

    from boneage.run.scoring import dicom_summary

    table = pd.DataFrame({"dicom_sr_uid": ["2.25.1", None, None, None],
                          "dicom_error": [None, "not_dicom: x", "not_dicom: y", "error_row: z"]})
    assert dicom_summary(table, "out") == ("[score] DICOM output: 1/4 rows have an SR and a card SC in out; "
                                           "none for 3: 2 not_dicom; 1 error_row")


@pytest.mark.slow
def test_boneage_score_dicom_out(tmp_path, ray_local, synthetic_small, capsys):
    """Two DICOM radiographs (one nested: its id has a "/") and a PNG through `boneage score --dicom-out`:
    an SR and a card SC per DICOM row, valid, read back to its parquet row; the PNG's row says why not."""
    import shutil
    from pathlib import Path

    import pandas as pd
    from PIL import Image

    from boneage import cli, score
    from conftest import REAL_DIR
    from test_io import dicom_bytes
    from tiny_bundle import KINDS, write_tiny_bundle

    images = tmp_path / "images"
    (images / "patientA").mkdir(parents=True)
    for name, target in (("1675.png", images / "scan.dcm"), ("1563.png", images / "patientA" / "IM0001.dcm")):
        pixels = np.asarray(Image.open(REAL_DIR / name).convert("L"), np.uint16) * 16
        target.write_bytes(dicom_bytes(pixels, sex="M", birth="20100115", study="20200715"))
    shutil.copy(sorted(Path(synthetic_small["images"]).glob("*.png"))[0], images / "plain.png")
    bundle, out, folder = tmp_path / "bundle", tmp_path / "predictions.parquet", tmp_path / "dicom"
    write_tiny_bundle(str(bundle))

    assert cli.main(["score", str(images), "--bundle", str(bundle), "--out", str(out), "--dicom-out", str(folder),
                     "--batch-size", "2"]) == 0
    assert "DICOM output: 2/3 rows have an SR and a card SC" in capsys.readouterr().out
    table = pd.read_parquet(out)
    assert list(table.columns) == score.output_schema(list(KINDS), dicom=True).names
    rows = table.set_index("id")
    assert rows.loc["plain", "dicom_error"].startswith("not_dicom: ") and pd.isna(rows.loc["plain", "dicom_sr_uid"])
    written = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    assert written == ["patientA/IM0001/card.dcm", "patientA/IM0001/sr.dcm", "scan/card.dcm", "scan/sr.dcm"]
    for rid in ("scan", "patientA/IM0001"):
        row = rows.loc[rid]
        assert row.status == "ok" and pd.isna(row.dicom_error)
        source = pydicom.dcmread(images / f"{rid}.dcm", stop_before_pixels=True)
        for name in ("sr.dcm", "card.dcm"):
            errors, _ = dciodvfy(folder / rid / name)
            assert errors == [], (rid, name, errors)
            made = pydicom.dcmread(folder / rid / name)
            assert made.StudyInstanceUID == source.StudyInstanceUID and made.PatientID == source.PatientID
        back = dicom_out.read_report(pydicom.dcmread(folder / rid / "sr.dcm"))
        assert pydicom.dcmread(folder / rid / "sr.dcm").SOPInstanceUID == row.dicom_sr_uid
        assert back["source_sop_instance_uid"] == source.SOPInstanceUID
        for column in ("boneage_months", "boneage_lower_months", "boneage_upper_months", "boneage_sds",
                       "chronological_age_months"):
            expected = row[column]
            assert (back[column] is None) if pd.isna(expected) else back[column] == pytest.approx(expected, rel=1e-9)
        for column in ("boneage_interpretation", "reject_reason", "sex", "sex_source"):
            assert back[column] == (None if pd.isna(row[column]) else row[column]), column
        assert back["accepted"] == bool(row.accepted)
        sc = pydicom.dcmread(folder / rid / "card.dcm")
        assert sc.PhotometricInterpretation == "RGB" and sc.pixel_array.std() > 10  # the drawn card


def _client(server, auth=None):
    import requests
    from dicomweb_client.api import DICOMwebClient

    session = requests.Session()
    session.auth = auth or server["auth"]
    return DICOMwebClient(url=server["url"], session=session)


def test_orthanc_files_the_sr_and_card_into_the_study_and_a_rerun_replaces(orthanc):
    """A real PACS takes the objects (STOW-RS), files them as a new series of the radiograph's study,
    serves the SR back (WADO-RS) to the row's numbers, and a rerun's objects (same UIDs) add nothing."""
    import requests

    source = source_dicom(7)
    client = _client(orthanc)
    client.store_instances([source])
    first = dicom_out.build(scored_row(), source, card(), BUNDLE, "3", 0.9)
    client.store_instances([first.sr, first.sc])
    series = client.search_for_series(source.StudyInstanceUID)
    assert len(series) == 2  # the radiograph's and the result's
    result = client.search_for_instances(source.StudyInstanceUID, first.sr.SeriesInstanceUID)
    classes = sorted(pydicom.Dataset.from_json(i).SOPClassUID for i in result)
    assert classes == sorted([first.sr.SOPClassUID, first.sc.SOPClassUID])
    back = client.retrieve_instance(source.StudyInstanceUID, first.sr.SeriesInstanceUID, first.sr.SOPInstanceUID)
    assert dicom_out.read_report(back)["boneage_months"] == scored_row()["boneage_months"]
    assert str(back.PatientID) == str(source.PatientID)

    again = dicom_out.build(scored_row(), source, card(), BUNDLE, "3", 0.9)  # a rerun
    client.store_instances([again.sr, again.sc])
    assert len(client.search_for_instances(source.StudyInstanceUID, first.sr.SeriesInstanceUID)) == 2
    assert len(client.search_for_series(source.StudyInstanceUID)) == 2
    instances = requests.get(f"{orthanc['base']}/instances", auth=orthanc["auth"], timeout=10).json()
    assert len(instances) == 3  # the radiograph, one SR, one SC: nothing duplicated

    with pytest.raises(requests.HTTPError, match="401"):  # authentication is on
        _client(orthanc, ("boneage", "wrong")).search_for_series(source.StudyInstanceUID)
