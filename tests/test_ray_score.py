"""Batch scoring on a real local Ray: a folder mixing good radiographs (PNG and DICOM) with every kind
of bad file gives one row per file and exit status 0; the table's schema is the documented one."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from boneage import cli, score
from boneage.errors import error_code

from conftest import REAL_DIR
from test_io import dicom_bytes
from tiny_bundle import KINDS, write_tiny_bundle

pytestmark = pytest.mark.slow


def mixed_folder(folder: Path, synthetic: dict) -> Path:
    shutil.copytree(synthetic["images"], folder)
    shutil.copy(REAL_DIR / "1402.png", folder / "1402.png")
    pixels = np.asarray(Image.open(REAL_DIR / "1675.png").convert("L"), np.uint16) * 16
    (folder / "scan.dcm").write_bytes(dicom_bytes(pixels, sex="M", birth="20100115", study="20200715"))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    data = (REAL_DIR / "1563.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    (folder / "tiny.png").write_bytes(_png(np.full((8, 8), 128, np.uint8)))
    return folder


def _png(array: np.ndarray) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_mixed_folder_one_row_per_file(tmp_path, ray_local, synthetic_small):
    images = mixed_folder(tmp_path / "images", synthetic_small)
    bundle = tmp_path / "bundle"
    write_tiny_bundle(str(bundle))
    subjects = tmp_path / "subjects.csv"
    subjects.write_text("id,sex,age_months\n1402,F,30\n1,M,\n2,X,\n")
    out = tmp_path / "predictions.parquet"

    assert cli.main(["score", str(images), "--bundle", str(bundle), "--out", str(out),
                     "--subjects", str(subjects), "--batch-size", "4"]) == 0

    table = pd.read_parquet(out)
    files = sorted(p.name for p in images.iterdir())
    assert sorted(Path(u).name for u in table.uri) == files  # exactly one row per input file
    assert list(table.columns) == score.output_schema(list(KINDS)).names
    schema = pq.read_schema(out)
    assert schema.field("boneage_months").type == "double" and schema.field("sex_unknown").type == "bool"
    rows = table.set_index("id")
    codes = rows.error.map(error_code)
    assert codes["empty"] == "empty_file" and codes["notes"] == "not_an_image"
    assert codes["truncated"] == "truncated" and codes["bad"] == "bad_dicom"
    assert codes["tiny"] == "bad_image" and codes["2"] == "unknown_sex"  # a bad CSV row fails its image
    # Sex and age: the CSV, then the DICOM header, else unknown (both sexes' estimates).
    assert (rows.loc["1402", ["sex", "sex_source", "chronological_age_months"]].tolist() == ["F", "csv", 30.0])
    assert rows.loc["scan", "sex"] == "M" and rows.loc["scan", "sex_source"] == "dicom"
    assert rows.loc["scan", "age_source"] == "dicom_dates"
    assert rows.loc["scan", "chronological_age_months"] == pytest.approx(126.0, abs=0.5)
    assert rows.loc["1", "sex_source"] == "csv"
    ok = rows[rows.status == "ok"]
    assert ok.boneage_months.notna().all() and ok.boneage_sd_months.notna().all()
    unknown = ok[ok.sex_unknown]
    assert len(unknown) >= 3 and unknown.boneage_if_female_months.notna().all()
    failed = rows[rows.status != "ok"]
    assert failed.boneage_months.isna().all() and failed.error.notna().all()
    # Nothing identifying from the DICOM header reaches the table.
    text = table.to_csv()
    assert "Doe" not in text and "20100115" not in text


def test_a_missing_bundle_is_a_clear_error(tmp_path, capsys, synthetic_small):
    assert cli.main(["score", synthetic_small["images"], "--bundle", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "p.parquet")]) == 2
    assert "bundle" in capsys.readouterr().err and not (tmp_path / "p.parquet").exists()
