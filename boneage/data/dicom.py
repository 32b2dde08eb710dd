"""DICOM radiographs: pixel data of every common transfer syntax to uint8 with bone bright, the two
patient facts scoring needs (sex, chronological age), and the UIDs when asked for.

Uncompressed, deflated and RLE DICOM decode with pydicom alone. JPEG (baseline, extended, lossless),
JPEG-LS and JPEG 2000 need pydicom's decoder plugins, installed by ``pip install 'boneage[dicom]'``
(pylibjpeg with its libjpeg and openjpeg plugins, pyjpegls). A file whose compression has no
installed decoder is a ``missing_codec`` error row naming the transfer syntax and that extra.

Windowing is pydicom's own: the Modality LUT (RescaleSlope/Intercept or a LUT), then the first VOI
LUT or window (LINEAR, LINEAR_EXACT, SIGMOID; PS3.3 C.11.2), mapped from its output range to 0-255.
"""

from __future__ import annotations

import datetime as dt
import io
import re
import warnings
from typing import Any, Mapping

import numpy as np

from boneage.errors import ItemError, short
from boneage.data.pixels import check_pixel_count, percentile_window
from boneage.data.storage import filesystem

# What to install when a compressed DICOM has no decoder (pyproject.toml's `dicom` extra).
CODEC_EXTRA = "pip install 'boneage[dicom]'"

# The identifiers --keep-dicom-uids copies into an output table (and --id-from sop uses the last).
UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")

# A header read for UIDs fetches this much first: the UIDs sit before the pixel data, and a DX
# header is a few kB (a longer one is read whole).
HEADER_BYTES = 64 * 1024


def _dcmread(data: bytes, name: str, **kwargs):
    import pydicom  # imported here: only DICOM inputs pay for it

    try:
        with warnings.catch_warnings():  # pydicom warns, then fails or not; the ItemError says it
            warnings.simplefilter("ignore")
            return pydicom.dcmread(io.BytesIO(data), **kwargs)
    except Exception as e:  # InvalidDicomError, struct errors, bad lengths...
        raise ItemError("bad_dicom", f"{name}: header cannot be read: {short(e)}") from e


def _check_decoder(ds, name: str) -> None:
    """missing_codec (with what to install) or bad_dicom (no decoder exists) before decoding, so that
    the row says why rather than pydicom's plugin list."""
    from pydicom.pixels import get_decoder

    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if syntax is None or not syntax.is_compressed:
        return
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError:
        raise ItemError("bad_dicom", f"{name}: transfer syntax {syntax.name} ({syntax}) has no "
                                     "decoder in pydicom (not an image boneage reads)") from None
    if not decoder.is_available:
        raise ItemError("missing_codec", f"{name}: {syntax.name} ({syntax}) needs a decoder that is not "
                                         f"installed: {CODEC_EXTRA}")


