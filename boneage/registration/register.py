"""Registration into the frame (boneage.registration.frame): a similarity transform, mirrored when needed, that
puts the middle finger tip on FINGER_TIP_TARGET, the capitate on CAPITATE_TARGET and the thumb
on the right; the warp; registration QA; and the CPU reference of zone cropping.

Coordinates are (x, y) with pixel centres at integers (x = column index) in both the image and
the frame; a frame point p is stored at pixel p * scale.
"""

from __future__ import annotations

import numpy as np
from PIL import Image

from boneage.registration import frame
from boneage.errors import ItemError


def _similarity(src: np.ndarray, dst: np.ndarray, mirror: bool) -> np.ndarray:
    """3x3 matrix of z -> a*z + b (or a*conj(z) + b when mirrored) taking src[0], src[1] to
    dst[0], dst[1]; points as complex numbers."""
    s = src[:, 0] + 1j * src[:, 1]
    if mirror:
        s = np.conj(s)
    d = dst[:, 0] + 1j * dst[:, 1]
    a = (d[1] - d[0]) / (s[1] - s[0])
    b = d[0] - a * s[0]
    m = np.array([[a.real, -a.imag, b.real], [a.imag, a.real, b.imag], [0, 0, 1]])
    if mirror:  # conj(z) = diag(1, -1) z
        m = m @ np.diag([1.0, -1.0, 1.0])
    return m


def registration_transform(keypoints: np.ndarray) -> np.ndarray:
    """3x3 affine matrix mapping image (x, y) into frame coordinates, from key points (3, 2) in
    frame.KEYPOINT_NAMES order; ItemError('bad_keypoints') if they cannot define one. Mirrored (reflection about the frame's vertical axis) when the
    thumb would otherwise land left of the finger-capitate line."""
    kp = np.asarray(keypoints, dtype=np.float64)
    if kp.shape != (3, 2) or not np.isfinite(kp).all():
        raise ItemError("bad_keypoints", f"need finite (3, 2) key points, got {kp.tolist()}")
    if np.linalg.norm(kp[1] - kp[0]) < 1e-6:
        raise ItemError("bad_keypoints", "finger tip and capitate coincide")
    dst = np.array([frame.FINGER_TIP_TARGET, frame.CAPITATE_TARGET])
    m = _similarity(kp[:2], dst, mirror=False)
    if transform_points(m, kp[2:])[0, 0] < frame.FINGER_TIP_TARGET[0]:
        m = _similarity(kp[:2], dst, mirror=True)
    return m


def transform_points(matrix: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Points (N, 2) (x, y) mapped by the 3x3 affine `matrix`."""
    p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
    return p @ matrix[:2, :2].T + matrix[:2, 2]


def warp_to_frame(image: np.ndarray, matrix: np.ndarray, scale: float = frame.STORE_SCALE) -> np.ndarray:
    """The image resampled (bilinear) onto the frame's grid at `scale`: uint8
    (FRAME_H*scale, FRAME_W*scale), zero outside the image."""
    out_w, out_h = int(frame.FRAME_W * scale), int(frame.FRAME_H * scale)
    # output pixel -> frame -> image; PIL wants that inverse map
    inv = np.linalg.inv(np.diag([scale, scale, 1.0]) @ matrix)
    # PIL samples at pixel centres (i + 0.5); our pixel centres are integers
    lin, off = inv[:2, :2], inv[:2, 2]
    off = off + 0.5 - lin @ np.array([0.5, 0.5])
    coeffs = (lin[0, 0], lin[0, 1], off[0], lin[1, 0], lin[1, 1], off[1])
    img = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    return np.asarray(img.transform((out_w, out_h), Image.AFFINE, coeffs, resample=Image.BILINEAR, fillcolor=0))


# Plausible ranges, from the rsna-dev sample (bench/eval_registration.py): the thumb tip lands
# right of the axis between the finger tip and the capitate; the hand (tip to capitate) spans
# a sizeable part of the raw image; the hand covers a good share of the frame.
# (an abducted thumb often lies beyond the frame's right edge: that is fine)
THUMB_X_RANGE = (frame.FINGER_TIP_TARGET[0] + 150, frame.FRAME_W + 400)
THUMB_Y_RANGE = (frame.FINGER_TIP_TARGET[1] + 300, frame.CAPITATE_TARGET[1] + 200)
HAND_SPAN_RANGE = (0.35, 1.1)  # tip-capitate distance / image height
COVERAGE_RANGE = (0.25, 0.56)  # share of the frame covered by the registered hand (> : zoomed in)


def registration_qa(matrix: np.ndarray, keypoints: np.ndarray, image_shape: tuple[int, int],
                    registered_mask: np.ndarray | None = None) -> dict:
    """Sanity checks of one registration; `registration_doubtful` is True when any fails."""
    kp = np.asarray(keypoints, dtype=np.float64)
    thumb = transform_points(matrix, kp[2:])[0]
    span = float(np.linalg.norm(kp[1] - kp[0])) / image_shape[0]
    qa = {
        "scale": float(np.sqrt(abs(np.linalg.det(matrix[:2, :2])))),
        "mirrored": bool(np.linalg.det(matrix[:2, :2]) < 0),
        "thumb_frame_x": float(thumb[0]),
        "thumb_frame_y": float(thumb[1]),
        "hand_span": span,
    }
    bad = not (THUMB_X_RANGE[0] <= thumb[0] <= THUMB_X_RANGE[1])
    bad |= not (THUMB_Y_RANGE[0] <= thumb[1] <= THUMB_Y_RANGE[1])
    bad |= not (HAND_SPAN_RANGE[0] <= span <= HAND_SPAN_RANGE[1])
    if registered_mask is not None:
        cov = float(np.mean(registered_mask > 0))
        qa["frame_coverage"] = cov
        bad |= not (COVERAGE_RANGE[0] <= cov <= COVERAGE_RANGE[1])
    qa["registration_doubtful"] = bool(bad)
    return qa


def crop_zone(registered: np.ndarray, zone: frame.Zone, stored_scale: float = frame.STORE_SCALE) -> np.ndarray:
    """The zone's box cut from a registered image stored at `stored_scale`, resized (box filter
    on the exact fractional box) to the zone's input size (height, width). CPU reference of the
    GPU crop."""
    s = stored_scale
    # zone edges in stored pixel-index coordinates; PIL's box is in pixel-edge coordinates (+0.5)
    box = tuple(v * s + 0.5 for v in (zone.x0, zone.y0, zone.x0 + zone.width, zone.y0 + zone.height))
    h, w = zone.input_size
    img = Image.fromarray(np.ascontiguousarray(registered, dtype=np.uint8))
    return np.asarray(img.resize((w, h), Image.BILINEAR, box=box, reducing_gap=None))
