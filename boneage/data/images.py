"""Radiographs: which files of a source are images, what each one's id is, and decoding one into a
uint8 grayscale array with bone bright.

Listing
    :func:`list_inputs` finds the inputs of a folder, ``s3://`` prefix, ``.txt`` list or list of
    paths, each with its id; :func:`list_images` gives just their URIs.
Ids
    An image's id is its path relative to the input root without the image extension
    (:func:`relative_id`): ``IM0001`` for ``ROOT/IM0001.dcm``, ``patientA/study1/IM0001`` for
    ``ROOT/patientA/study1/IM0001.dcm``. A flat folder (the RSNA layout) therefore keeps the file stems
    as ids, and two PACS studies that both hold an ``IM0001.dcm`` keep apart. The id depends only on the
    file's own path, never on which other files are there, so it is stable across reruns.
Decoding
    :func:`read_image` reads and decodes one file into an :class:`ImageRecord` (uint8 grayscale HxW,
    plus a small meta dict, see :data:`META_KEYS`); :func:`decode_image` decodes bytes already in
    memory; DICOM goes to boneage.data.dicom.

Per-item problems become :class:`boneage.errors.ItemError` (one bad image never stops a run).
"""

from __future__ import annotations

import io
import os
import posixpath
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import fsspec
import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from boneage.config import absolute
from boneage.errors import ItemError, MissingInput, UserError, short
from boneage.data.pixels import check_pixel_count, percentile_window
from boneage.data.storage import filesystem, is_absolute, is_local, join_uri, read_bytes, with_protocol

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
MIN_SIDE = 64  # smaller than this on either side is not a usable hand radiograph

DICOM_MAGIC_OFFSET = 128  # Part 10 files: 128-byte preamble, then b"DICM"

# Threads for the small reads of listing (DICOM marker sniffing, subfolder listings): they wait on
# the store, not the CPU, and an S3 prefix of 100,000 extension-less files is 100,000 round trips.
LISTING_THREADS = 32


# --------------------------------------------------------------------------------------------
# Ids and listing
# --------------------------------------------------------------------------------------------


def _strip_image_extension(name: str) -> str:
    root, ext = posixpath.splitext(name)
    return root if ext.lower() in IMAGE_EXTENSIONS else name


def image_id(uri: str) -> str:
    """A file's name without a known image extension (the id of a file at the input root).

    Only the extensions in IMAGE_EXTENSIONS are removed (case-insensitively), so a DICOM named
    by its UID, ``1.2.840.113619.2.55``, keeps its whole name.
    """
    return _strip_image_extension(posixpath.basename(str(uri).rstrip("/").replace("\\", "/")))


def relative_id(path: str) -> str:
    """The id of the file at `path` relative to the input root: the path with "/" separators, without
    a leading "./" and without a known image extension. ``patientA/study1/IM0001.dcm`` ->
    ``patientA/study1/IM0001``; ``1377.png`` -> ``1377``."""
    path = str(path).replace("\\", "/").strip().strip("/")
    while path.startswith("./"):
        path = path[2:]
    return _strip_image_extension(path)


@dataclass(frozen=True)
class InputFile:
    """One input: where it is (`uri`), its path relative to the input root (`path`), and its id."""

    uri: str
    path: str
    id: str


def _looks_like_dicom(fs, path: str) -> bool:
    try:  # a ranged read: fs.open() would fetch a whole read-ahead block from S3
        head = fs.cat_file(path, start=0, end=DICOM_MAGIC_OFFSET + 4)
    except OSError:
        return False
    return head[DICOM_MAGIC_OFFSET:] == b"DICM"


