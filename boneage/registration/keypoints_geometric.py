"""The three registration key points from the hand mask alone, without a trained model.

This is the fallback of the key point CNN and the source of its pseudo-labels. On a copy of the
mask reduced to ~256 px: the forearm is where the mask meets the image border; the geodesic
distance from there inside the mask peaks at the five fingertips, which the mask's outline
visits in anatomical order; the thumb is the end finger that stands apart with the deeper web,
the middle finger the third from it; the capitate lies below the tip, towards the webs beside
the middle finger and the palm centre, at a calibrated multiple of the tip-web and tip-palm
distances.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi
from scipy.signal import find_peaks
from skimage import graph, measure

from boneage.registration.frame import KEYPOINT_NAMES

WORK_SIZE = 256
# capitate = tip + CAPITATE_K * |web midpoint - tip| towards the palm; calibrated on the 38 images registered by
# the 2017 pipeline (bench/eval_registration.py prints the calibration)
CAPITATE_K = 2.13
CAPITATE_K_PALM = 1.215  # the same, as multiple of the tip-palm centre distance


def _small(mask: np.ndarray, size: int = WORK_SIZE) -> tuple[np.ndarray, int]:
    """Every s-th pixel of the mask (s so the long side is ~size): free, and the mask's outline
    is smooth enough at that scale. Small pixel i sits at full-size pixel s//2 + s*i."""
    s = max(1, round(max(mask.shape) / size))
    return mask[s // 2 :: s, s // 2 :: s].astype(bool), s


def _entry(m: np.ndarray) -> np.ndarray:
    """Pixels where the forearm leaves the image: the longest run of mask pixels along the
    image border (fingers touching the border are narrower). Empty if the mask is inside."""
    band = np.zeros_like(m)
    band[:3], band[-3:], band[:, :3], band[:, -3:] = True, True, True, True
    lab, n = ndi.label(m & band)
    if n == 0:
        return np.zeros((0, 2), int)
    sizes = ndi.sum(np.ones_like(m), lab, range(1, n + 1))
    return np.argwhere(lab == 1 + int(np.argmax(sizes)))


def _outline(m: np.ndarray) -> np.ndarray:
    """The mask's longest outline as (row, col) points in order."""
    cs = measure.find_contours(np.pad(m, 1).astype(np.float32), 0.5)
    c = max(cs, key=len) - 1.0
    return c


def _thumb_score(feat: tuple[float, float, float]) -> float:
    # the thumb stands apart from its neighbour (tip distance in palm radii) and its web is
    # deeper (geodesic distance of the web, as a share of the longest); both counted
    sep, web_g, tip_g = feat
    return sep - 2.0 * web_g


def estimate_keypoints(mask: np.ndarray, image: np.ndarray | None = None):
    """Key points (3, 2) float (x, y) in `mask`'s pixel coordinates, in KEYPOINT_NAMES order
    (middle finger tip, capitate, thumb tip); a confidence in [0, 1]; an info dict.
    `image` is accepted for a future intensity-based refinement and not used yet."""
    m, stride = _small(mask)

    def to_image(rc: np.ndarray) -> np.ndarray:  # small (row, col) -> image (x, y)
        return rc[..., ::-1] * stride + stride // 2

    info: dict = {"n_tips": 0}
    if m.sum() < 100:
        return np.full((3, 2), np.nan), 0.0, {**info, "reason": "empty mask"}
    lab, n = ndi.label(m)
    if n > 1:
        m = lab == 1 + int(np.argmax(ndi.sum(m, lab, range(1, n + 1))))
    dt = ndi.distance_transform_edt(m)
    palm_r = float(dt.max())
    palm = np.array(np.unravel_index(int(np.argmax(dt)), m.shape), float)

    entry = _entry(m)
    if len(entry) < 1.0 * palm_r:
        # no forearm at the border: start from the thick end farthest from the palm centre
        far = np.argwhere(m & (dt > 0.5 * palm_r))
        entry = far[np.argsort(((far - palm) ** 2).sum(1))[-5:]]
        info["entry"] = "inside"
    else:
        info["entry"] = "border"

    costs = np.where(m, 1.0, np.inf)
    geo, _ = graph.MCP_Geometric(costs).find_costs([tuple(p) for p in entry])
    geo = np.where(m & np.isfinite(geo), geo, 0.0)
    gmax = float(geo.max())
    # the palm centre proper: the widest point away from the forearm's cut (a bright wedge or
    # frame joined to the forearm can be wider than the palm)
    away = m & (geo > 0.3 * gmax)
    if away.any():
        palm = np.array(np.unravel_index(int(np.argmax(np.where(away, dt, 0))), m.shape), float)
    # the outline runs between pixels: read each point from the mask pixels next to it
    geo = ndi.maximum_filter(geo, 3)

    # geodesic distance along the outline, started at its point nearest the forearm
    c = _outline(m)
    ci = np.clip(np.round(c).astype(int), 0, np.array(m.shape) - 1)
    prof = geo[ci[:, 0], ci[:, 1]]
    start = int(np.argmin(prof))
    c, prof = np.roll(c, -start, 0), np.roll(prof, -start)
    prof_s = ndi.uniform_filter1d(prof, 3, mode="wrap")
    peaks, props = find_peaks(prof_s, prominence=0.08 * gmax, distance=max(3, palm_r / 3))
    if len(peaks) > 5:  # keep the five most prominent, in outline order
        keep = np.sort(np.argsort(props["prominences"])[-5:])
        peaks = peaks[keep]
    info["n_tips"] = int(len(peaks))
    if len(peaks) < 2:
        return np.full((3, 2), np.nan), 0.0, {**info, "reason": "no fingers found"}

    def web(a: int, b: int) -> int:
        """Outline index of the deepest point between peaks a and b (outline order)."""
        return a + int(np.argmin(prof_s[a : b + 1]))

    tips = list(peaks)

    def end_features(e: int, n: int, w: int) -> tuple[float, float, float]:
        return (float(np.linalg.norm(c[e] - c[n])) / palm_r, prof_s[w] / gmax, prof_s[e] / gmax)

    fe = [end_features(tips[0], tips[1], web(tips[0], tips[1])),
          end_features(tips[-1], tips[-2], web(tips[-2], tips[-1]))]
    info["end_features"] = fe
    if _thumb_score(fe[1]) > _thumb_score(fe[0]):
        tips = tips[::-1]
    thumb = tips[0]
    others = tips[1:]
    # middle finger: the third from the thumb when all five are apart; else the farthest tip
    if len(tips) == 5:
        middle = tips[2]
    else:
        middle = max(others, key=lambda i: prof_s[i])
    k = tips.index(middle)
    lo, hi = sorted((tips[k - 1], middle)), sorted((middle, tips[k + 1])) if k + 1 < len(tips) else None
    webs = [web(*lo)] + ([web(*hi)] if hi else [])
    base = c[webs].mean(0)
    tip_rc = c[middle]
    thumb_rc = c[thumb]
    # capitate: CAPITATE_K finger lengths below the tip, in the mean direction of the webs'
    # midpoint and the palm centre (either alone is off by a few degrees more often)
    finger = base - tip_rc
    length = float(np.linalg.norm(finger))
    to_palm = palm - tip_rc
    palm_dist = max(float(np.linalg.norm(to_palm)), 1e-6)
    u = finger / max(length, 1e-6) + to_palm / palm_dist
    # two estimates of the tip-capitate distance; webs of touching fingers are found too far
    # out, so when they disagree, trust the palm centre
    d_web, d_palm = CAPITATE_K * length, CAPITATE_K_PALM * palm_dist
    agree = abs(d_web / d_palm - 1) < 0.15
    dist = 0.5 * (d_web + d_palm) if agree else d_palm
    cap_rc = tip_rc + dist * u / max(float(np.linalg.norm(u)), 1e-6)

    kp_rc = np.stack([tip_rc, cap_rc, thumb_rc])
    kp = to_image(kp_rc)

    # confidence: five separate fingers, a longest finger in the middle, a plausible thumb
    conf = 1.0
    if len(tips) != 5:
        conf *= 0.5
    if prof_s[middle] < 0.97 * max(prof_s[i] for i in others):
        conf *= 0.7
    finger_len = float(np.linalg.norm(base - tip_rc))
    hand_len = float(np.linalg.norm(cap_rc - tip_rc))
    thumb_dist = float(np.linalg.norm(thumb_rc - tip_rc)) / max(hand_len, 1e-6)
    if not 0.3 < thumb_dist < 1.2:
        conf *= 0.5
    if len(hi or []) == 0:
        conf *= 0.7
    if not agree:
        conf *= 0.7
    info.update(
        entry_points=int(len(entry)),
        palm_xy=to_image(palm).tolist(),
        web_mid_xy=to_image(base).tolist(),
        palm_radius=palm_r * stride,
        finger_length=finger_len * stride,
        thumb_to_tip=thumb_dist,
        tips_xy=to_image(np.asarray([c[i] for i in tips])).tolist(),
        keypoint_names=KEYPOINT_NAMES,
    )
    return kp, float(conf), info
