"""Reading images, labels and key point annotations from wherever users keep them.

Everything goes through fsspec, so a local path, a ``file://`` URI and ``s3://bucket/key`` are
read the same way. ``storage_options`` is passed to fsspec unchanged, e.g.
``{"client_kwargs": {"endpoint_url": "http://minio:9000"}}`` for an S3-compatible store;
botocore (under s3fs) also honours the ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` and
the usual credential environment variables when no options are given.

Per-item problems become :class:`boneage.errors.ItemError` (one bad image never stops a run);
problems with a whole file (a label table without the columns we need) raise ``ValueError``.

Images
    :func:`list_images` finds inputs, :func:`read_image` reads and decodes one into an
    :class:`ImageRecord` (uint8 grayscale HxW, plus a small meta dict, see :data:`META_KEYS`),
    :func:`decode_image` does the decoding of bytes already in memory.
Labels
    :func:`read_labels` reads the RSNA CSV variants into ``id, boneage, male``.
Key points
    :func:`read_keypoints` reads VIA CSV/JSON exports or a plain CSV into (3, 2) arrays in
    the order of :data:`boneage.frame.KEYPOINT_NAMES`; :func:`read_hand21` reads the rsna-dev
    21-point file used for evaluation.
Writing
    :func:`open_output`, :func:`write_bytes`, :func:`join_uri`.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import math
import os
import posixpath
import re
import warnings
from dataclasses import dataclass, field
from typing import IO, Any, Iterable, Mapping

import fsspec
import numpy as np
import pandas as pd
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from boneage.config import absolute
from boneage.errors import ItemError
from boneage.frame import KEYPOINT_NAMES

# --------------------------------------------------------------------------------------------
# Files and listing
# --------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MIN_SIDE = 64  # smaller than this on either side is not a usable hand radiograph

_DICOM_MAGIC_OFFSET = 128  # Part 10 files: 128-byte preamble, then b"DICM"


def _fs(uri: str, storage_options: Mapping[str, Any] | None = None):
    """(filesystem, path inside it) for a local path or URI."""
    return fsspec.core.url_to_fs(str(uri), **dict(storage_options or {}))


def _with_protocol(fs, path: str) -> str:
    """fsspec listings drop the protocol for remote stores; put it back so URIs round-trip."""
    if _is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def _is_absolute(uri: str) -> bool:
    return "://" in uri or os.path.isabs(uri)



def image_id(uri: str) -> str:
    """The id of an image: its file name without a known image extension.

    Only the extensions in IMAGE_EXTENSIONS are removed (case-insensitively), so a DICOM named
    by its UID, ``1.2.840.113619.2.55``, keeps its whole name.
    """
    name = posixpath.basename(str(uri).rstrip("/").replace("\\", "/"))
    root, ext = posixpath.splitext(name)
    return root if ext.lower() in IMAGE_EXTENSIONS else name


def _label_id(value: str) -> str:
    """An id from a table cell: "1377.png" and "1377.0" (a float column's artefact) -> "1377"."""
    if re.fullmatch(r"\d+\.0+", value):
        return value.split(".", 1)[0]
    return image_id(value) if value else ""


def _looks_like_dicom(fs, path: str) -> bool:
    try:  # a ranged read: fs.open() would fetch a whole read-ahead block from S3
        head = fs.cat_file(path, start=0, end=_DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[_DICOM_MAGIC_OFFSET:] == b"DICM"


def list_images(
    source: str | os.PathLike | Iterable[str],
    recursive: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """The images of a source, sorted, as paths (local) or URIs (``s3://...``).

    ``source`` is one of:

    * a folder or ``s3://bucket/prefix``: files whose extension is one of IMAGE_EXTENSIONS
      (any case), plus files with no extension or a numeric one (``IM0001``,
      ``1.2.840.113619.2.55``: PACS exports name DICOMs so) that carry the DICOM marker
      (``DICM`` at byte 128; this costs one small read per such file). Hidden files (``.*``,
      which includes macOS ``._x.png`` resource forks) are skipped. Subfolders are searched
      if ``recursive``.
    * a ``.txt`` file (local or remote): one path/URI per line; blank lines and ``#`` comments
      are ignored.
    * a list of paths/URIs.

    Explicitly named files (list or .txt) are kept without any filtering, so that a missing or
    bad one becomes an error row later instead of disappearing. Relative local paths are made
    absolute (Ray workers may run elsewhere than the current directory): in a .txt file
    relative to the .txt file's folder, in a list relative to the current directory. The
    result is sorted and without duplicates, so it is the same on every run.
    """
    if not isinstance(source, (str, os.PathLike)):
        return sorted({absolute(str(s)) for s in source})
    source = str(source)
    if source.lower().endswith(".txt"):
        with fsspec.open(source, "rt", encoding="utf-8-sig", **dict(storage_options or {})) as f:
            lines = [line.strip() for line in f]
        base = source.rsplit("/", 1)[0] if "/" in source else "."
        entries = {line for line in lines if line and not line.startswith("#")}
        return sorted({e if _is_absolute(e) else absolute(join_uri(base, e)) for e in entries})

    fs, root = _fs(source, storage_options)
    fs.invalidate_cache(root)  # s3fs caches listings per process; a re-listing must see new files
    if not fs.isdir(root):
        if fs.exists(root):
            raise ValueError(f"{source} is a file; give a folder, a prefix, a list or a .txt list")
        raise FileNotFoundError(f"no such folder or prefix: {source}")
    paths = fs.find(root, maxdepth=None if recursive else 1)
    found = []
    for path in paths:
        name = posixpath.basename(path)
        if name.startswith("."):
            continue
        ext = posixpath.splitext(name)[1].lower()
        # PACS exports name DICOMs by number or UID ("IM0001", "1.2.840.113619.2.55"): files
        # without a word extension are opened and kept if they carry the DICOM marker.
        if ext in IMAGE_EXTENSIONS or ((ext == "" or ext[1:].isdigit()) and _looks_like_dicom(fs, path)):
            found.append(_with_protocol(fs, path))
    return sorted(set(found))


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """All bytes of one file, or an ItemError (missing_file, empty_file, read_failed)."""
    try:
        fs, path = _fs(uri, storage_options)
        data = fs.cat_file(path)
    except FileNotFoundError as e:
        raise ItemError("missing_file", str(uri)) from e
    except IsADirectoryError as e:
        raise ItemError("not_an_image", f"{uri} is a folder") from e
    except Exception as e:  # permissions, network, credentials: the item, not the run, fails
        raise ItemError("read_failed", f"{uri}: {_short(e)}") from e
    if len(data) == 0:
        raise ItemError("empty_file", str(uri))
    return data


# --------------------------------------------------------------------------------------------
# Decoding
# --------------------------------------------------------------------------------------------

# Every decoded image has exactly these meta keys (None where unknown), so that a table of them
# has one schema whatever the mix of formats. Nothing identifying is kept: no names, ids,
# dates, institutions or free text from DICOM headers.
META_KEYS = (
    "format",  # "png" | "jpeg" | "dicom"
    "orig_dtype",  # dtype of the stored samples before conversion, e.g. "uint8", "uint16"
    "orig_mode",  # PIL mode ("L", "I;16", "RGB", ...) or DICOM PhotometricInterpretation
    "window",  # how the samples became uint8: "none" (already 8-bit), "luminance",
    #            "percentile" (robust min-max), "voi" (the DICOM's own VOI window or LUT)
    "inverted",  # True when MONOCHROME1 was inverted so that bone is bright
    "n_frames",  # number of frames in the file (only the first is used)
    "sex",  # "M" | "F" | None, from DICOM PatientSex (needed for scoring, not identifying)
    "age_months",  # chronological age in months (float) from DICOM, or None
    "age_source",  # "dates" (StudyDate - PatientBirthDate) | "PatientAge" | None
    "pixel_spacing_mm",  # [row, col] mm per pixel from DICOM (Imager)PixelSpacing, or None
)

# 16-bit PNGs and DICOMs without a VOI window are mapped to uint8 linearly between these
# percentiles of their values: a plain min-max would let a few dead pixels or a burned-in
# marker squeeze the whole hand into a handful of grey levels.
WINDOW_PERCENTILES = (0.1, 99.9)

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"IEND\xaeB`\x82"  # the IEND chunk type and its fixed CRC
_JPEG_MAGIC = b"\xff\xd8\xff"
_OTHER_MAGICS = {  # recognised only to say what the file is in the error message
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
    b"BM": "BMP",
    b"GIF8": "GIF",
    b"RIFF": "RIFF/WebP",
    b"\x00\x00\x00\x0cjP": "JPEG 2000",
    b"%PDF": "PDF",
    b"PK\x03\x04": "ZIP",
    b"\x1f\x8b": "gzip",
}


@dataclass
class ImageRecord:
    """One decoded image: ``image`` is uint8 grayscale HxW with bone bright."""

    id: str
    uri: str
    image: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def height(self) -> int:
        return int(self.image.shape[0])

    @property
    def width(self) -> int:
        return int(self.image.shape[1])


def sniff_format(data: bytes) -> str | None:
    """'png', 'jpeg' or 'dicom' from the magic bytes, else None."""
    if data.startswith(_PNG_MAGIC):
        return "png"
    if data.startswith(_JPEG_MAGIC):
        return "jpeg"
    if data[_DICOM_MAGIC_OFFSET : _DICOM_MAGIC_OFFSET + 4] == b"DICM":
        return "dicom"
    return None


def _describe_unknown(data: bytes) -> str:
    for magic, kind in _OTHER_MAGICS.items():
        if data.startswith(magic):
            return f"{kind} file (only PNG, JPEG and DICOM are read)"
    try:
        data[:256].decode("utf-8")
        return "looks like text"
    except UnicodeDecodeError:
        return f"unknown magic bytes {data[:8].hex()}"


def read_image(uri: str, storage_options: Mapping[str, Any] | None = None) -> ImageRecord:
    """Read and decode one image, or raise ItemError. See :func:`decode_image`."""
    data = read_bytes(uri, storage_options)
    image, meta = decode_image(data, str(uri))
    return ImageRecord(id=image_id(uri), uri=str(uri), image=image, meta=meta)


def decode_image(data: bytes, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode PNG, JPEG or DICOM bytes to (uint8 HxW array, meta) or raise ItemError.

    The type comes from the magic bytes, never from ``name`` (used in messages only).

    * PNG/JPEG: 8-bit grayscale as is; RGB/RGBA/palette to luminance (ITU-R 601, alpha
      ignored); 16-bit to uint8 by the WINDOW_PERCENTILES window; JPEG EXIF orientation applied.
    * DICOM: Modality LUT (RescaleSlope/Intercept), then the first VOI window
      (WindowCenter/Width, LINEAR/LINEAR_EXACT/SIGMOID) or VOI LUT if the file has one, else the
      percentile window; MONOCHROME1 is inverted; of a multi-frame file the first frame is used;
      colour DICOMs go to luminance. Pixel data shorter than the header says is ``truncated``;
      a file cut before its pixel data is a ``bad_dicom`` (no pixel data). Compressed transfer
      syntaxes need pydicom's optional decoders (pylibjpeg, gdcm); without them: bad_dicom.

    The meta dict has exactly the keys in META_KEYS.
    """
    if len(data) == 0:
        raise ItemError("empty_file", name)
    kind = sniff_format(data)
    if kind is None:
        raise ItemError("not_an_image", f"{name}: {_describe_unknown(data)}")
    meta: dict[str, Any] = dict.fromkeys(META_KEYS)
    meta.update(format=kind, window="none", inverted=False, n_frames=1)
    if kind == "dicom":
        image = _decode_dicom(data, name, meta)
    else:
        image = _decode_pil(data, name, kind, meta)
    _check_usable(image, name)
    return image, meta


def _decode_pil(data: bytes, name: str, kind: str, meta: dict) -> np.ndarray:
    # PIL decodes lazily and, with LOAD_TRUNCATED_IMAGES, silently pads a short file with grey.
    # Nobody in boneage sets it; we refuse to decode if someone else in the process did.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated images would pass")
    # PIL happily decodes a PNG whose last chunks (IDAT CRC, IEND) are cut off; IEND is the only
    # sure sign that the whole file arrived.
    if kind == "png" and _PNG_IEND not in data:
        raise ItemError("truncated", f"{name}: PNG has no IEND chunk")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # force decoding now, so errors surface here, not in a later stage
            if kind == "jpeg":
                im = ImageOps.exif_transpose(im)
            meta["orig_mode"] = im.mode
            meta["n_frames"] = int(getattr(im, "n_frames", 1))
            return _pil_to_gray8(im, meta)
    except ItemError:
        raise
    except UnidentifiedImageError as e:
        # The magic bytes matched, so PIL failed on the header: short file or a damaged one.
        if kind == "jpeg" and b"\xff\xd9" not in data:
            raise ItemError("truncated", f"{name}: JPEG header incomplete") from e
        if kind == "png" and len(data) < 64:
            raise ItemError("truncated", f"{name}: PNG header incomplete") from e
        raise ItemError("corrupt_image", f"{name}: {kind.upper()} header cannot be parsed") from e
    except Image.DecompressionBombError as e:
        raise ItemError("bad_image", f"{name}: {_short(e)}") from e
    except Exception as e:  # OSError, SyntaxError (PIL's "broken PNG"), ValueError, EOFError...
        if "truncated" in str(e).lower() or isinstance(e, EOFError):
            raise ItemError("truncated", f"{name}: {_short(e)}") from e
        raise ItemError("corrupt_image", f"{name}: {_short(e)}") from e


def _pil_to_gray8(im: Image.Image, meta: dict) -> np.ndarray:
    mode = im.mode
    if mode == "L":
        meta["orig_dtype"] = "uint8"
        return np.asarray(im, dtype=np.uint8).copy()
    if mode == "LA":
        meta["orig_dtype"] = "uint8"
        return np.asarray(im.getchannel("L"), dtype=np.uint8).copy()
    if mode.startswith("I") or mode == "F":  # 16-bit PNG ("I;16", "I;16B", "I") or float
        arr = np.asarray(im)
        meta["orig_dtype"] = "uint16" if mode.startswith("I;16") else str(arr.dtype)
        meta["window"] = "percentile"
        return _percentile_window(arr)
    # RGB, RGBA, P, PA, CMYK, YCbCr, 1: PIL's convert('L') is ITU-R 601 luma and drops alpha.
    meta["orig_dtype"] = "uint8"
    meta["window"] = "luminance"
    return np.asarray(im.convert("L"), dtype=np.uint8).copy()


def _percentile_window(arr: np.ndarray, lo_pct: float | None = None, hi_pct: float | None = None) -> np.ndarray:
    """Linear map of [p_lo, p_hi] to [0, 255], clipped (WINDOW_PERCENTILES by default)."""
    lo_pct = WINDOW_PERCENTILES[0] if lo_pct is None else lo_pct
    hi_pct = WINDOW_PERCENTILES[1] if hi_pct is None else hi_pct
    arr = np.asarray(arr)
    if arr.size == 0:
        return np.zeros(arr.shape, np.uint8)
    if arr.dtype.kind in "ui" and arr.dtype.itemsize <= 2:
        # Integer images up to 16 bit: a histogram is ~20x faster than sorting for percentiles.
        offset = int(arr.min())
        counts = np.bincount((arr.astype(np.int64) - offset).ravel())
        cdf = np.cumsum(counts) / arr.size
        lo = offset + int(np.searchsorted(cdf, lo_pct / 100.0))
        hi = offset + int(np.searchsorted(cdf, hi_pct / 100.0))
    else:
        finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr.ravel()
        if finite.size == 0:
            return np.zeros(arr.shape, np.uint8)
        sample = finite[:: max(1, finite.size // 1_000_000)]  # a million samples are plenty
        lo, hi = np.percentile(sample, [lo_pct, hi_pct])
    if hi <= lo:  # almost constant: fall back to the full range
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)  # constant; _check_usable rejects it
    scaled = (arr.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


def _check_usable(image: np.ndarray, name: str) -> None:
    if image.ndim != 2:
        raise ItemError("bad_image", f"{name}: expected one grayscale plane, got shape {image.shape}")
    h, w = image.shape
    if min(h, w) < MIN_SIDE:
        raise ItemError("bad_image", f"{name}: {w}x{h} px is smaller than {MIN_SIDE} px on a side")
    if int(image.max()) == int(image.min()):
        raise ItemError("bad_image", f"{name}: constant image (all pixels {int(image.min())})")


# --- DICOM ----------------------------------------------------------------------------------


def _decode_dicom(data: bytes, name: str, meta: dict) -> np.ndarray:
    import pydicom  # imported here: only DICOM inputs pay for it
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

    try:
        with warnings.catch_warnings():  # pydicom warns, then fails or not; the ItemError says it
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data))
    except Exception as e:  # InvalidDicomError, struct errors, bad lengths...
        raise ItemError("bad_dicom", f"{name}: header cannot be read: {_short(e)}") from e
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

    try:
        # Only the first frame is decoded (index=0); pydicom converts YBR colour to RGB.
        arr = pydicom.pixels.pixel_array(ds, index=0) if n_frames > 1 else ds.pixel_array
    except Exception as e:
        msg = str(e)
        # pydicom: "The number of bytes of pixel data is less than expected (... vs ... bytes)"
        if "less than expected" in msg.lower():
            raise ItemError("truncated", f"{name}: pixel data shorter than its header says: {_short(e)}") from e
        raise ItemError("bad_dicom", f"{name}: pixel data cannot be decoded: {_short(e)}") from e
    meta["orig_dtype"] = str(arr.dtype)
    if photometric == "PALETTE COLOR" and arr.ndim == 2:
        try:
            arr = apply_color_lut(arr, ds)
        except Exception as e:
            raise ItemError("bad_dicom", f"{name}: palette cannot be applied: {_short(e)}") from e

    colour = int(ds.get("SamplesPerPixel", 1) or 1) > 1 or photometric == "PALETTE COLOR"
    if colour and arr.ndim == 3 and arr.shape[-1] in (3, 4):
        # Colour DICOM (secondary capture, scanned film): luminance, no LUTs apply.
        rgb = arr[..., :3].astype(np.float32)
        lum = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
        meta["window"] = "luminance"
        if arr.dtype.itemsize == 1:
            return np.clip(lum.round(), 0, 255).astype(np.uint8)
        meta["window"] = "percentile"
        return _percentile_window(lum)
    if arr.ndim != 2:
        raise ItemError("bad_dicom", f"{name}: unexpected pixel array shape {arr.shape}")

    try:
        values = apply_modality_lut(arr, ds)
    except Exception as e:
        raise ItemError("bad_dicom", f"{name}: Modality LUT cannot be applied: {_short(e)}") from e

    out = _dicom_voi(ds, values, apply_voi_lut)
    if out is None:
        meta["window"] = "percentile"
        out = _percentile_window(values)
    else:
        meta["window"] = "voi"
    if photometric == "MONOCHROME1":  # low values are white: invert so that bone is bright
        out = 255 - out
        meta["inverted"] = True
    return out


def _short(e: Exception, limit: int = 200) -> str:
    """An exception as error detail: bounded, since it ends up in every output table."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _first_number(value) -> float | None:
    """The first value of a (possibly multi-valued) DICOM number, or None."""
    if value is None:
        return None
    try:
        if not isinstance(value, (str, bytes, int, float)):  # pydicom MultiValue
            value = value[0]
        x = float(value)
    except (TypeError, ValueError, IndexError):
        return None
    return x if math.isfinite(x) else None


def _dicom_voi(ds, values: np.ndarray, apply_voi_lut) -> np.ndarray | None:
    """uint8 from the file's own VOI LUT or window (DICOM PS3.3 C.11.2.1.2), or None if none."""
    if "VOILUTSequence" in ds and len(ds.VOILUTSequence):
        try:
            out = apply_voi_lut(values, ds, index=0, prefer_lut=True)
            return _percentile_window(out, 0.0, 100.0)
        except Exception:
            pass  # a broken LUT: fall through to the window or our own
    center = _first_number(ds.get("WindowCenter"))
    width = _first_number(ds.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    function = str(ds.get("VOILUTFunction", "LINEAR")).strip().upper()
    x = values.astype(np.float64)
    if function == "SIGMOID":
        y = 1.0 / (1.0 + np.exp(-4.0 * (x - center) / width))
    elif function == "LINEAR_EXACT":
        y = (x - (center - width / 2)) / width
    else:  # LINEAR; the standard's -0.5 and width-1 reproduce the spec's integer behaviour
        if width < 1:
            return None
        y = ((x - (center - 0.5)) / max(width - 1, 1e-6)) + 0.5
    return np.clip(np.round(y * 255.0), 0, 255).astype(np.uint8)


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


def _dicom_patient_meta(ds, meta: dict) -> None:
    """Sex and chronological age only. The dates themselves never leave this function."""
    sex = str(ds.get("PatientSex", "") or "").strip().upper()
    meta["sex"] = sex if sex in ("M", "F") else None

    age = None
    birth = _parse_dicom_date(ds.get("PatientBirthDate"))
    # The date the image was taken: StudyDate, else the more specific ones.
    taken = None
    for keyword in ("StudyDate", "AcquisitionDate", "ContentDate", "SeriesDate"):
        taken = _parse_dicom_date(ds.get(keyword))
        if taken is not None:
            break
    if birth is not None and taken is not None and taken >= birth:
        age = (taken - birth).days / 30.4375  # dates beat PatientAge, which is rounded down
        meta["age_source"] = "dates"
    else:
        m = re.fullmatch(r"0*(\d{1,3})\s*([DWMY])", str(ds.get("PatientAge", "") or "").strip().upper())
        if m:
            age = int(m.group(1)) * _AGE_UNITS_MONTHS[m.group(2)]
            meta["age_source"] = "PatientAge"
    meta["age_months"] = None if age is None else round(float(age), 2)

    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    try:
        if spacing is not None and len(spacing) == 2:
            meta["pixel_spacing_mm"] = [float(spacing[0]), float(spacing[1])]
    except (TypeError, ValueError):
        pass


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

# Column names are compared after lower-casing and dropping everything but letters and digits.
_ID_COLUMNS = ("id", "imageid", "caseid")
_AGE_COLUMNS = ("boneage", "boneagemonths", "groundtruthboneagemonths")
_MALE_COLUMNS = ("male",)
_SEX_COLUMNS = ("sex", "gender")
LABEL_VARIANTS = (
    "id,boneage,male  (RSNA train; male True/False, true/false, 1/0)",
    "Image ID,male,Bone Age (months)  (RSNA validation)",
    "Case ID,Sex,Ground truth bone age (months)  (RSNA test; Sex M/F)",
)
MAX_AGE_MONTHS = 240.0

_TRUE = {"true", "t", "1", "1.0", "yes", "y"}
_FALSE = {"false", "f", "0", "0.0", "no", "n"}
_SEX_MALE = {"m", "male"}
_SEX_FEMALE = {"f", "female"}


def _norm_col(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _find_col(columns: Iterable[str], accepted: tuple[str, ...]) -> str | None:
    for col in columns:
        if _norm_col(col) in accepted:
            return col
    return None


def _read_table(uri: str, storage_options) -> pd.DataFrame:
    """A CSV (comma, semicolon or tab separated) with every cell as a stripped string."""
    with fsspec.open(str(uri), "rt", encoding="utf-8-sig", newline="", **dict(storage_options or {})) as f:
        text = f.read()
    first = text.split("\n", 1)[0]
    sep = "," if "," in first else "\t" if "\t" in first else ";" if ";" in first else ","
    df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    df.columns = [str(c).strip() for c in df.columns]
    return df.apply(lambda col: col.str.strip())


def read_labels(
    uri_or_path: str,
    storage_options: Mapping[str, Any] | None = None,
    require_age: bool = True,
) -> tuple[pd.DataFrame, dict[str, ItemError]]:
    """Read a label table into (DataFrame[id: str, boneage: float, male: bool], errors by id).

    Accepts the RSNA variants in LABEL_VARIANTS (column names matched case- and
    punctuation-insensitively; ids given as file names lose their image extension). Per-row
    problems do not raise, the row goes to ``errors`` instead of the frame:

    * bone age empty, NaN, not a number or outside 0-240 months: bad_label
    * sex not one of the accepted spellings: unknown_sex
    * an id on more than one row: duplicate_id for the id (all its rows are dropped, we cannot
      tell which one is right); this wins over the other codes
    * an empty id: bad_label, keyed ``"<row N>"`` (N = line number in the file)

    With ``require_age=False`` (scoring) the age column may be missing or empty (NaN in the
    result); a value that is present but invalid is still a bad_label. A missing id or sex
    column (or age column when required) raises ValueError naming the columns found.
    """
    df = _read_table(uri_or_path, storage_options)
    id_col = _find_col(df.columns, _ID_COLUMNS)
    age_col = _find_col(df.columns, _AGE_COLUMNS)
    male_col = _find_col(df.columns, _MALE_COLUMNS)
    sex_col = None if male_col else _find_col(df.columns, _SEX_COLUMNS)
    missing = [
        what
        for what, col in (("id", id_col), ("bone age", age_col if require_age else True), ("sex", male_col or sex_col))
        if col is None
    ]
    if missing:
        raise ValueError(
            f"{uri_or_path}: no {' / '.join(missing)} column; columns found: {list(df.columns)}; "
            f"accepted variants: {'; '.join(LABEL_VARIANTS)}"
        )

    errors: dict[str, ItemError] = {}
    rows: list[tuple[str, float, bool]] = []
    ids = [_label_id(v) for v in df[id_col]]
    counts = pd.Series(ids).value_counts()
    for i, rid in enumerate(ids):
        line = i + 2  # header is line 1
        if not rid:
            errors[f"<row {line}>"] = ItemError("bad_label", f"line {line}: empty id")
            continue
        if counts[rid] > 1:
            errors[rid] = ItemError("duplicate_id", f"id {rid} is on {counts[rid]} rows")
            continue
        raw_age = df[age_col].iat[i] if age_col else ""
        age, age_problem = _parse_age(raw_age, required=require_age)
        if age_problem:
            errors[rid] = ItemError("bad_label", f"id {rid}: {age_problem}")
            continue
        raw_sex = df[male_col or sex_col].iat[i]
        male = _parse_male(raw_sex) if male_col else _parse_sex(raw_sex)
        if male is None:
            errors[rid] = ItemError("unknown_sex", f"id {rid}: {raw_sex!r}")
            continue
        rows.append((rid, age, male))
    out = pd.DataFrame(rows, columns=["id", "boneage", "male"])
    out = out.astype({"id": str, "boneage": float, "male": bool})
    return out, errors


_CHRONO_AGE_COLUMNS = ("chronologicalage", "chronologicalagemonths", "agemonths", "age")


def read_subjects(uri_or_path: str, storage_options: Mapping[str, Any] | None = None
                  ) -> tuple[pd.DataFrame, dict[str, ItemError]]:
    """For scoring: (DataFrame[id: str, male: bool or None, age_months: float], errors by id) from a CSV
    with an id column and a sex column (any LABEL_VARIANTS spelling) and/or a chronological age in
    months (column age, age_months, chronological_age or chronological_age_months). A bone age
    column, if any, is ignored. Empty sex or age cells are None/NaN; unreadable ones are errors."""
    df = _read_table(uri_or_path, storage_options)
    id_col = _find_col(df.columns, _ID_COLUMNS)
    sex_col = _find_col(df.columns, _MALE_COLUMNS) or _find_col(df.columns, _SEX_COLUMNS)
    age_col = _find_col(df.columns, _CHRONO_AGE_COLUMNS)
    if id_col is None or (sex_col is None and age_col is None):
        raise ValueError(f"{uri_or_path}: needs an id column and a sex and/or chronological age column "
                         f"(age_months); columns found: {list(df.columns)}")
    parse_sex = _parse_male if sex_col and _norm_col(sex_col) in _MALE_COLUMNS else _parse_sex
    rows, errors = [], {}
    ids = [_label_id(v) for v in df[id_col]]
    counts = pd.Series(ids).value_counts()
    for i, rid in enumerate(ids):
        if not rid or counts[rid] > 1:
            errors[rid or f"<row {i + 2}>"] = ItemError("duplicate_id" if rid else "bad_label",
                                                        f"id {rid} is on {counts[rid]} rows" if rid else "empty id")
            continue
        raw_sex = df[sex_col].iat[i] if sex_col else ""
        male = parse_sex(raw_sex) if raw_sex else None
        if raw_sex and male is None:
            errors[rid] = ItemError("unknown_sex", f"id {rid}: {raw_sex!r}")
            continue
        age, problem = _parse_age(df[age_col].iat[i] if age_col else "", required=False)
        if problem:
            errors[rid] = ItemError("bad_label", f"id {rid}: chronological age: {problem.replace('bone age ', '')}")
            continue
        rows.append((rid, male, age))
    return pd.DataFrame(rows, columns=["id", "male", "age_months"]).astype({"id": str, "age_months": float}), errors


def _parse_age(raw: str, required: bool) -> tuple[float, str | None]:
    if raw == "" or raw.lower() in ("nan", "na", "n/a", "none", "null"):
        return math.nan, ("bone age is missing" if required else None)
    try:
        age = float(raw)
    except ValueError:
        return math.nan, f"bone age {raw!r} is not a number"
    if not math.isfinite(age) or not 0.0 <= age <= MAX_AGE_MONTHS:
        return math.nan, f"bone age {raw!r} is outside 0-{MAX_AGE_MONTHS:g} months"
    return age, None


def _parse_male(raw: str) -> bool | None:
    s = raw.lower()
    return True if s in _TRUE else False if s in _FALSE else None


def _parse_sex(raw: str) -> bool | None:
    s = raw.lower()
    return True if s in _SEX_MALE else False if s in _SEX_FEMALE else None


# --------------------------------------------------------------------------------------------
# Key points
# --------------------------------------------------------------------------------------------

# Names accepted for the three key points (after lower-casing, spaces/hyphens to "_").
KEYPOINT_ALIASES = {
    "finger_tip": ("finger_tip", "fingertip", "middle_finger_tip", "middle_fingertip", "middle_tip",
                   "tip", "middle", "middle_finger", "finger"),
    "capitate": ("capitate", "capitate_center", "capitate_centre", "cap"),
    "thumb_tip": ("thumb_tip", "thumbtip", "thumb"),
}
_ALIAS_TO_NAME = {alias: name for name, aliases in KEYPOINT_ALIASES.items() for alias in aliases}


def _keypoint_name(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    return _ALIAS_TO_NAME.get(re.sub(r"[\s\-]+", "_", text.strip().lower()))


def read_keypoints(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, ItemError]]:
    """Key point annotations as {id: float (3, 2) array of (x, y)} in KEYPOINT_NAMES order.

    Formats, recognised by content:

    * VIA 2 CSV export (``filename,file_size,file_attributes,region_count,region_id,
      region_shape_attributes,region_attributes``);
    * VIA JSON: a project (``_via_img_metadata``) or the plain per-image export
      (``{key: {"filename", "regions", ...}}``; ``regions`` as a list or VIA 1's dict);
    * plain CSV ``id,finger_tip_x,finger_tip_y,capitate_x,capitate_y,thumb_tip_x,thumb_tip_y``
      (the id column may also be called ``filename`` or ``image``; point names as in VIA).

    VIA regions: ``point`` shapes (also the centre of ``circle``/``ellipse``). The point's
    name is any region attribute value (or key) matching KEYPOINT_ALIASES. If no region of an
    image has any attribute, exactly three regions are taken in order as finger tip,
    capitate, thumb tip (the seed's annotation order). Per-image problems (missing or doubled
    point, unnamed points, bad numbers) are bad_keypoints; an id in two JSON entries or plain
    CSV rows is duplicate_id. Regions with an unrecognised name, and boxes/polygons, are
    ignored (they may be annotations for other purposes). VIA 3 projects are not read.
    """
    with fsspec.open(str(path), "rt", encoding="utf-8-sig", newline="", **dict(storage_options or {})) as f:
        text = f.read()
    if text.lstrip().startswith("{"):
        return _via_json(json.loads(text))
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    df.columns = [str(c).strip() for c in df.columns]
    if "region_shape_attributes" in df.columns and "filename" in df.columns:
        return _via_csv(df)
    return _plain_keypoints_csv(df, path)


def _via_csv(df: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, ItemError]]:
    images: dict[str, list[tuple[dict, dict]]] = {}
    order: dict[str, list[int]] = {}
    for i, row in enumerate(df.to_dict("records")):
        rid = image_id(row["filename"])
        images.setdefault(rid, [])
        order.setdefault(rid, [])
        shape = _json_cell(row.get("region_shape_attributes"))
        if not shape:  # VIA writes one row with "{}" for an image without regions
            continue
        try:
            region_index = int(row.get("region_id", i))
        except ValueError:
            region_index = i
        images[rid].append((shape, _json_cell(row.get("region_attributes")) or {}))
        order[rid].append(region_index)
    points, errors = {}, {}
    for rid, regions in images.items():
        regions = [r for _, r in sorted(zip(order[rid], regions), key=lambda t: t[0])]
        _assign_via(rid, regions, points, errors)
    return points, errors


def _json_cell(cell) -> dict | None:
    if not isinstance(cell, str) or not cell.strip():
        return None
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        return {"_unparseable": cell}
    return value if isinstance(value, dict) else None


def _via_json(obj: Any) -> tuple[dict[str, np.ndarray], dict[str, ItemError]]:
    if isinstance(obj, dict) and "_via_img_metadata" in obj:
        obj = obj["_via_img_metadata"]
    if not isinstance(obj, dict) or not all(isinstance(v, dict) and "filename" in v for v in obj.values()):
        raise ValueError("JSON is neither a VIA project (_via_img_metadata) nor a VIA per-image export")
    points, errors = {}, {}
    seen: dict[str, int] = {}
    for entry in obj.values():
        rid = image_id(entry["filename"])
        seen[rid] = seen.get(rid, 0) + 1
        regions = entry.get("regions") or []
        if isinstance(regions, dict):  # VIA 1: {"0": {...}, "1": {...}}
            regions = [regions[k] for k in sorted(regions, key=lambda k: int(k) if str(k).isdigit() else 0)]
        pairs = [(r.get("shape_attributes") or {}, r.get("region_attributes") or {}) for r in regions]
        _assign_via(rid, pairs, points, errors)
    for rid, n in seen.items():
        if n > 1:
            points.pop(rid, None)
            errors[rid] = ItemError("duplicate_id", f"id {rid} has {n} entries in the VIA file")
    return points, errors


_POINT_SHAPES = ("point", "circle", "ellipse")


def _attr_texts(attrs: dict) -> list[str]:
    """The texts of VIA region attributes that may name a point: text values, the keys of
    set attributes, and the options ticked in checkbox attributes ({"attr": {"option": true}})."""
    texts = []
    for key, value in attrs.items():
        if isinstance(value, dict):
            texts += [str(k) for k, v in value.items() if v]
        elif isinstance(value, str) and value.strip():
            texts += [value, str(key)]
        elif value is True:
            texts.append(str(key))
    return texts


def _point_of(shape: dict) -> tuple[float, float] | None:
    if shape.get("name") in _POINT_SHAPES:
        try:
            x, y = float(shape["cx"]), float(shape["cy"])
        except (KeyError, TypeError, ValueError):
            return None
        if math.isfinite(x) and math.isfinite(y):
            return x, y
    return None


def _assign_via(rid: str, regions: list[tuple[dict, dict]], points: dict, errors: dict) -> None:
    """Turn one image's VIA regions into a (3, 2) array, or record bad_keypoints."""
    if not regions:
        errors[rid] = ItemError("bad_keypoints", f"id {rid}: no regions")
        return
    for shape, _ in regions:
        if "_unparseable" in shape:
            errors[rid] = ItemError("bad_keypoints", f"id {rid}: region shape is not JSON: {shape['_unparseable'][:80]}")
            return
    # Boxes and polygons may be there for other purposes: only point-like regions count.
    regions = [(shape, attrs) for shape, attrs in regions if shape.get("name") in _POINT_SHAPES]
    any_attrs = any(_attr_texts(attrs) for _, attrs in regions)
    named: dict[str, tuple[float, float]] = {}
    ordered: list[tuple[float, float]] = []
    for shape, attrs in regions:
        xy = _point_of(shape)
        if xy is None:
            errors[rid] = ItemError("bad_keypoints", f"id {rid}: point without finite cx, cy: {shape}")
            return
        if not any_attrs:
            ordered.append(xy)
            continue
        candidates = {_keypoint_name(t) for t in _attr_texts(attrs)}
        candidates.discard(None)
        if len(candidates) > 1:
            errors[rid] = ItemError("bad_keypoints", f"id {rid}: region attributes name several points: {attrs}")
            return
        if candidates:
            name = candidates.pop()
            if name in named:
                errors[rid] = ItemError("bad_keypoints", f"id {rid}: {name} is annotated twice")
                return
            named[name] = xy
    if not any_attrs:
        if len(ordered) != 3:
            errors[rid] = ItemError("bad_keypoints", f"id {rid}: {len(ordered)} unnamed points, expected 3")
            return
        points[rid] = np.asarray(ordered, dtype=np.float64)
        return
    lacking = [n for n in KEYPOINT_NAMES if n not in named]
    if lacking:
        errors[rid] = ItemError("bad_keypoints", f"id {rid}: missing {', '.join(lacking)}")
        return
    points[rid] = np.asarray([named[n] for n in KEYPOINT_NAMES], dtype=np.float64)


def _plain_keypoints_csv(df: pd.DataFrame, path: str) -> tuple[dict[str, np.ndarray], dict[str, ItemError]]:
    id_col = _find_col(df.columns, ("id", "imageid", "filename", "image"))
    cols: dict[tuple[str, str], str] = {}
    for col in df.columns:
        m = re.fullmatch(r"(.+?)[_ ]?([xy])", col.strip(), flags=re.IGNORECASE)
        if m and (name := _keypoint_name(m.group(1))):
            cols.setdefault((name, m.group(2).lower()), col)
    needed = [(n, a) for n in KEYPOINT_NAMES for a in "xy"]
    lacking = [f"{n}_{a}" for n, a in needed if (n, a) not in cols]
    if id_col is None or lacking:
        raise ValueError(
            f"{path}: not a VIA export and not a plain key point CSV; missing "
            f"{(['id'] if id_col is None else []) + lacking}; columns found: {list(df.columns)}; expected "
            "id,finger_tip_x,finger_tip_y,capitate_x,capitate_y,thumb_tip_x,thumb_tip_y"
        )
    points, errors = {}, {}
    ids = [_label_id(v) for v in df[id_col]]
    counts = pd.Series(ids).value_counts()
    for i, rid in enumerate(ids):
        if counts[rid] > 1:
            errors[rid] = ItemError("duplicate_id", f"id {rid} is on {counts[rid]} rows")
            continue
        try:
            xy = np.array([[float(df[cols[(n, a)]].iat[i]) for a in "xy"] for n in KEYPOINT_NAMES])
        except ValueError:
            xy = None
        if xy is None or not np.isfinite(xy).all():
            errors[rid] = ItemError("bad_keypoints", f"id {rid}: missing or non-numeric coordinates")
            continue
        points[rid] = xy
    return points, errors


# The rsna-dev 21-point hand annotation: wrist, then 4 points per finger from base to tip.
HAND21_NAMES = ("wrist",) + tuple(
    f"{finger}{k}" for finger in ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")
    for k in range(1, 5)
)
# Which of them are our key points (it has no capitate).
HAND21_TO_KEYPOINTS = {"finger_tip": "middle_finger4", "thumb_tip": "thumb4"}


def read_hand21(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, tuple[float, float]]]:
    """``keypoints_hand21.csv`` as {id: {point name: (x, y)}}; points with empty cells are left out."""
    df = _read_table(path, storage_options)
    id_col = _find_col(df.columns, ("id", "imageid", "filename"))
    if id_col is None:
        raise ValueError(f"{path}: no id column; columns found: {list(df.columns)}")
    names = [c[:-2] for c in df.columns if c.endswith("_x") and f"{c[:-2]}_y" in df.columns]
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for i in range(len(df)):
        pts = {}
        for n in names:
            try:
                x, y = float(df[f"{n}_x"].iat[i]), float(df[f"{n}_y"].iat[i])
            except ValueError:
                continue
            if math.isfinite(x) and math.isfinite(y):
                pts[n] = (x, y)
        out[image_id(df[id_col].iat[i])] = pts
    return out


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with "/" (``os.path.join`` breaks ``s3://``)."""
    out = str(base)
    for part in parts:
        out = out.rstrip("/") + "/" + str(part).lstrip("/")
    return out


def open_output(uri: str, mode: str = "wb", storage_options: Mapping[str, Any] | None = None) -> IO:
    """Open a file for writing, locally (parent folders created) or on S3; use as a context manager."""
    options = dict(storage_options or {})
    fs, path = _fs(uri, options)
    if _is_local(fs) and any(c in mode for c in "wax"):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def write_bytes(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to a local path or URI in one go (parent folders created locally)."""
    with open_output(uri, "wb", storage_options) as f:
        f.write(data)


def strip_protocol(uri: str) -> str:
    """``s3://bucket/key`` → ``bucket/key`` (what pyarrow filesystems take); local paths unchanged."""
    return uri.split("://", 1)[1] if "://" in uri else uri


def arrow_location(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, Any]:
    """(path, filesystem) as pyarrow and Ray (parquet, RunConfig storage) take them: a remote URI as
    bucket/key with a filesystem built from `storage_options`, a local one as an absolute path with None
    (Ray's storage_path must be absolute)."""
    filesystem = arrow_filesystem(uri, storage_options)
    return (strip_protocol(uri), filesystem) if filesystem is not None else (os.path.abspath(uri), None)


def arrow_filesystem(uri: str, storage_options: Mapping[str, Any] | None = None):
    """A pyarrow filesystem for a remote URI, built from fsspec with the same storage options that
    every other read uses (so one endpoint/credential setting serves all); None for local paths."""
    if "://" not in uri or uri.startswith("file://"):
        return None
    import pyarrow.fs as pafs

    fs, _ = _fs(uri, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
