"""Hand mask, background removal and contrast normalisation of a raw hand radiograph.

The seed masked hands with a trained segmentation network; we have no masks for real images,
so this is a classical method tuned on the rsna-dev sample: it works on a copy reduced to
~256 px (fast, and letters/noise become small), finds the exposed field (collimation borders
are uniform regions touching the image border), thresholds the hand against the field's
background, drops thin frames and small bright markers, keeps the largest hand-like
component and upsamples the result.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage as ndi
from skimage import filters, morphology

from boneage.errors import ItemError

WORK_SIZE = 256  # long side of the working copy


def work_copy(image: np.ndarray, size: int = WORK_SIZE) -> tuple[np.ndarray, float]:
    """The image reduced (box filter) so its long side is `size`, as float32 in [0, 1];
    and the factor from full-resolution to working coordinates."""
    h, w = image.shape
    f = size / max(h, w)
    small = Image.fromarray(image).resize((max(1, round(w * f)), max(1, round(h * f))), Image.BOX)
    return np.asarray(small, dtype=np.float32) / 255.0, f


def _edt(b: np.ndarray, pad: int = 8) -> np.ndarray:
    # padded by replicating the edge: a hand cut by the image border stays touching it
    return ndi.distance_transform_edt(np.pad(b, pad, mode="edge"))[pad:-pad, pad:-pad]


# Binary morphology with a disk of radius r: through the distance transform (exact for a
# Euclidean disk, and much faster than scipy's binary morphology for larger r), except r = 2.
_DISK2 = morphology.disk(2).astype(bool)


def _erode(b: np.ndarray, r: float) -> np.ndarray:
    if r == 2:  # scipy is faster for the small disk
        return ndi.binary_erosion(np.pad(b, 3, mode="edge"), _DISK2)[3:-3, 3:-3]
    return _edt(b) > r


def _dilate(b: np.ndarray, r: float) -> np.ndarray:
    if r == 2:
        return ndi.binary_dilation(np.pad(b, 3, mode="edge"), _DISK2)[3:-3, 3:-3]
    return _edt(~b) <= r


def _open(b: np.ndarray, r: float) -> np.ndarray:
    return _dilate(_erode(b, r), r)


def _close(b: np.ndarray, r: float) -> np.ndarray:
    return _erode(_dilate(b, r), r)


def _border_touching(labels: np.ndarray) -> np.ndarray:
    ids = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    return ids[ids > 0]


def _field(g: np.ndarray) -> np.ndarray:
    """The exposed field: the image minus uniform regions (collimation, shutters) that touch the
    image border and have a straight, rectangle-like outline. Returns a bool mask."""
    h, w = g.shape
    lo, hi = np.percentile(g, [0.5, 99.5])
    dark = g < lo + 0.06 * (hi - lo)
    lab, n = ndi.label(dark)
    outside = np.isin(lab, _border_touching(lab))
    field = ~outside
    field = ndi.binary_fill_holes(_open(field, 2))
    # A field is a (rotated) rectangle; if what is left looks like a hand instead, the dark
    # region was the hand's own background and the whole image is the field.
    if field.sum() < 0.15 * h * w:
        return np.ones_like(g, bool)
    lab, n = ndi.label(field)
    if n > 1:
        sizes = ndi.sum(field, lab, range(1, n + 1))
        field = lab == 1 + int(np.argmax(sizes))
    if not _is_rectangle(field):
        return np.ones_like(g, bool)
    # keep a margin off the field edge: its penumbra is neither background nor hand
    return _erode(field, 2)


def _low_cut(v: np.ndarray) -> float:
    """A cut between background and soft tissue for values `v` of the field. Otsu splits bone
    from everything else about as often as hand from background, so take the background level
    below it and cut low, a third of the way up."""
    # burned-in markers are the brightest few percent; on faint images they would pull Otsu
    # up to split marker from everything else
    v = np.minimum(v, np.percentile(v, 97))
    if v.max() - v.min() < 1e-3:  # nothing to separate: a cut above everything
        return float(v.max()) + 1.0
    t_otsu = float(filters.threshold_otsu(v))
    bg = v[v < t_otsu]
    b = float(np.median(bg))
    noise = 1.4826 * float(np.median(np.abs(bg - b)))
    return b + min(max(0.3 * (t_otsu - b), 3 * noise), 0.6 * (t_otsu - b))


def _background_surface(g: np.ndarray, bg: np.ndarray) -> np.ndarray:
    """Least-squares quadratic surface through the background pixels `bg`: exposure falls off
    across the plate (heel effect), and on grey backgrounds that gradient is as large as the
    soft-tissue contrast."""
    h, w = g.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    xx, yy = xx / w - 0.5, yy / h - 0.5
    basis = np.stack([np.ones_like(xx), xx, yy, xx * xx, xx * yy, yy * yy], -1)
    idx = np.flatnonzero(bg.ravel())[::3]
    a = basis.reshape(-1, 6)[idx].astype(np.float64)
    coef = np.linalg.solve(a.T @ a + 1e-9 * np.eye(6), a.T @ g.ravel()[idx])
    return (basis @ coef).astype(np.float32)


def _pick_hand(b: np.ndarray) -> tuple[np.ndarray, int]:
    """The largest component; and the number of sizeable components."""
    lab, n = ndi.label(b)
    if n == 0:
        return b, 0
    sizes = ndi.sum(b, lab, range(1, n + 1))
    big = int((sizes > 0.01 * b.size).sum())
    return lab == 1 + int(np.argmax(sizes)), big


def _clean(b: np.ndarray) -> tuple[np.ndarray, int]:
    # thin frames/lines and letter strokes go; fingers (~8 px wide here) stay
    return _pick_hand(_open(b, 2))


def _segment(g: np.ndarray, field: np.ndarray) -> tuple[np.ndarray, int, float]:
    t = _low_cut(g[field])
    hand, n_big = _clean((g > t) & field)
    # second pass against a background fitted around the first mask
    bg = field & ~_dilate(hand, 4)
    if bg.sum() > 0.05 * g.size:
        r = g - _background_surface(g, bg)
        t = _low_cut(r[field])
        hand, n_big = _clean((r > t) & field)
    return hand, n_big, t


def _is_rectangle(b: np.ndarray) -> bool:
    # solidity, on every other pixel (the hull is the slow part)
    b = b[::2, ::2]
    return b.sum() > 0 and b.sum() > 0.92 * morphology.convex_hull_image(b).sum()


def _drop_thin_lines(hand: np.ndarray) -> np.ndarray:
    """Remove frame lines that survived the opening and joined the forearm: parts of the mask
    removed by a larger opening that are long and thin (mean width = area / length under 6 px,
    length over 8 widths; a finger is at most ~6 widths long)."""
    lab, n = ndi.label(hand & ~_open(hand, 4))
    if n == 0:
        return hand
    area = ndi.sum(hand, lab, range(1, n + 1))
    length = np.array([max(sl[0].stop - sl[0].start, sl[1].stop - sl[1].start) for sl in ndi.find_objects(lab)])
    width = area / length
    drop = np.r_[False, (length > 25) & (width < 6) & (length > 8 * width)]
    if not drop.any():
        return hand
    return _pick_hand(hand & ~drop[lab])[0]


def small_mask(g: np.ndarray) -> tuple[np.ndarray, dict]:
    """Hand mask of a working copy `g` (float [0,1]); and diagnostics."""
    g = np.asarray(Image.fromarray(g).filter(ImageFilter.MedianFilter(3)))
    field = _field(g)
    hand, n_big, t = _segment(g, field)
    if _is_rectangle(hand):
        # a brighter exposed field on a grey surround (light box): it is the field, not the hand
        field = _erode(hand, 4)
        hand, n_big, t = _segment(g, field)
    hand = _drop_thin_lines(hand)
    hand = ndi.binary_fill_holes(_close(hand, 2))
    info = {"threshold": t, "field_fraction": float(field.mean()), "components": n_big}
    return hand, info


def _upsample(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    # resize as a grey image and cut at the middle for a smooth outline; bilinear to twice the
    # working size, then nearest (full-size bilinear costs more than the whole mask)
    h, w = mask.shape
    m = Image.fromarray(mask.astype(np.uint8) * 255).resize((2 * w, 2 * h), Image.BILINEAR)
    m = Image.fromarray((np.asarray(m) >= 128).astype(np.uint8)).resize((shape[1], shape[0]), Image.NEAREST)
    return np.asarray(m).view(bool)


def hand_mask(image: np.ndarray) -> np.ndarray:
    """Bool mask (same shape as `image`, uint8 HxW) of the hand and forearm."""
    check_image(image)
    g, _ = work_copy(image)
    m, _ = small_mask(g)
    return _upsample(m, image.shape)


def mask_qa(mask_small: np.ndarray, info: dict) -> dict:
    """Mask QA: area fraction, component count, and a `doubtful` flag."""
    area = float(mask_small.mean())
    doubtful = not (0.08 <= area <= 0.75) or info["components"] > 2
    return {
        "mask_area_fraction": area,
        "mask_components": int(info["components"]),
        "mask_threshold": float(info["threshold"]),
        "field_fraction": float(info["field_fraction"]),
        "mask_doubtful": bool(doubtful),
    }


def apply_mask(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Background zeroed, contrast stretched by autocontrast computed within the hand only
    (the seed used PIL.ImageOps.autocontrast; equalisation over-exposes)."""
    # histogram of every other pixel in the hand: the same levels, a quarter of the work
    hist = np.bincount(image[::2, ::2][mask[::2, ::2]], minlength=256)
    if hist.sum() == 0:
        return np.zeros_like(image)
    cdf = np.cumsum(hist) / hist.sum()
    lo = int(np.searchsorted(cdf, 0.005))  # autocontrast with a 0.5% cutoff each side
    hi = int(np.searchsorted(cdf, 0.995))
    hi = max(hi, lo + 1)
    lut = np.clip((np.arange(256, dtype=np.float32) - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    out = np.array(Image.fromarray(image).point(lut.tolist()))  # PIL's LUT: faster than numpy's
    out *= np.asarray(mask, dtype=bool).view(np.uint8)
    return out


def check_image(image: np.ndarray) -> None:
    """Raise ItemError('bad_image') for what no mask can come from."""
    if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype != np.uint8:
        raise ItemError("bad_image", f"expected a uint8 HxW array, got {getattr(image, 'dtype', type(image))} "
                        f"{getattr(image, 'shape', '')}")
    if min(image.shape) < 64:
        raise ItemError("bad_image", f"too small: {image.shape}")


def preprocess(image: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict]:
    """(clean uint8, mask bool, qa dict) of a raw uint8 HxW radiograph. The mask may be wrong:
    qa['mask_doubtful'] says when it looks so. Raises ItemError('bad_image') on unusable input."""
    check_image(image)
    g, f = work_copy(image)
    m, info = small_mask(g)
    mask = _upsample(m, image.shape)
    qa = mask_qa(m, info)
    qa["work_scale"] = f
    return apply_mask(image, mask), mask, qa