def _find(fs, root: str, recursive: bool) -> list[str]:
    """Every file under `root`; on a remote store the first-level subfolders are listed in parallel
    (one paginated listing per folder: a PACS export is many folders of a few files)."""
    if not recursive:
        return fs.find(root, maxdepth=1)
    if is_local(fs):
        return fs.find(root)
    top = fs.ls(root, detail=True)
    files = [e["name"] for e in top if e["type"] != "directory"]
    folders = [e["name"] for e in top if e["type"] == "directory"]
    with ThreadPoolExecutor(min(LISTING_THREADS, max(1, len(folders)))) as pool:
        for found in pool.map(fs.find, folders):
            files += found
    return files


def _common_root(uris: list[str]) -> str:
    """The deepest folder holding every one of `uris` (a list's root, for ids)."""
    protocols = {u.split("://", 1)[0] if "://" in u else "" for u in uris}
    if len(protocols) != 1:
        return ""
    (protocol,) = protocols
    paths = [u.split("://", 1)[1] if protocol else u for u in uris]
    root = posixpath.commonpath([posixpath.dirname(p) for p in paths]) if paths else ""
    return f"{protocol}://{root}" if protocol else root


def _with_ids(uris: Iterable[str], root: str) -> list[InputFile]:
    out = []
    for uri in sorted(set(uris)):
        inside = root and uri.startswith(root.rstrip("/") + "/")
        path = uri[len(root.rstrip("/")) + 1:] if inside else uri.split("://", 1)[-1].lstrip("/")
        out.append(InputFile(uri=uri, path=path, id=relative_id(path)))
    return out


def list_inputs(
    source: str | os.PathLike | Iterable[str],
    recursive: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> list[InputFile]:
    """The images of a source, sorted by URI, each with its path relative to the source's root and
    its id (:func:`relative_id` of that path).

    ``source`` is one of:

    * a folder or ``s3://bucket/prefix`` (the root): files whose extension is one of
      IMAGE_EXTENSIONS (any case), plus files with no extension or a numeric one (``IM0001``,
      ``1.2.840.113619.2.55``: PACS exports name DICOMs so) that carry the DICOM marker
      (``DICM`` at byte 128; one small read per such file, LISTING_THREADS at a time). Hidden files
      (``.*``, which includes macOS ``._x.png`` resource forks) are skipped. Subfolders are searched
      if ``recursive``.
    * a ``.txt`` file (local or remote): one path/URI per line; blank lines and ``#`` comments
      are ignored.
    * a list of paths/URIs.

    The root of a list (or .txt) is the deepest folder that holds all its entries. Explicitly named
    files (list or .txt) are kept without any filtering, so that a missing or bad one becomes an error
    row later instead of disappearing. Relative local paths are made absolute (Ray workers may run
    elsewhere than the current directory): in a .txt file relative to the .txt file's folder, in a list
    relative to the current directory. A file named twice is listed once.
    """
    if not isinstance(source, (str, os.PathLike)):
        uris = {absolute(str(s)) for s in source}
        return _with_ids(uris, _common_root(sorted(uris)))
    source = str(source)
    if source.lower().endswith(".txt"):
        try:
            with fsspec.open(source, "rt", encoding="utf-8-sig", **dict(storage_options or {})) as f:
                lines = [line.strip() for line in f]
        except FileNotFoundError:
            raise MissingInput(f"no such list: {source}") from None
        base = source.rsplit("/", 1)[0] if "/" in source else "."
        entries = {line for line in lines if line and not line.startswith("#")}
        uris = {e if is_absolute(e) else absolute(join_uri(base, e)) for e in entries}
        return _with_ids(uris, _common_root(sorted(uris)))

    fs, root = filesystem(source, storage_options)
    fs.invalidate_cache(root)  # s3fs caches listings per process; a re-listing must see new files
    if not fs.isdir(root):
        if fs.exists(root):
            raise UserError(f"{source} is a file; give a folder, a prefix, a list or a .txt list")
        raise MissingInput(f"no such folder or prefix: {source}")
    found, sniff = [], []
    for path in _find(fs, root, recursive):
        name = posixpath.basename(path)
        if name.startswith("."):
            continue
        ext = posixpath.splitext(name)[1].lower()
        if ext in IMAGE_EXTENSIONS:
            found.append(path)
        elif ext == "" or ext[1:].isdigit():
            # PACS exports name DICOMs by number or UID ("IM0001", "1.2.840.113619.2.55"): files
            # without a word extension are opened and kept if they carry the DICOM marker.
            sniff.append(path)
    if sniff:
        with ThreadPoolExecutor(min(LISTING_THREADS, len(sniff))) as pool:
            marked = list(pool.map(lambda p: _looks_like_dicom(fs, p), sniff))
        found += [p for p, ok in zip(sniff, marked) if ok]
        if skipped := [p for p, ok in zip(sniff, marked) if not ok]:
            # Not silent: an empty or broken DICOM without an extension cannot be told from a README.
            print(f"[list] {len(skipped)} file(s) under {source} skipped: no image extension and no DICOM "
                  f"marker, e.g. {with_protocol(fs, skipped[0])} (name files in a .txt list to get an error "
                  "row for each)", flush=True)
    root_uri = with_protocol(fs, root.rstrip("/"))
    return _with_ids((with_protocol(fs, p) for p in found), root_uri)


def list_images(
    source: str | os.PathLike | Iterable[str],
    recursive: bool = True,
    storage_options: Mapping[str, Any] | None = None,
) -> list[str]:
    """The URIs of :func:`list_inputs`, sorted and without duplicates, the same on every run."""
    return [f.uri for f in list_inputs(source, recursive, storage_options)]


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
    "synthetic",  # True for a PNG written by `boneage synth` (its Software text chunk), else False
)


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
    if data[DICOM_MAGIC_OFFSET : DICOM_MAGIC_OFFSET + 4] == b"DICM":
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


