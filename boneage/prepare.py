"""One radiograph from file to registered frame, as plain functions: decode → hand mask and contrast →
key points → affine registration → registered image (PNG bytes at 800x1040). The Ray Data wiring
(boneage.ray_prepare) maps these over batches; they never raise for a bad item, they fill in
status/error."""

from __future__ import annotations

import io as _bytes_io
from typing import Any, Mapping

import numpy as np
from PIL import Image

from boneage import frame, io, keypoints_geometric, preprocess, register
from boneage.errors import STATUS_ERROR, STATUS_OK, ItemError

# The key point model's input: the preprocessed image resized to the frame's aspect and reduced 16x,
# as in the seed (2080x1600 / 16 = 130x100).
KEYPOINT_INPUT_HW = (frame.FRAME_H // 16, frame.FRAME_W // 16)

# Columns every registered-table row has (besides the manifest's), None where a stage did not run.
KEYPOINT_COLUMNS = tuple(f"{name}_{axis}" for name in frame.KEYPOINT_NAMES for axis in "xy")
REGISTERED_COLUMNS = (
    "height", "width", "format",
    "mask_area_fraction", "mask_doubtful",
    *KEYPOINT_COLUMNS, "keypoint_source", "keypoint_confidence",
    "transform", "mirrored", "scale", "thumb_frame_x", "thumb_frame_y", "frame_coverage",
    "registration_doubtful", "registered_png",
)


def empty_result(row: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(row)
    for col in REGISTERED_COLUMNS:
        out.setdefault(col, None)
    return out


def keypoint_input(clean: np.ndarray) -> np.ndarray:
    """uint8 (130, 100): the whole image squeezed to the frame's aspect and reduced 16x."""
    h, w = KEYPOINT_INPUT_HW
    return np.asarray(Image.fromarray(clean).resize((w, h), Image.BILINEAR, reducing_gap=2.0))


def analyse(image: np.ndarray) -> dict[str, Any]:
    """Mask, clean image and geometric key points of one decoded radiograph."""
    clean, mask, qa = preprocess.preprocess(image)
    keypoints, confidence, _ = keypoints_geometric.estimate_keypoints(mask, clean)
    return {"clean": clean, "mask": mask, "mask_qa": qa, "keypoints": keypoints, "confidence": float(confidence)}


def register_image(clean: np.ndarray, mask: np.ndarray, keypoints: np.ndarray) -> dict[str, Any]:
    """Registered image and registration QA for key points in image coordinates."""
    if not np.all(np.isfinite(keypoints)):
        raise ItemError("bad_image", "no key points found (the hand mask is empty or not hand-like)")
    matrix = register.registration_transform(keypoints)
    registered = register.warp_to_frame(clean, matrix)
    registered_mask = register.warp_to_frame(mask.astype(np.uint8) * 255, matrix)
    qa = register.registration_qa(matrix, keypoints, clean.shape, registered_mask)
    return {"registered": registered, "matrix": matrix, "qa": qa}


def encode_png(image: np.ndarray) -> bytes:
    buf = _bytes_io.BytesIO()
    # compress_level 1: ~3x faster than the default for ~10% more bytes; these are intermediate data.
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(_bytes_io.BytesIO(data)).convert("L"))


def prepare_row(row: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None,
                keypoints: np.ndarray | None = None, keypoint_source: str = "geometric") -> dict[str, Any]:
    """The registered-table row of one manifest row. `keypoints` (image coordinates), when given, are
    used instead of the geometric estimate (annotations, or the key point model's prediction)."""
    out = empty_result(row)
    if out["status"] != STATUS_OK:
        return out
    try:
        record = io.read_image(out["uri"], storage_options)
        out.update(height=record.height, width=record.width, format=record.meta["format"])
        found = analyse(record.image)
        out.update(mask_area_fraction=found["mask_qa"]["mask_area_fraction"],
                   mask_doubtful=found["mask_qa"]["mask_doubtful"])
        if keypoints is None:
            keypoints, confidence = found["keypoints"], found["confidence"]
        else:
            keypoints, confidence = np.asarray(keypoints, float), 1.0
        out.update(_keypoint_fields(keypoints), keypoint_source=keypoint_source, keypoint_confidence=confidence)
        reg = register_image(found["clean"], found["mask"], keypoints)
        out.update(transform=reg["matrix"][:2].ravel().tolist(), registered_png=encode_png(reg["registered"]),
                   **{k: reg["qa"].get(k) for k in ("mirrored", "scale", "thumb_frame_x", "thumb_frame_y",
                                                    "frame_coverage", "registration_doubtful")})
    except ItemError as err:
        out.update(status=STATUS_ERROR, error=str(err))
    except Exception as err:  # a bug or an unforeseen image must cost one row, not the run
        out.update(status=STATUS_ERROR, error=str(ItemError("processing_failed", f"{type(err).__name__}: {err}")))
    return out


def _keypoint_fields(keypoints: np.ndarray) -> dict[str, float]:
    flat = np.asarray(keypoints, float).ravel()
    return {col: (float(v) if np.isfinite(v) else None) for col, v in zip(KEYPOINT_COLUMNS, flat)}
