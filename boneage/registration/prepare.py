"""One radiograph from file to registered frame, as plain functions:

    analyse_row:  decode → hand mask and autocontrast → geometric key points → key point model input
    (a key point model, when there is one, predicts from `keypoint_input`: boneage.distributed.ray_keypoints)
    register_row: choose the key points → affine registration → registered image (PNG, 800x1040)

The Ray Data wiring (boneage.distributed.ray_prepare) maps these over batches. They never raise for a bad item:
they fill in status/error, and carry a failed row through unchanged."""

from __future__ import annotations

import io as _bytes_io
from typing import Any, Callable, Mapping

import numpy as np
from PIL import Image

from boneage.registration import frame, keypoints_geometric, preprocess, register
from boneage.data.images import read_image
from boneage.errors import STATUS_ERROR, STATUS_OK, ItemError

# The key point model's input: the preprocessed image squeezed to the frame's aspect and reduced 16x,
# as in the seed (2080x1600 / 16 = 130x100).
KEYPOINT_INPUT_HW = (frame.FRAME_H // 16, frame.FRAME_W // 16)

KEYPOINT_COLUMNS = tuple(f"{name}_{axis}" for name in frame.KEYPOINT_NAMES for axis in "xy")
MODEL_KEYPOINT_COLUMNS = tuple(f"model_{c}" for c in KEYPOINT_COLUMNS)
# Columns every registered-table row has (besides the manifest's), None where a stage did not run.
REGISTERED_COLUMNS = (
    "height", "width", "format", "image_sex", "image_age_months", "image_age_source",
    "mask_area_fraction", "mask_doubtful",
    *KEYPOINT_COLUMNS, "keypoint_source", "keypoint_confidence", "keypoint_disagreement",
    "transform", "mirrored", "scale", "thumb_frame_x", "thumb_frame_y", "frame_coverage",
    "registration_doubtful", "keypoint_input", "registered_png",
)
# register_row(encode=False)'s registered image: a uint8 (1040, 800) array in place of registered_png.
REGISTERED_IMAGE = "registered_image"
# In-flight arrays between analyse_row and register_row (never written out).
_CLEAN, _MASK, _GEOMETRIC, _GEOMETRIC_CONFIDENCE = "_clean", "_mask", "_geometric", "_geometric_confidence"


def keypoint_input(clean: np.ndarray) -> np.ndarray:
    """uint8 (130, 100): the whole image squeezed to the frame's aspect and reduced 16x."""
    h, w = KEYPOINT_INPUT_HW
    return np.asarray(Image.fromarray(clean).resize((w, h), Image.BILINEAR, reducing_gap=2.0))


def encode_png(image: np.ndarray, compress_level: int = 1) -> bytes:
    buf = _bytes_io.BytesIO()
    # compress_level 1: ~3x faster than the default for ~10% more bytes; these are intermediate data.
    Image.fromarray(image).save(buf, format="PNG", compress_level=compress_level)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(_bytes_io.BytesIO(data)).convert("L"))


def _fail(out: dict[str, Any], err: Exception) -> dict[str, Any]:
    if not isinstance(err, ItemError):  # a bug or an unforeseen image must cost one row, not the run
        err = ItemError("processing_failed", f"{type(err).__name__}: {err}")
    out.update(status=STATUS_ERROR, error=str(err))
    for key in (_CLEAN, _MASK, _GEOMETRIC, _GEOMETRIC_CONFIDENCE):
        out.pop(key, None)
    return out


def analyse_row(row: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None,
                fetch: Callable[[str], bytes] | None = None) -> dict[str, Any]:
    """Decode, mask, autocontrast and geometric key points of one manifest row; the clean image and
    mask travel on (under private keys) to register_row. `fetch`: reads the row's uri instead of storage
    (a DICOMweb instance: boneage.data.dicomweb.Reader)."""
    out = with_columns(row)
    if out["status"] != STATUS_OK:
        return out
    try:
        record = read_image(out["uri"], storage_options, fetch)
    except Exception as err:
        return _fail(out, err)
    return analyse_image(out, record.image, record.meta)


