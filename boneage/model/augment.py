"""Zone crops with random affine augmentation, cut on the device from a resident uint8 bank.

One `affine_grid` + `grid_sample` call per batch does crop, rotation, shift, zoom and the
resize to the model's input size: far cheaper than a CPU loader (see DESIGN.md, GPU section).

Geometry: a box (x0, y0, width, height) is given in frame coordinates (1600x2080). The bank may
hold the frame at any resolution (1040x800 registered images, 130x100 key point inputs, tiny test
banks): grid_sample's normalised coordinates span the whole image whatever its size, so a box
maps to the same place at every resolution. align_corners=False throughout: pixel k covers
[k, k+1), so output pixel j of a box is centred at x0 + (j + 0.5) * width / w in the frame.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from boneage.registration.frame import FRAME_H, FRAME_W


@dataclass(frozen=True)
class Augment:
    """Ranges of the random affine and intensity jitter (uniform in +-range)."""

    rotate_deg: float = 10.0
    shift: float = 0.05  # fraction of the box's width / height
    zoom: float = 0.10  # scale factor in [1 - zoom, 1 + zoom]; > 1 zooms in
    brightness: float = 0.10  # added, on the [0, 1] intensity scale
    contrast: float = 0.20  # gain in [1 - contrast, 1 + contrast]


NO_AUGMENT = Augment(0.0, 0.0, 0.0, 0.0, 0.0)


@dataclass(frozen=True)
class View:
    """One fixed geometric jitter of the crop box (test-time augmentation): rotation in degrees, shift
    as a fraction of the box's width / height, scale factor (> 1 zooms in). Inside the training
    augmentation's ranges (Augment: +-10 degrees, +-5 %, +-10 %), so every view is a crop the models
    were trained on."""

    rotate_deg: float = 0.0
    shift_x: float = 0.0
    shift_y: float = 0.0
    zoom: float = 1.0


# The views of test-time augmentation (cv.tta_views = n uses the first n): the plain crop, then
# symmetric pairs (zoom in/out, left/right, up/down, turned either way), so that any odd n is balanced.
# No flips: registered hands all face one way (thumb on the right), a mirrored hand is another anatomy.
TTA_VIEWS = (
    View(),
    View(zoom=1.05), View(zoom=0.95),
    View(shift_x=0.03), View(shift_x=-0.03),
    View(shift_y=0.03), View(shift_y=-0.03),
    View(rotate_deg=4.0), View(rotate_deg=-4.0),
)


def tta_views(n: int) -> tuple[View, ...]:
    """The first n test-time views (n = 1: the plain crop alone)."""
    if not 1 <= n <= len(TTA_VIEWS):
        raise ValueError(f"test-time views must be 1..{len(TTA_VIEWS)}, got {n}")
    return TTA_VIEWS[:n]


# The pooled float bank is pooled once and kept (per bank and factor) instead of per batch: pooling
# the whole 1040x800 image of every batch was most of a small CPU trial's time (the same crops, 10-60x
# faster to cut; docs/benchmarks.md). On a GPU, where per-batch pooling is cheap and memory dearer,
# only from 4x (the pooled float bank then takes at most a quarter of the uint8 bank's bytes).
def _cache_pooling(bank: torch.Tensor, k: int) -> bool:
    return k >= 4 or (k >= 2 and bank.device.type == "cpu")


_POOLED: dict[tuple[int, int], tuple[weakref.ref, torch.Tensor]] = {}


def pooled_bank(bank: torch.Tensor, k: int, chunk: int = 64) -> torch.Tensor:
    """avg_pool2d(bank.float(), k), computed once per (bank, k) while the bank lives."""
    key = (id(bank), k)
    hit = _POOLED.get(key)
    if hit is not None and hit[0]() is bank:
        return hit[1]
    for stale in [key for key, (ref, _) in _POOLED.items() if ref() is None]:
        del _POOLED[stale]
    pooled = torch.cat([F.avg_pool2d(bank[i : i + chunk].float(), k) for i in range(0, len(bank), chunk)])
    _POOLED[key] = (weakref.ref(bank), pooled)
    return pooled


def _uniform(n, generator, device) -> torch.Tensor:
    """n draws in [-1, 1)."""
    return torch.rand(n, generator=generator, device=device) * 2 - 1


class ZoneSampler:
    """Cuts `box` from bank images into (B, 1, h, w) float crops scaled to about [-1, 1]."""

    def __init__(self, box, out_size, augment: Augment = Augment(), frame_size=(FRAME_W, FRAME_H)):
        self.x0, self.y0, self.bw, self.bh = (float(v) for v in box)
        self.out_h, self.out_w = (int(v) for v in out_size)
        self.augment = augment
        self.frame_w, self.frame_h = (float(v) for v in frame_size)

    def theta(self, n: int, device, generator=None, train=False, view: View | None = None) -> torch.Tensor:
        """(n, 2, 3) affine maps from output to source normalised coordinates: random in training, the
        plain box otherwise, or the fixed jitter `view` (test-time augmentation; not with train)."""
        if view is not None and train:
            raise ValueError("a fixed view is for inference; training draws its own jitter")
        a = self.augment if train else NO_AUGMENT
        rnd = (lambda: _uniform(n, generator, device)) if train else (lambda: torch.zeros(n, device=device))
        if view is None:
            angle = rnd() * math.radians(a.rotate_deg)
            zoom = 1 + rnd() * a.zoom
            tx, ty = rnd() * a.shift * self.bw, rnd() * a.shift * self.bh
        else:
            def fixed(value: float) -> torch.Tensor:
                return torch.full((n,), float(value), device=device)
            angle, zoom = fixed(math.radians(view.rotate_deg)), fixed(view.zoom)
            tx, ty = fixed(view.shift_x * self.bw), fixed(view.shift_y * self.bh)
        # Rotate and zoom in frame pixels (isotropic), then go to normalised coordinates, which
        # stretch x and y differently.
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        hx, hy = self.bw / 2, self.bh / 2  # output u in [-1, 1] spans the box's half-size
        sx, sy = 2 / self.frame_w, 2 / self.frame_h
        cx, cy = self.x0 + hx + tx, self.y0 + hy + ty
        row0 = torch.stack([sx * cos * hx, -sx * sin * hy, sx * cx - 1], dim=1)
        row1 = torch.stack([sy * sin * hx, sy * cos * hy, sy * cy - 1], dim=1)
        return torch.stack([row0, row1], dim=1)

    def _pool_factor(self, h: int, w: int) -> int:
        # Average-pool first when the crop shrinks the source >= 2x (zone A: 2x, key points: 8x),
        # so bilinear sampling does not skip pixels (aliasing). Powers of two that divide the
        # image keep its extent, hence the geometry, unchanged.
        step = min(self.bw / self.out_w * w / self.frame_w, self.bh / self.out_h * h / self.frame_h)
        k = 1
        while 2 * k <= step + 1e-6 and h % (2 * k) == 0 and w % (2 * k) == 0:
            k *= 2
        return k

    @torch.no_grad()
    def sample(self, bank: torch.Tensor, idx: torch.Tensor, generator=None, train=False, view: View | None = None):
        """Crops of bank[idx] and the thetas used. bank: (N, 1, H, W) uint8 on any device; view: a fixed
        test-time jitter of the box (None: the plain box, or a random one in training)."""
        if bank.dtype != torch.uint8 or bank.dim() != 4 or bank.shape[1] != 1:
            raise ValueError(f"bank must be (N, 1, H, W) uint8, got {tuple(bank.shape)} {bank.dtype}")
        idx = idx.to(bank.device)
        n, dev = idx.numel(), bank.device
        theta = self.theta(n, dev, generator, train, view)
        k = self._pool_factor(*bank.shape[-2:])
        if _cache_pooling(bank, k):
            x = pooled_bank(bank, k)[idx]
        else:
            x = bank[idx].float()  # only this batch is ever float: the bank stays uint8
            if k > 1:
                x = F.avg_pool2d(x, k)
        grid = F.affine_grid(theta, [n, 1, self.out_h, self.out_w], align_corners=False)
        # Outside the image is 0, as the background that masking zeroed.
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if train and (self.augment.brightness or self.augment.contrast):
            gain = 1 + _uniform(n, generator, dev).view(n, 1, 1, 1) * self.augment.contrast
            bias = _uniform(n, generator, dev).view(n, 1, 1, 1) * self.augment.brightness
        else:
            gain, bias = 1.0, 0.0
        # [0, 255] -> [0, 1] -> jitter -> [-1, 1], in one fused expression.
        return x * (gain * (2 / 255)) + (2 * bias - 1), theta

    def __call__(self, bank, idx, generator=None, train=False, view: View | None = None) -> torch.Tensor:
        return self.sample(bank, idx, generator, train, view)[0]


def points_to_output(theta: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Move (B, K, 2) points, (x, y) in [0, 1] of the source image, to [0, 1] of the crop."""
    a, t = theta[:, :, :2], theta[:, :, 2:]
    src = points * 2 - 1  # normalised source coordinates
    out = torch.linalg.solve(a, src.transpose(1, 2) - t)  # invert n = A u + t
    return (out.transpose(1, 2) + 1) / 2


def keypoint_sampler(augment: Augment | None = None, out_size=(FRAME_H // 16, FRAME_W // 16)):
    """The whole frame reduced 16x, as the key point net sees it; no intensity jitter by default."""
    augment = augment or Augment(rotate_deg=15.0, shift=0.05, zoom=0.10, brightness=0.0, contrast=0.0)
    return ZoneSampler((0, 0, FRAME_W, FRAME_H), out_size, augment)
