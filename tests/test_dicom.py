"""boneage.data.dicom: every common transfer syntax decodes to the same image as the uncompressed file, and
a compression without an installed decoder is a `missing_codec` row that names the extra to install."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from boneage.data import dicom, images

from conftest import FIXTURES

sys.path.insert(0, str(FIXTURES / "dicom"))
from make_fixtures import pixels, uncompressed  # noqa: E402  (the fixtures' own recipe)

DICOM_FIXTURES = FIXTURES / "dicom"


def _decoded(data: bytes) -> np.ndarray:
    image, meta = images.decode_image(data, "x.dcm")
    assert meta["format"] == "dicom" and meta["sex"] == "M" and meta["age_months"] == 96
    return image


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return _decoded(uncompressed())


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless"])
def test_lossless_syntaxes_pydicom_encodes(syntax, reference):
    import pydicom
    from pydicom import uid

    ds = pydicom.dcmread(io.BytesIO(uncompressed()))
    ds.compress(getattr(uid, syntax))
    buffer = io.BytesIO()
    ds.save_as(buffer)
    assert pydicom.dcmread(io.BytesIO(buffer.getvalue())).file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(_decoded(buffer.getvalue()), reference)


@pytest.mark.parametrize("name, syntax", [("jpeg_lossless_sv1.dcm", "1.2.840.10008.1.2.4.70"),
                                          ("jpeg_lossless.dcm", "1.2.840.10008.1.2.4.57")])
def test_jpeg_lossless_fixtures(name, syntax, reference):
    import pydicom

    data = (DICOM_FIXTURES / name).read_bytes()
    assert pydicom.dcmread(io.BytesIO(data)).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(_decoded(data), reference)


def _jpeg_baseline_dicom(gray8: np.ndarray) -> bytes:
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGBaseline8Bit

    ds = pydicom.dcmread(io.BytesIO(uncompressed()))
    jpeg = io.BytesIO()
    Image.fromarray(gray8).save(jpeg, "JPEG", quality=95)
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([jpeg.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    buffer = io.BytesIO()
    ds.save_as(buffer)
    return buffer.getvalue()


def test_jpeg_baseline(reference):
    gray8 = (pixels() // 16).astype(np.uint8)  # 12 bits to 8: the same picture
    decoded = _decoded(_jpeg_baseline_dicom(gray8))
    assert np.abs(decoded.astype(int) - reference).mean() < 3


def test_uids_from_the_header_only(tmp_path):
    path = tmp_path / "IM0001"
    path.write_bytes(uncompressed())
    assert dicom.read_uids(str(path))["SOPInstanceUID"] == "1.2.826.0.1.3680043.8.498.1"


def test_a_missing_decoder_is_missing_codec_naming_the_extra():
    """In a fresh interpreter whose pydicom has no JPEG Lossless plugin (pylibjpeg, the only one, is
    deregistered through pydicom's own API: what pydicom sees without the extra), a JPEG Lossless DICOM
    is a missing_codec error that says what to install."""
    script = ("from pydicom.pixels import get_decoder\nfrom pydicom.uid import JPEGLosslessSV1\n"
              "get_decoder(JPEGLosslessSV1).remove_plugin('pylibjpeg')\n"
              "from pathlib import Path\n"
              "from boneage.errors import ItemError\nfrom boneage.data.images import decode_image\n"
              f"data = Path({str(DICOM_FIXTURES / 'jpeg_lossless_sv1.dcm')!r}).read_bytes()\n"
              "try:\n    decode_image(data, 'IM0001')\nexcept ItemError as e:\n    print(e)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            cwd=Path(__file__).parent.parent, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("missing_codec: IM0001: JPEG Lossless"), result.stdout
    assert "pip install 'boneage[dicom]'" in result.stdout


def _patient(**tags):
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientSex = "F"
    for key, value in tags.items():
        setattr(ds, key, value)
    meta: dict = {}
    dicom._dicom_patient_meta(ds, meta)
    return meta.get("age_months"), meta.get("age_source")


def test_an_implausible_dicom_age_is_not_used_and_says_why():
    # Plausible: from the dates, else PatientAge.
    assert _patient(PatientBirthDate="20100115", StudyDate="20200715") == (pytest.approx(126.0, abs=0.1), "dates")
    assert _patient(PatientAge="007Y") == (84.0, "PatientAge")
    # De-identification shifted the dates: study before birth, far years, an adult's age.
    for tags, why in [({"PatientBirthDate": "20200115", "StudyDate": "20100715"}, "before birth"),
                      ({"PatientBirthDate": "18500101", "StudyDate": "18580101"}, "implausible years"),
                      ({"PatientBirthDate": "21500101", "StudyDate": "21580101"}, "implausible years"),
                      ({"PatientBirthDate": "19500101", "StudyDate": "20200101"}, "70 years"),
                      ({"PatientAge": "045Y"}, "PatientAge 45Y outside 0-25")]:
        age, source = _patient(**tags)
        assert age is None and source.startswith("unused: ") and why in source, (tags, source)
    # Shifted dates but a plausible PatientAge: that age, not the dates'.
    assert _patient(PatientBirthDate="20200115", StudyDate="20100715", PatientAge="010Y") == (120.0, "PatientAge")
    assert _patient() == (None, None)  # nothing given: nothing said