def read_image(uri: str, storage_options: Mapping[str, Any] | None = None,
               fetch: Callable[[str], bytes] | None = None) -> ImageRecord:
    """Read and decode one image, or raise ItemError. See :func:`decode_image`. `fetch`: what reads the
    bytes of `uri` instead of storage (boneage.data.dicomweb.Reader for a DICOMweb instance)."""
    data = fetch(uri) if fetch is not None else read_bytes(uri, storage_options)
    image, meta = decode_image(data, str(uri))
    return ImageRecord(id=image_id(uri), uri=str(uri), image=image, meta=meta)


def decode_image(data: bytes, name: str, max_pixels: int | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    """Decode PNG, JPEG or DICOM bytes to (uint8 HxW array, meta) or raise ItemError. `max_pixels`: an
    image whose header says it has more pixels is a bad_image before anything is decoded (the service's
    limit, serve.max_pixels_mpx; None: only PIL's decompression-bomb limit).

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
    meta.update(format=kind, window="none", inverted=False, n_frames=1, synthetic=is_synthetic(data))
    if kind == "dicom":
        from boneage.data import dicom  # imported here: only DICOM inputs pay for pydicom

        image = dicom.decode_dicom(data, name, meta, max_pixels)
    else:
        image = _decode_pil(data, name, kind, meta, max_pixels)
    check_usable(image, name)
    return image, meta


def _decode_pil(data: bytes, name: str, kind: str, meta: dict, max_pixels: int | None = None) -> np.ndarray:
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
            check_pixel_count(*im.size, max_pixels, name)  # from the header: nothing decoded yet
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
        raise ItemError("bad_image", f"{name}: {short(e)}") from e
    except Exception as e:  # OSError, SyntaxError (PIL's "broken PNG"), ValueError, EOFError...
        if "truncated" in str(e).lower() or isinstance(e, EOFError):
            raise ItemError("truncated", f"{name}: {short(e)}") from e
        raise ItemError("corrupt_image", f"{name}: {short(e)}") from e


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
        return percentile_window(arr)
    # RGB, RGBA, P, PA, CMYK, YCbCr, 1: PIL's convert('L') is ITU-R 601 luma and drops alpha.
    meta["orig_dtype"] = "uint8"
    meta["window"] = "luminance"
    return np.asarray(im.convert("L"), dtype=np.uint8).copy()


def check_usable(image: np.ndarray, name: str) -> None:
    if image.ndim != 2:
        raise ItemError("bad_image", f"{name}: expected one grayscale plane, got shape {image.shape}")
    h, w = image.shape
    if min(h, w) < MIN_SIDE:
        raise ItemError("bad_image", f"{name}: {w}x{h} px is smaller than {MIN_SIDE} px on a side")
    if int(image.max()) == int(image.min()):
        raise ItemError("bad_image", f"{name}: constant image (all pixels {int(image.min())})")


# --------------------------------------------------------------------------------------------
# Synthetic or real
# --------------------------------------------------------------------------------------------

# `boneage synth` (boneage.data.synth) writes this, then its version, in every PNG's Software text chunk.
SYNTH_SOFTWARE = "boneage synth"
HEAD_BYTES = 4096  # the chunks before the pixel data: PIL writes text chunks right after the header


def png_text(data: bytes) -> dict[str, str]:
    """The tEXt chunks (keyword: text, Latin-1) of PNG bytes before the first IDAT: `data` may be just
    the file's head. Empty for anything that is not a PNG."""
    if not data.startswith(_PNG_MAGIC):
        return {}
    found, pos = {}, len(_PNG_MAGIC)
    while pos + 8 <= len(data):
        length, kind = int.from_bytes(data[pos:pos + 4], "big"), data[pos + 4:pos + 8]
        if kind in (b"IDAT", b"IEND") or pos + 8 + length > len(data):
            break
        if kind == b"tEXt":
            keyword, _, text = data[pos + 8:pos + 8 + length].partition(b"\0")
            found[keyword.decode("latin-1")] = text.decode("latin-1")
        pos += 12 + length  # length, type, data, CRC
    return found


def is_synthetic(data: bytes) -> bool:
    """Whether image bytes (or a file's first HEAD_BYTES) are a radiograph written by `boneage synth`."""
    return png_text(data).get("Software", "").startswith(SYNTH_SOFTWARE)


def count_synthetic(uris: Iterable[str], storage_options: Mapping[str, Any] | None = None,
                    limit: int | None = None) -> dict[str, int]:
    """How many of `uris` (at most `limit`, evenly spread over them) were written by `boneage synth`:
    {"checked": files whose head could be read, "synthetic": those marked}; one small read per file,
    LISTING_THREADS at a time. A file that cannot be read, or whose head is no image's (not PNG with
    its header, JPEG or DICOM), is not counted: it is no real radiograph either (decoding reports it)."""
    uris = list(uris)
    if limit is not None and len(uris) > limit:
        uris = [uris[int(i)] for i in np.linspace(0, len(uris) - 1, limit)]

    def one(uri: str) -> bool | None:
        try:
            fs, path = filesystem(uri, storage_options)
            with fs.open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
        except Exception:  # missing, a folder, unreadable: its own error row says why
            return None
        kind = sniff_format(head)
        if kind is None or (kind == "png" and head[12:16] != b"IHDR"):
            return None
        return is_synthetic(head)

    with ThreadPoolExecutor(max(1, min(LISTING_THREADS, len(uris)))) as pool:
        marks = [m for m in pool.map(one, uris) if m is not None]
    return {"checked": len(marks), "synthetic": int(sum(marks))}


def data_kind(counts: Mapping[str, int]) -> str:
    """'synthetic' (every checked file made by `boneage synth`), 'real' (none), 'mixed', or 'unknown'
    (nothing checked), from count_synthetic's counts."""
    if not counts.get("checked"):
        return "unknown"
    if counts["synthetic"] == counts["checked"]:
        return "synthetic"
    return "real" if counts["synthetic"] == 0 else "mixed"