def decode_dicom(data: bytes, name: str, meta: dict, max_pixels: int | None = None) -> np.ndarray:
    """uint8 HxW of a DICOM file's first frame with bone bright, filling `meta` (see
    boneage.data.images.META_KEYS); ItemError for a bad file, or one whose Rows x Columns is above
    `max_pixels` (checked before its pixels are decoded)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    ds = _dcmread(data, name)
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise ItemError("bad_dicom", f"{name}: no pixel data")
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    meta["orig_mode"] = photometric
    try:
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        n_frames = 1
    meta["n_frames"] = n_frames
    try:  # a malformed age or spacing tag loses that meta value, not the image
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _dicom_patient_meta(ds, meta)
    except Exception:
        pass

    if max_pixels is not None:
        check_pixel_count(int(ds.get("Columns", 0) or 0), int(ds.get("Rows", 0) or 0), max_pixels, name)
    _check_decoder(ds, name)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # Only the first frame is decoded (index=0); pydicom converts YBR colour to RGB.
            arr = pydicom.pixels.pixel_array(ds, index=0) if n_frames > 1 else ds.pixel_array
    except Exception as e:
        msg = str(e)
        # pydicom: "The number of bytes of pixel data is less than expected (... vs ... bytes)"
        if "less than expected" in msg.lower():
            raise ItemError("truncated", f"{name}: pixel data shorter than its header says: {short(e)}") from e
        raise ItemError("bad_dicom", f"{name}: pixel data cannot be decoded: {short(e)}") from e
    meta["orig_dtype"] = str(arr.dtype)
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise ItemError("bad_dicom", f"{name}: palette cannot be applied: {short(e)}") from e

    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR"
    if colour and arr.ndim == 3 and arr.shape[-1] in (3, 4):
        # Colour DICOM (secondary capture, scanned film): luminance, no LUTs apply.
        rgb = arr[..., :3].astype(np.float32)
        lum = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        meta["window"] = "luminance"
        if arr.dtype.itemsize == 1:
            return np.clip(lum.round(), 0, 255).astype(np.uint8)
        meta["window"] = "percentile"
        return percentile_window(lum)
    if arr.ndim != 2:
        raise ItemError("bad_dicom", f"{name}: unexpected pixel array shape {arr.shape}")

    try:
        values = apply_modality_lut(arr, ds)
    except Exception as e:
        raise ItemError("bad_dicom", f"{name}: Modality LUT cannot be applied: {short(e)}") from e

    out = _voi(ds, values)
    if out is None:
        meta["window"] = "percentile"
        out = percentile_window(values)
    else:
        meta["window"] = "voi"
    if photometric == "MONOCHROME1":  # low values are white: invert so that bone is bright
        out = 255 - out
        meta["inverted"] = True
    return out


def _voi(ds, values: np.ndarray) -> np.ndarray | None:
    """uint8 from the file's own VOI LUT or window, applied by pydicom, or None if it has none (or a
    broken one: the caller falls back on the percentile window)."""
    from pydicom.pixels import apply_voi_lut

    has_lut = "VOILUTSequence" in ds and len(ds.VOILUTSequence)
    if not has_lut and ("WindowCenter" not in ds or "WindowWidth" not in ds):
        return None
    try:
        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            if has_lut:  # a LUT's output range is its own: map what it gives to the full 0-255
                return percentile_window(out, 0.0, 100.0)
            # A window maps onto [y_min, y_max], which pydicom derives from BitsStored and the
            # rescale; the window's outputs for values far outside it are exactly those two.
            y_min, y_max = apply_voi_lut(np.array([-1e15, 1e15]), ds, index=0, prefer_lut=False)
    except Exception:
        return None
    if not np.isfinite([y_min, y_max]).all() or y_max <= y_min:
        return None
    scaled = (np.asarray(out, np.float64) - y_min) * (255.0 / (y_max - y_min))
    return np.clip(np.round(scaled), 0, 255).astype(np.uint8)


def header_uids(data: bytes, name: str) -> dict[str, str | None]:
    """{keyword: value} of UID_KEYWORDS from a DICOM file's bytes (its header suffices), and `group`:
    the PatientID hashed (boneage.data.labels.patient_group; the id itself is never returned)."""
    from boneage.data.patients import patient_group

    ds = _dcmread(data, name, stop_before_pixels=True)
    found = {k: (str(ds.get(k)).strip() or None) if ds.get(k) is not None else None for k in UID_KEYWORDS}
    return {**found, "group": patient_group(ds.get("PatientID"))}


def read_uids(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, str | None]:
    """The UIDs of one DICOM file, reading only its first HEADER_BYTES where that holds the header;
    ItemError when it cannot be read."""
    from boneage.data.storage import read_bytes

    try:
        fs, path = filesystem(uri, storage_options)
        head = fs.cat_file(path, start=0, end=HEADER_BYTES)
    except Exception:
        head = read_bytes(uri, storage_options)  # raises the right ItemError
    try:
        return header_uids(head, str(uri))
    except ItemError:
        if len(head) < HEADER_BYTES:
            raise
        return header_uids(read_bytes(uri, storage_options), str(uri))


_AGE_UNITS_MONTHS = {"D": 1 / 30.4375, "W": 7 / 30.4375, "M": 1.0, "Y": 12.0}


def _parse_dicom_date(value) -> dt.date | None:
    s = str(value or "").strip()
    # DA is YYYYMMDD; old ACR-NEMA files sometimes have YYYY.MM.DD
    s = s.replace(".", "").replace("-", "")
    if len(s) < 8 or not s[:8].isdigit():
        return None
    try:
        return dt.date(int(s[:4]), int(s[4:6]), int(s[6:8]))
    except ValueError:
        return None


# A chronological age outside this range (months) is not a child's: a date that de-identification
# shifted, or a typo. Dates outside FIRST_YEAR..this year + 1 are shifted dates (de-identification tools
# move them to 1900 or into the next century).
MAX_AGE_MONTHS = 25 * 12
FIRST_YEAR = 1900
UNUSED_AGE = "unused"  # the start of an age_source that says why the header's age was not used


def _age_from_dates(birth: dt.date | None, taken: dt.date | None) -> tuple[float | None, str | None]:
    """(age in months, None) from the birth and image dates, or (None, why not) where they are implausible
    ((None, None) where either is missing)."""
    if birth is None or taken is None:
        return None, None
    last_year = dt.date.today().year + 1
    if not (FIRST_YEAR <= birth.year <= last_year and FIRST_YEAR <= taken.year <= last_year):
        return None, f"dates in implausible years ({birth.year}, {taken.year}): shifted by de-identification?"
    if taken < birth:
        return None, "image date before birth date: shifted by de-identification?"
    age = (taken - birth).days / 30.4375
    if age > MAX_AGE_MONTHS:
        return None, f"age from dates {age / 12:.0f} years, outside 0-{MAX_AGE_MONTHS // 12}"
    return age, None


def _dicom_patient_meta(ds, meta: dict) -> None:
    """Sex and chronological age only. The dates themselves never leave this function. An age that is
    not plausible is not used: age_source then says why ("unused: ...")."""
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    meta["sex"] = sex if sex in ("M", "F") else None

    birth = _parse_dicom_date(ds.get("PatientBirthDate"))
    # The date the image was taken: StudyDate, else the more specific ones.
    taken = None
    for keyword in ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate"):
        taken = _parse_dicom_date(ds.get(keyword))
        if taken is not None:
            break
    age, why_not = _age_from_dates(birth, taken)  # dates beat PatientAge, which is rounded down
    source = "dates" if age is not None else None
    if age is None:
        m = re.fullmatch(r"0*(\d{1,3})\s*([DWMY])", str(ds.get("PatientAge", "") or "").strip().upper())
        if m:
            given = int(m.group(1)) * _AGE_UNITS_MONTHS[m.group(2)]
            if given <= MAX_AGE_MONTHS:
                age, source = given, "PatientAge"
            else:
                why_not = f"PatientAge {m.group(1)}{m.group(2)} outside 0-{MAX_AGE_MONTHS // 12} years"
    meta["age_months"] = None if age is None else round(float(age), 2)
    if source is not None or why_not is not None:
        meta["age_source"] = source or f"{UNUSED_AGE}: {why_not}"

    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        if spacing is not None and len(spacing) == 2:
            meta["pixel_spacing_mm"] = [float(spacing[0]), float(spacing[1])]
    except (TypeError, ValueError):
        pass
