"""Pixel values to 8 bit: the percentile window that both image files (16-bit PNG) and DICOM (without a
VOI window of their own) are mapped through, so every source reaches the pipeline on one scale; and the
pixel-count limit both decoders check from the header (check_pixel_count)."""

from __future__ import annotations

import numpy as np

from boneage.errors import ItemError

# 16-bit PNGs and DICOMs without a VOI window are mapped to uint8 linearly between these
# percentiles of their values: a plain min-max would let a few dead pixels or a burned-in
# marker squeeze the whole hand into a handful of grey levels.
WINDOW_PERCENTILES = (0.1, 99.9)


def percentile_window(arr: np.ndarray, lo_pct: float | None = None, hi_pct: float | None = None) -> np.ndarray:
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
        return np.zeros(arr.shape, np.uint8)  # constant; check_usable rejects it
    scaled = (arr.astype(np.float32) - np.float32(lo)) * np.float32(255.0 / (hi - lo))
    return np.clip(np.nan_to_num(scaled), 0, 255).round().astype(np.uint8)


def check_pixel_count(width: int, height: int, max_pixels: int | None, name: str) -> None:
    """bad_image when a header's width x height is above `max_pixels` (None: no limit)."""
    if max_pixels is not None and width * height > max_pixels:
        raise ItemError("bad_image", f"{name}: {width}x{height} px ({width * height / 1e6:.0f} Mpx) is more than "
                                     f"the {max_pixels / 1e6:g} Mpx this service accepts (serve.max_pixels_mpx)")