def with_columns(row: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of `row` with every REGISTERED_COLUMNS key after its own (None where it has none)."""
    out = dict(row)
    for col in REGISTERED_COLUMNS:
        out.setdefault(col, None)
    return out


def failed_row(row: Mapping[str, Any], err: Exception) -> dict[str, Any]:
    """`row` as a registered row that failed with `err` (an ItemError's text; anything else: processing_failed)."""
    return _fail(with_columns(row), err)


def analyse_image(row: Mapping[str, Any], image: np.ndarray, meta: Mapping[str, Any]) -> dict[str, Any]:
    """analyse_row of an image already decoded (boneage.data.images.decode_image's image and meta): the
    per-image path (boneage.score.prepare_one) decodes bytes it was given, not a file."""
    out = with_columns(row)
    if out["status"] != STATUS_OK:
        return out
    try:
        clean, mask, mask_qa = preprocess.preprocess(image)
        points, confidence, _ = keypoints_geometric.estimate_keypoints(mask, clean)
        out.update(height=int(image.shape[0]), width=int(image.shape[1]), format=meta["format"],
                   # DICOM PatientSex and age (from its dates): what scoring falls back on
                   image_sex=meta.get("sex"), image_age_months=meta.get("age_months"),
                   image_age_source=meta.get("age_source"),
                   mask_area_fraction=mask_qa["mask_area_fraction"], mask_doubtful=mask_qa["mask_doubtful"],
                   keypoint_input=encode_png(keypoint_input(clean)),
                   **{_CLEAN: clean, _MASK: mask, _GEOMETRIC: np.asarray(points, float),
                      _GEOMETRIC_CONFIDENCE: float(confidence)})
    except Exception as err:
        return _fail(out, err)
    return out


# Where the model and the geometric estimate agree within this fraction of hand length, the geometric
# one is used: it follows the mask's edge to the pixel, the model (trained on few labels) is smoother.
# Where they disagree, the geometric estimate has usually failed outright (touching fingers, frames),
# and the model is used. On rsna-dev's 27 annotated images this gave a median finger tip error of 2.1%
# of hand length with a worst case of 34%, against 2.0% / 110% geometric alone and 3.1% / 34% model
# alone (docs/benchmarks.md).
AGREE_WITHIN = 0.08


def register_row(row: Mapping[str, Any], model_keypoints: np.ndarray | None = None,
                 agree_within: float = AGREE_WITHIN, encode: bool = True) -> dict[str, Any]:
    """Choose key points (see AGREE_WITHIN; whichever comes first is replaced by the other when only
    the other's registration passes QA), register the clean image into the frame and record which key
    points were used and how sure they are. `encode` False: the registered image stays an array under
    REGISTERED_IMAGE and registered_png is None (the per-image path scores it at once: no PNG round trip)."""
    out = dict(row)
    if out["status"] != STATUS_OK:
        return out
    try:
        clean, mask = np.asarray(out.pop(_CLEAN), np.uint8), np.asarray(out.pop(_MASK), bool)
        geometric = np.asarray(out.pop(_GEOMETRIC), float).reshape(3, 2)
        geometric_confidence = float(out.pop(_GEOMETRIC_CONFIDENCE))
        candidates = [("geometric", geometric, geometric_confidence)]
        if model_keypoints is not None and np.all(np.isfinite(model_keypoints)):
            disagreement = keypoint_disagreement(model_keypoints, geometric)
            out["keypoint_disagreement"] = disagreement
            # The model's own confidence is how well the independent geometric estimate agrees with it.
            model = ("model", np.asarray(model_keypoints, float), float(np.exp(-disagreement / 0.05)))
            if disagreement < agree_within:  # both right: the geometric one is the more precise
                candidates = [("geometric", geometric, max(geometric_confidence, model[2])), model]
            else:
                candidates.insert(0, model)
        source, points, confidence, matrix = _choose(candidates, clean.shape)
        registered = register.warp_to_frame(clean, matrix)
        registered_mask = register.warp_to_frame(mask.astype(np.uint8) * 255, matrix)
        qa = register.registration_qa(matrix, points, clean.shape, registered_mask)
        out.update(dict(zip(KEYPOINT_COLUMNS, points.ravel().tolist())),
                   keypoint_source=source, keypoint_confidence=confidence,
                   transform=matrix[:2].ravel().tolist(), registered_png=encode_png(registered) if encode else None,
                   **({} if encode else {REGISTERED_IMAGE: registered}),
                   **{k: qa.get(k) for k in ("mirrored", "scale", "thumb_frame_x", "thumb_frame_y",
                                             "frame_coverage", "registration_doubtful")})
    except Exception as err:
        return _fail(out, err)
    return out


def _choose(candidates, image_shape) -> tuple[str, np.ndarray, float, np.ndarray]:
    """(source, points, confidence, transform) of the first candidate whose registration passes QA
    (before warping), else of the first usable one."""
    usable = [c for c in candidates if np.all(np.isfinite(c[1]))]
    if not usable:
        raise ItemError("bad_image", "no key points found (the hand mask is empty or not hand-like)")
    first = None
    for source, points, confidence in usable:
        matrix = register.registration_transform(points)
        first = first or (source, points, confidence, matrix)
        if not register.registration_qa(matrix, points, image_shape)["registration_doubtful"]:
            return source, points, confidence, matrix
    return first


def keypoint_disagreement(a: np.ndarray, b: np.ndarray) -> float:
    """Mean distance between two key point sets as a fraction of hand length (tip to capitate)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))):
        return float("inf")
    length = max(np.linalg.norm(a[0] - a[1]), 1.0)
    return float(np.linalg.norm(a - b, axis=1).mean() / length)


def prepare_row(row: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """analyse_row then register_row with geometric key points: the whole CPU path for one image."""
    return register_row(analyse_row(row, storage_options))
