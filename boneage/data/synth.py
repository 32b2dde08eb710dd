"""Synthetic left-hand PA radiographs whose anatomy follows bone age and sex.

The embedded default data set: with no real data, key point training, registration and zone
CNN training all run on these images, so age has to be readable from what survives
registration (which fixes the finger tip to capitate distance): the number and size of the
carpal ossification centres, epiphysis width relative to its metaphysis, physeal fusion, the
width/length ratio of the tubular bones and the joint spacing, never from hand size alone.

Layout of this module:

1. Maturity: bone age and sex -> a boy-equivalent maturity `t` in years, and the growth
   curves (fraction of adult length, ossification timetable) as functions of `t`.
2. Skeleton as data: the five rays (metacarpal + phalanges) and the carpal bones as tables in
   millimetres, in hand coordinates: origin at the capitate centre, x towards the thumb,
   y towards the wrist (image-like, y down), left hand PA view.
3. Hand model: the tables evaluated at one maturity -> a list of bone outlines, the
   soft-tissue outline and the key points, all in millimetres.
4. Rasteriser: outlines -> an attenuation image at an internal resolution (PIL polygons,
   additive per-bone density with a cortical rim from a small blur, soft-tissue thickness
   from a blurred silhouette).
5. Nuisance: pose, mirroring, exposure, gamma, gradients, collimation, frames, lead markers
   with letters, noise.
6. Public API: `SynthCase`, `render_case`, `render_case_with_truth`, `write_dataset`, `age_strip`.

Key point conventions (order `frame.KEYPOINT_NAMES`): the middle finger tip is the distal end
of the *bone* of the middle finger's distal phalanx (the tuft), not the soft-tissue tip; the
thumb tip likewise; the capitate is the centre of its ossification centre, or where that
centre will appear before it does. Coordinates are (x, y) output-image pixels with pixel
centres at integers: `image[round(y), round(x)]` is the pixel under a key point.
"""

from __future__ import annotations

import csv
import math
import multiprocessing as mp
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from scipy import ndimage

import boneage
from boneage.data.images import SYNTH_SOFTWARE
from boneage.registration.frame import KEYPOINT_NAMES
from boneage.progress import track

FULL_SIZE = (2044, 1514)  # (height, width) of a typical RSNA radiograph
MAX_AGE = 228.0  # months, the RSNA range
LABEL_SD = 5.5  # months: expert reader noise on the recorded label
GIRL_ADVANCE = 1.15  # a girl of age a looks like a boy of age 1.15 a (ossification, fusion)
MIRROR_P = 0.10  # right hands, shown mirrored (thumb on the left)
INTERNAL_MAX = 1024  # longest internal side: bigger outputs are drawn smaller and upsampled

# --------------------------------------------------------------------------------------------
# 1. Maturity
# --------------------------------------------------------------------------------------------


def maturity_years(age_months: float, male: bool) -> float:
    """Boy-equivalent skeletal maturity in years: the timetables below are written for boys."""
    return age_months / 12.0 * (1.0 if male else GIRL_ADVANCE)


def growth(t: float) -> float:
    """Fraction of adult bone length reached at maturity t (years); 0.33 at birth, 1 at 17."""
    return float(np.clip(0.33 + 0.67 * (1 - math.exp(-t / 6.0)) / (1 - math.exp(-17 / 6.0)), 0, 1))


def ramp(t: float, t0: float, t1: float) -> float:
    """0 before t0, 1 after t1, linear in between."""
    return float(np.clip((t - t0) / (t1 - t0), 0.0, 1.0))


def centre_size(t: float, appear: float, full: float) -> float:
    """Size of an ossification centre relative to its adult size: 0 before it appears, then a
    small nodule (0.2) growing to full size."""
    if t < appear:
        return 0.0
    return 0.2 + 0.8 * ramp(t, appear, full) ** 0.8


# --------------------------------------------------------------------------------------------
# 2. Skeleton as data (adult male, millimetres)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ray:
    """A metacarpal and its phalanges. Angles in degrees from 'up' (towards the fingers),
    positive towards the thumb; each bone turns by `splay` relative to the previous one."""

    name: str
    base: tuple[float, float]  # metacarpal base (proximal end), hand coordinates
    angle: float
    lengths: tuple[float, ...]  # metacarpal, proximal, (middle,) distal phalanx
    widths: tuple[float, ...]  # shaft widths, same order
    splay: float
    epi_appear: tuple[float, ...]  # maturity (years) at which each bone's epiphysis appears
    epi_fuse: tuple[float, ...]  # maturity at which each bone's physis has fused


RAYS = (
    # thumb: the metacarpal's epiphysis is at its base, like a phalanx
    Ray("thumb", (25.5, -5.0), 42.0, (45, 31, 23), (10.0, 9.0, 7.0), 7.0,
        (2.2, 1.6, 1.8), (15.8, 15.8, 14.8)),
    Ray("index", (11.0, -12.5), 9.0, (68, 41, 25, 17), (7.5, 8.0, 6.5, 5.5), 4.0,
        (1.6, 1.3, 2.3, 2.0), (16.2, 16.0, 15.5, 15.0)),
    Ray("middle", (0.0, -13.5), 0.0, (65, 46, 29, 19), (7.5, 8.0, 7.0, 6.0), 0.0,
        (1.6, 1.3, 2.3, 2.0), (16.2, 16.0, 15.5, 15.0)),
    Ray("ring", (-11.0, -11.5), -9.0, (57, 43, 27, 19), (6.8, 7.5, 6.5, 5.5), -3.0,
        (1.7, 1.4, 2.4, 2.1), (16.2, 16.0, 15.5, 15.0)),
    Ray("little", (-20.5, -8.5), -19.0, (53, 34, 19, 17), (6.5, 6.5, 5.5, 5.0), -4.0,
        (1.8, 1.5, 2.6, 2.2), (16.2, 16.0, 15.5, 15.0)),
)


@dataclass(frozen=True)
class Carpal:
    """A round bone: adult centre, size (w, h), orientation, superellipse exponent of the adult
    shape, and its ossification timetable (maturity years: appears, reaches adult size)."""

    name: str
    centre: tuple[float, float]
    size: tuple[float, float]
    angle: float
    squareness: float
    appear: float
    full: float


# Order matters: later bones are drawn over earlier ones (density adds, so overlaps are
# brighter as in a projection). Timetable for boys (girls via GIRL_ADVANCE): capitate and
# hamate in the first months, triquetrum 2-3 y, lunate 3-4 y, trapezium/trapezoid/scaphoid
# 5-6 y, pisiform ~11 y, the thumb sesamoid at puberty.
CARPALS = (
    Carpal("capitate", (0.0, 0.0), (16.2, 24.8), 0.0, 3.0, 0.15, 13.0),
    Carpal("hamate", (-13.0, -1.0), (15.7, 20.5), -12.0, 2.8, 0.3, 13.0),
    Carpal("triquetrum", (-16.0, 13.0), (14.0, 13.0), 30.0, 2.6, 2.7, 13.0),
    Carpal("lunate", (-2.5, 16.5), (16.2, 14.6), 0.0, 2.6, 3.8, 13.5),
    Carpal("trapezium", (22.0, 4.0), (15.1, 15.1), 20.0, 2.8, 5.0, 14.0),
    Carpal("trapezoid", (12.0, -5.0), (11.9, 13.0), 10.0, 3.0, 5.5, 14.0),
    Carpal("scaphoid", (13.5, 14.0), (13.0, 24.8), 50.0, 2.3, 5.8, 14.0),
    Carpal("pisiform", (-18.5, 9.5), (9.2, 9.2), 0.0, 2.0, 11.5, 14.5),
)
SESAMOID = Carpal("sesamoid", (0.0, 0.0), (4.0, 4.5), 0.0, 2.0, 13.0, 15.5)  # placed at MC1 head


@dataclass(frozen=True)
class ForearmBone:
    name: str
    x: float  # axis position at the wrist
    distal_y: float  # adult distal end of the metaphysis
    shaft: float  # shaft width
    distal_width: float  # metaphysis width at the wrist
    tilt: float  # epiphysis tilt (degrees): the radius slopes towards the ulna
    epi_appear: float
    epi_full: float
    epi_fuse: float


RADIUS = ForearmBone("radius", 6.0, 29.0, 13.0, 28.0, -14.0, 1.0, 13.0, 17.5)
ULNA = ForearmBone("ulna", -17.0, 31.0, 9.0, 14.0, 0.0, 6.8, 14.0, 17.0)

# --------------------------------------------------------------------------------------------
# 3. Hand model at one maturity
# --------------------------------------------------------------------------------------------


@dataclass
class Shape:
    """One bone outline (mm). `hole` is the medullary cavity, drawn less dense."""

    points: np.ndarray  # (n, 2)
    density: float
    kind: str  # 'shaft', 'epiphysis', 'carpal', 'bridge'
    name: str
    hole: np.ndarray | None = None


@dataclass
class Hand:
    """A hand at one maturity, in millimetres (hand coordinates)."""

    shapes: list[Shape]
    polygons: list[np.ndarray]  # soft tissue: palm and forearm
    capsules: list[tuple[np.ndarray, float]]  # soft tissue: ((2, 2) ends, width) per phalanx
    keypoints: np.ndarray  # (3, 2): finger tip (soft tissue), capitate, thumb tip (soft tissue)
    soft_tips: np.ndarray  # (2, 2): soft-tissue tips of the middle finger and thumb
    extent: np.ndarray  # outline points of the hand that must stay in the picture
    stats: dict  # maturity measures for tests and plots


def _unit(angle_deg: float) -> np.ndarray:
    """Direction at angle_deg from 'up', positive towards +x (y down)."""
    a = math.radians(angle_deg)
    return np.array([math.sin(a), -math.cos(a)])


def _normal(d: np.ndarray) -> np.ndarray:
    """d turned by 90 degrees: towards +x (the thumb) for d pointing up."""
    return np.array([-d[1], d[0]])


def _superellipse(centre, w, h, angle_deg, p, n=28) -> np.ndarray:
    """Rounded box w x h (p=2 an ellipse, larger p squarer), its h axis along _unit(angle)."""
    th = np.linspace(0, 2 * np.pi, n, endpoint=False)
    c, s = np.cos(th), np.sin(th)
    x = w / 2 * np.sign(c) * np.abs(c) ** (2 / p)
    y = h / 2 * np.sign(s) * np.abs(s) ** (2 / p)
    a = math.radians(angle_deg)
    ca, sa = math.cos(a), math.sin(a)
    return np.stack([centre[0] + ca * x - sa * y, centre[1] + sa * x + ca * y], 1)


def _along(start: np.ndarray, d: np.ndarray, s: np.ndarray, hw: np.ndarray) -> np.ndarray:
    """Outline of a body of half-width hw(s) along the axis start + s d."""
    n = _normal(d)
    left = start + s[:, None] * d + hw[:, None] * n
    right = start + s[:, None] * d - hw[:, None] * n
    return np.concatenate([left, right[::-1]])


def _shaft(start, d, length, w_shaft, w_prox, w_dist, tuft=False, n=14) -> tuple[np.ndarray, np.ndarray]:
    """A tubular bone from its proximal end: flared metaphyses, waisted shaft, slightly rounded
    ends (a distal phalanx instead narrows to its tuft). Returns the outline and the
    medullary cavity."""
    u = np.linspace(0, 1, n)
    if tuft:
        hw = np.interp(u, [0, 0.25, 0.7, 0.9, 1], [w_prox, 0.75 * w_shaft, 0.6 * w_shaft,
                                                    0.8 * w_shaft, 0.45 * w_shaft]) / 2
    else:
        fz = min(0.45, 2.0 * max(w_prox, w_dist) / length)  # metaphyses: ~2 widths long
        flare_p = np.clip(1 - u / fz, 0, 1) ** 1.7
        flare_d = np.clip((u - 1 + fz) / fz, 0, 1) ** 1.7
        hw = (w_shaft + (w_prox - w_shaft) * flare_p + (w_dist - w_shaft) * flare_d) / 2
    r = 0.2 * max(w_prox, w_dist)
    from_end = np.minimum(u, 1 - u) * length
    cap = np.sqrt(np.clip(1 - (from_end / r - 1) ** 2, 0, 1))
    hw = hw * np.where(from_end < r, 0.75 + 0.25 * cap, 1)
    outline = _along(start, d, u * length, hw)
    end = min(0.12 * length, 1.2 * max(w_prox, w_dist)) / length
    ui = np.linspace(end, 1 - end, n)
    hwi = np.maximum(np.interp(ui, u, hw) - 0.25 * w_shaft, 0.05 * w_shaft)  # cortex: 1/4 width
    return outline, _along(start, d, ui * length, hwi)


class _HandBuilder:
    """Evaluates the skeleton tables at one maturity. Lengths are adult millimetres times the
    growth fraction g; the anatomy of maturation lives in the ratios: ossified centres
    against the cartilage space reserved for them, joint and physis gaps, width/length."""

    def __init__(self, age_months: float, male: bool, rng: np.random.Generator):
        self.rng = rng
        self.t = t = maturity_years(age_months, male)
        self.g = g = growth(t)
        self.wide = 1.0 + 0.45 * (1 - g) ** 1.5  # young tubular bones are relatively wide
        self.dens = 0.75 + 0.25 * ramp(t, 0, 14)  # bone mineralises with age
        self.jgap = (1.3 + 2.5 * (1 - g)) * g  # joint space: thick cartilage in children
        self.physis = (0.9 + 1.2 * (1 - g)) * g  # growth plate before fusion
        self.soft = 1.0 + 0.25 * (1 - g)  # children have more soft tissue around their bones
        self.finger_length = rng.normal(1.0, 0.03)  # long or short fingers for this palm
        self.shapes: list[Shape] = []
        self.epi_ratio: list[float] = []
        self.fused: list[float] = []

    def epiphysis(self, name, centre, d, to_shaft, w_meta, appear, fuse, full, thick, squareness):
        """Ossification centre of an epiphysis across axis d, its shaft on side `to_shaft`
        (+-1): appears as a nodule, widens to the width of its metaphysis (`thick` is the
        cartilage space along the axis), then fuses: the physis narrows and bone bridges it."""
        t, g = self.t, self.g
        s = centre_size(t, appear, full)
        if s == 0:
            self.epi_ratio.append(0.0)
            self.fused.append(0.0)
            return
        w = w_meta * (0.25 + 0.8 * ramp(t, appear, full)) if t < full else w_meta * 1.05
        h = thick * (0.45 + 0.55 * s)
        f = ramp(t, fuse - 1.2, fuse)
        centre = centre + to_shaft * d * self.physis * f * 0.7
        ang = math.degrees(math.atan2(d[0], -d[1]))
        self.shapes.append(Shape(_superellipse(centre, w, h, ang, squareness), 0.85 * self.dens, "epiphysis", name))
        self.epi_ratio.append(w / w_meta)
        self.fused.append(f)
        if f > 0:
            n = _normal(d) * min(w, w_meta) * 0.95 * f / 2
            p0 = centre + to_shaft * d * (h / 2 - 0.3 * g)
            p1 = centre + to_shaft * d * (h / 2 + self.physis * (1 - 0.7 * f) + 0.3 * g)
            self.shapes.append(Shape(np.array([p0 + n, p1 + n, p1 - n, p0 - n]), 0.8 * self.dens * f, "bridge", name))

    def ray(self, ray: Ray, spread: float) -> np.ndarray:
        """Draw one ray's bones; returns its joint positions (base, then each bone's end)."""
        g, rng = self.g, self.rng
        jit = rng.normal(1.0, 0.02, len(ray.lengths)) * self.finger_length
        if ray.name == "thumb":
            angle, splay = ray.angle + rng.normal(0, 5.0), ray.splay + rng.normal(0, 2.0)
        else:  # one spread factor per hand, so neighbouring fingers never cross
            angle, splay = ray.angle * spread + rng.normal(0, 1.0), ray.splay * spread + rng.normal(0, 0.7)
        pos = np.array(ray.base) * g
        pts = [pos]
        last = len(ray.lengths) - 1
        for i, (length, width) in enumerate(zip(ray.lengths, ray.widths)):
            d = _unit(angle)
            ws = width * g * self.wide
            w_prox = ws * 1.45
            w_dist = ws * 0.8 if i == last else ws * (1.55 if i == 0 else 1.3)
            # epiphyses sit at the base of phalanges and of the thumb metacarpal, at the head
            # of the other metacarpals
            proximal = i > 0 or ray.name == "thumb"
            zone = (w_prox if proximal else w_dist) * 0.42  # cartilage space of the epiphysis
            diaph = length * g * (jit[i] if i else 1.0) - zone - self.physis
            if i > 0:
                pos = pos + d * self.jgap
            if proximal:
                epi_c, start = pos + d * zone / 2, pos + d * (zone + self.physis)
                pos = start + d * diaph
            else:
                start, epi_c = pos, pos + d * (diaph + self.physis + zone / 2)
                pos = epi_c + d * zone / 2
            outline, hole = _shaft(start, d, diaph, ws, w_prox, w_dist, tuft=i == last)
            self.shapes.append(Shape(outline, self.dens, "shaft", f"{ray.name}{i}", hole))
            self.epiphysis(f"{ray.name}{i}", epi_c, d, 1 if proximal else -1, w_prox if proximal else w_dist,
                           ray.epi_appear[i], ray.epi_fuse[i], ray.epi_appear[i] + 9.0, zone,
                           2.4 if proximal else 2.0)
            pts.append(pos)
            angle += splay if i else splay * 0.5
        return np.array(pts)

    def carpals(self, mc1: np.ndarray) -> tuple[int, float]:
        """Draw the carpal centres and the thumb sesamoid; returns (count, area in adult mm^2)
        of the carpals."""
        t, g = self.t, self.g
        count, area = 0, 0.0
        for c in CARPALS + (SESAMOID,):
            s = centre_size(t, c.appear, c.full)
            if s == 0:
                continue
            if c.name == "sesamoid":  # at the thumb's MCP joint, ulnar side of the metacarpal head
                d = (mc1[1] - mc1[0]) / np.linalg.norm(mc1[1] - mc1[0])
                centre = mc1[1] - d * 2.0 * g - _normal(d) * 2.5 * g
            elif c.name == "capitate":  # fixed: its centre is a key point
                centre = np.array(c.centre) * g
            else:
                centre = (np.array(c.centre) + self.rng.normal(0, 0.5, 2)) * g
            # young centres are small and round; the adult shape emerges as they grow
            mature = ramp(t, c.appear, c.full)
            w = c.size[0] * g * s
            h = (c.size[0] + (c.size[1] - c.size[0]) * mature) * g * s
            p = 2.0 + (c.squareness - 2.0) * mature
            outline = _superellipse(centre, w, h, c.angle * mature, p)
            self.shapes.append(Shape(outline, 0.75 * self.dens, "carpal", c.name))
            if c.name != "sesamoid":
                count += 1
                area += math.pi / 4 * w * h / (g * g)
        return count, area

    def forearm(self) -> None:
        """Radius and ulna: shafts running out of the picture, distal metaphysis, epiphysis."""
        g = self.g
        down = _unit(180.0)
        for b in (RADIUS, ULNA):
            end = np.array([b.x, b.distal_y]) * g + [0.0, self.physis + 0.1 * b.distal_width * g]
            ws = b.shaft * g * self.wide
            outline, hole = _shaft(end, down, 260.0 * g, ws, b.distal_width * g * (0.8 + 0.2 * g), ws)
            self.shapes.append(Shape(outline, self.dens * 1.05, "shaft", b.name, hole))
            thick = b.distal_width * g * 0.28
            self.epiphysis(b.name, end - down * (self.physis + thick / 2), _unit(180.0 + b.tilt), 1,
                           b.distal_width * g, b.epi_appear, b.epi_fuse, b.epi_full, thick,
                           3.5 if b is RADIUS else 2.3)

    def soft_tissue(self, rays: dict[str, np.ndarray]):
        """Finger capsules (one per phalanx, tapering, the last ending a pad beyond the bone
        tip), the palm polygon around the metacarpals, the forearm. Returns (polygons,
        capsules, soft tips of all rays, palm polygon down to the wrist)."""
        g, soft = self.g, self.soft
        capsules, tips = [], {}
        for ray in RAYS:
            pts = rays[ray.name]
            d = (pts[-1] - pts[-2]) / np.linalg.norm(pts[-1] - pts[-2])
            pad = (3.5 + 1.0 * (1 - g)) * g
            tips[ray.name] = pts[-1] + d * pad
            for k in range(1, len(pts) - 1):
                fw = (ray.widths[k] * g * self.wide * 2.0 + 5.0 * g) * soft
                p0 = pts[k] - (pts[k] - pts[k - 1]) * (0.35 if k == 1 else 0.0)  # starts in the palm
                p1 = pts[k + 1] + (d * (pad - fw / 2) if k == len(pts) - 2 else 0.0)
                capsules.append((np.array([p0, p1]), fw))
        side = 10.5 * g * soft

        def beside(name, u, off):
            """Point at fraction u along a metacarpal, `off` mm to its thumb side."""
            p0, p1 = rays[name][0], rays[name][1]
            return p0 + (p1 - p0) * u + _normal((p1 - p0) / np.linalg.norm(p1 - p0)) * off

        def web(name, u):
            """Point at fraction u along a proximal phalanx (where the finger webs are)."""
            return rays[name][1] + (rays[name][2] - rays[name][1]) * u

        wrist_ulnar = [[ULNA.x * g - 16 * g * soft, 45 * g], [ULNA.x * g - 14 * g * soft, 18 * g]]
        wrist_radial = [[RADIUS.x * g + 24 * g * soft, 20 * g], [RADIUS.x * g + 22 * g * soft, 45 * g]]
        outline = np.array([
            beside("little", 0.2, -side * 1.3),  # hypothenar eminence
            beside("little", 0.6, -side * 1.25),
            beside("little", 1.0, -side * 0.9),
            web("little", 0.35),
            web("index", 0.3),
            beside("index", 1.05, side * 0.7),
            beside("index", 0.75, side * 0.9),  # deepest point of the first web space
            beside("thumb", 1.0, -side * 0.5),
            beside("thumb", 1.1, side * 0.8),
            beside("thumb", 0.5, side * 1.5),  # thenar eminence
            beside("thumb", 0.0, side * 1.6),
        ])
        palm = np.concatenate([wrist_ulnar, outline, wrist_radial])
        fore = np.array([palm[0], palm[-1], [RADIUS.x * g + 30 * g * soft, 330 * g],
                         [ULNA.x * g - 26 * g * soft, 330 * g]])
        return [palm, fore], capsules, tips, palm


def build_hand(age_months: float, male: bool, rng: np.random.Generator) -> Hand:
    """The skeleton and soft tissue at one bone age, with individual proportions from rng."""
    b = _HandBuilder(age_months, male, rng)
    spread = rng.uniform(0.85, 1.35)
    rays = {ray.name: b.ray(ray, spread) for ray in RAYS}
    count, area = b.carpals(rays["thumb"])
    b.forearm()
    polygons, capsules, tips, palm = b.soft_tissue(rays)
    stats = {"t": b.t, "growth": b.g, "carpals": count, "carpal_area": area,
             "epi_ratio": float(np.mean(b.epi_ratio)), "fused": float(np.mean(b.fused))}
    return Hand(
        shapes=b.shapes, polygons=polygons, capsules=capsules,
        # Tips are soft-tissue tips, as annotated on real radiographs (rsna-dev's hand21 points) and as
        # the 2017 registration used them; the distal phalanx ends ~2% of hand length short of them.
        keypoints=np.array([tips["middle"], [0.0, 0.0], tips["thumb"]]),
        soft_tips=np.array([tips["middle"], tips["thumb"]]),
        extent=np.concatenate([np.array(list(tips.values())), palm]),  # hand and wrist
        stats=stats,
    )


# --------------------------------------------------------------------------------------------
# 4. Rasteriser
# --------------------------------------------------------------------------------------------

TISSUE_LEVEL = 0.42  # attenuation of the thickest soft tissue; bone adds ~0.2-0.4 on top
BONE_LEVEL = 0.2
RIM_GAIN = 1.8  # cortical rim: bright inner edge of each bone


@dataclass
class Pose:
    """Hand coordinates (mm) -> output pixels: mirror, rotate, scale, shift."""

    scale: float  # output pixels per mm
    angle: float  # degrees, counter-clockwise on screen
    mirrored: bool
    shift: np.ndarray  # output pixel position of the capitate centre

    def apply(self, pts: np.ndarray) -> np.ndarray:
        p = np.asarray(pts, float).reshape(-1, 2) * [(-1.0 if self.mirrored else 1.0), 1.0]
        a = math.radians(self.angle)
        rot = np.array([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
        return p @ rot.T * self.scale + self.shift


@dataclass
class Canvas:
    """Output size and the smaller internal raster it is drawn at."""

    height: int
    width: int
    k: float  # output pixels per internal pixel

    @property
    def inner(self) -> tuple[int, int]:
        return max(8, round(self.height / self.k)), max(8, round(self.width / self.k))

    def to_inner(self, pts: np.ndarray) -> np.ndarray:
        """Output pixel coordinates -> internal ones (pixel centres at integers in both)."""
        hi, wi = self.inner
        return (pts + 0.5) / [self.width / wi, self.height / hi] - 0.5


def _resize(a: np.ndarray, height: int, width: int, resample=Image.BILINEAR) -> np.ndarray:
    """Resize a 2-D array (uint8 or float32) with PIL, which is much faster than scipy zoom."""
    if a.shape == (height, width):
        return a
    return np.asarray(Image.fromarray(a).resize((width, height), resample))


def _draw_mask(shape: tuple[int, int], polys=(), capsules=(), supersample: int = 1) -> np.ndarray:
    """Fill polygons and capsules ((ends, width)) into a float mask of `shape`; with
    supersample=k the polygons are drawn k times larger and box-reduced (anti-aliased)."""
    k = supersample
    im = Image.new("L", (shape[1] * k, shape[0] * k))
    dr = ImageDraw.Draw(im)
    for p in polys:
        dr.polygon([tuple(q) for q in np.asarray(p) * k + (k - 1) / 2], fill=255)
    for (p0, p1), w in capsules:
        dr.line([tuple(p0), tuple(p1)], fill=255, width=max(1, round(w)))
        for c in (p0, p1):
            dr.ellipse([c[0] - w / 2, c[1] - w / 2, c[0] + w / 2, c[1] + w / 2], fill=255)
    if k > 1:
        im = im.reduce(k)
    return np.asarray(im, np.float32) / 255.0


def _stamp(canvas: np.ndarray, pts: np.ndarray, value: float, sigma: float,
           hole: np.ndarray | None = None, rim_gain: float = RIM_GAIN) -> None:
    """Add one bone to `canvas`: uniform density, a brighter cortical rim inside the outline
    (outline minus its blur) and a less dense medullary cavity. Works on the bone's bounding
    box only, so thirty bones cost about as much as one full-image filter."""
    pad = int(3 * sigma) + 2
    x0 = max(int(pts[:, 0].min()) - pad, 0)
    y0 = max(int(pts[:, 1].min()) - pad, 0)
    x1 = min(int(pts[:, 0].max()) + pad + 1, canvas.shape[1])
    y1 = min(int(pts[:, 1].max()) + pad + 1, canvas.shape[0])
    if x1 - x0 < 1 or y1 - y0 < 1:
        return
    off = np.array([x0, y0])
    a = _draw_mask((y1 - y0, x1 - x0), polys=[pts - off], supersample=2)
    # mode='nearest': a bone cut by the picture's edge gets no rim along the cut
    rim = np.clip(a - ndimage.gaussian_filter(a, sigma, mode="nearest"), 0, None)
    body = a
    if hole is not None:
        body = a - 0.75 * ndimage.gaussian_filter(_draw_mask(a.shape, polys=[hole - off], supersample=2), sigma,
                                                  mode="nearest")
    canvas[y0:y1, x0:x1] += value * (body + rim_gain * rim)


@lru_cache(maxsize=2)
def _noise_tile(n: int = 2600, smooth: float = 0.0) -> np.ndarray:
    """A fixed noise field, made once per process; cases take seeded random windows of it
    (fast, and deterministic whatever process renders the case)."""
    tile = np.random.default_rng(12345).standard_normal((n, n)).astype(np.float32)
    if smooth:
        tile = ndimage.gaussian_filter(tile, smooth)
        tile /= tile.std()
    return tile


def _window(tile: np.ndarray, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    h, w = shape
    if h > tile.shape[0] or w > tile.shape[1]:
        return rng.standard_normal(shape).astype(np.float32)
    y = rng.integers(0, tile.shape[0] - h + 1)
    x = rng.integers(0, tile.shape[1] - w + 1)
    return tile[y:y + h, x:x + w]


def rasterise(hand: Hand, pose: Pose, canvas: Canvas, rng: np.random.Generator):
    """Attenuation image, soft-tissue mask and bone mask at the internal resolution."""
    hi, wi = canvas.inner
    px = pose.scale / canvas.k  # internal pixels per mm

    def tr(p):
        return canvas.to_inner(pose.apply(p))

    tmask = _draw_mask((hi, wi), [tr(p) for p in hand.polygons], [(tr(p), w * px) for p, w in hand.capsules])
    # soft-tissue thickness: rounded edges (small blur) and a thicker palm and forearm (a wide
    # blur, done at 1/4 resolution because it is smooth anyway)
    half = tmask[::2, ::2]
    edge = _resize(ndimage.gaussian_filter(half, 1.0 * px), hi, wi)
    body = _resize(ndimage.gaussian_filter(half[::4, ::4], 10.0 * px / 8), hi, wi)
    img = TISSUE_LEVEL * edge * (0.65 + 0.35 * body)

    bone = np.zeros((hi, wi), np.float32)
    sigma = max(0.6, 1.1 * px)  # cortex thickness ~1 mm
    for s in hand.shapes:
        # a bridge is a sliver no thicker than the cortex: a rim would make it a bright bar
        _stamp(bone, tr(s.points), BONE_LEVEL * s.density, sigma,
               None if s.hole is None else tr(s.hole), 0.0 if s.kind == "bridge" else RIM_GAIN)
    tex = _window(_noise_tile(1400, 2.5), (hi, wi), rng)  # trabecular texture
    img += bone * (1.0 + 0.06 * tex)
    return img, tmask > 0.5, bone > 0.05


# --------------------------------------------------------------------------------------------
# 5. Nuisance
# --------------------------------------------------------------------------------------------

INITIALS = "ABCDEFGHJKLMNPRSTVW"


def sample_age(rng: np.random.Generator) -> float:
    """Months, roughly like RSNA: most 8-15 years, a tail of young children."""
    if rng.random() < 0.15:
        return float(rng.uniform(1.0, MAX_AGE))
    return float(np.clip(rng.normal(132.0, 33.0), 1.0, MAX_AGE))


def sample_pose(hand: Hand, height: int, width: int, rng: np.random.Generator, nuisance: bool) -> Pose:
    """Rotation, scale and shift that keep the hand (finger tips, palm) inside the picture."""
    reach = np.linalg.norm(hand.keypoints[0] - hand.keypoints[1])  # finger tip to capitate, mm
    if not nuisance:
        pose = Pose(0.50 * height / reach, 0.0, False, np.zeros(2))
        lo, hi = pose.apply(hand.extent).min(0), pose.apply(hand.extent).max(0)
        pose.shift = np.array([width, height]) / 2 - (lo + hi) / 2 + [0, 0.04 * height]
        return pose
    mirrored = bool(rng.random() < MIRROR_P)
    angle = float(rng.uniform(-45, 45) if rng.random() < 0.2 else np.clip(rng.normal(0, 8), -45, 45))
    scale = rng.uniform(0.44, 0.6) * height / reach
    margin = 0.03 * min(height, width)
    for _ in range(30):
        pose = Pose(scale, angle, mirrored, np.zeros(2))
        pts = pose.apply(hand.extent)
        lo, hi = pts.min(0) - margin, pts.max(0) + margin
        room = np.array([width, height]) - (hi - lo)
        if (room > 0).all():
            pose.shift = -lo + rng.uniform(0, 1, 2) * room
            return pose
        scale *= 0.92
    raise RuntimeError("hand does not fit the picture")  # unreachable for sane sizes


def _marker(text: str, height_px: float, rng: np.random.Generator):
    """A lead marker: big letter, initials below or beside it, on a plastic plate. Returns
    (plate alpha, letters alpha) as float arrays, rotated a little."""
    big = ImageFont.load_default(size=max(8, round(height_px)))
    small = ImageFont.load_default(size=max(6, round(height_px * 0.5)))
    initials = "".join(rng.choice(list(INITIALS), rng.integers(1, 4)))
    stacked = rng.random() < 0.6
    h = round(height_px)
    w_init = small.getbbox(initials)[2]
    pw, ph = (max(h, w_init) + h // 2, round(h * 2.0) + h // 3) if stacked else (h + w_init + h // 2, round(h * 1.5))
    plate = Image.new("L", (pw, ph))
    letters = Image.new("L", (pw, ph))
    ImageDraw.Draw(plate).rounded_rectangle([0, 0, pw - 1, ph - 1], radius=h // 5, fill=255)
    dr = ImageDraw.Draw(letters)
    bold = max(1, h // 12)  # lead letters are thick
    dr.text((h // 4, 0), text, font=big, fill=255, stroke_width=bold, stroke_fill=255)
    at = (h // 4, round(h * 1.15)) if stacked else (h + h // 4, round(h * 0.45))
    dr.text(at, initials, font=small, fill=255, stroke_width=max(1, bold // 2), stroke_fill=255)
    angle = float(rng.normal(0, 8))
    plate = plate.rotate(angle, expand=True, resample=Image.BILINEAR)
    letters = letters.rotate(angle, expand=True, resample=Image.BILINEAR)
    return np.asarray(plate, np.float32) / 255, np.asarray(letters, np.float32) / 255


def _ring(diameter: float) -> np.ndarray:
    n = max(5, round(diameter))
    im = Image.new("L", (n, n))
    dr = ImageDraw.Draw(im)
    dr.ellipse([0, 0, n - 1, n - 1], outline=255, width=max(1, n // 8))
    dr.ellipse([n * 0.38, n * 0.38, n * 0.62, n * 0.62], fill=255)
    return np.asarray(im, np.float32) / 255


def _place(img: np.ndarray, keep_out: np.ndarray, patch: np.ndarray, value: float,
           rng: np.random.Generator, tries: int = 25) -> bool:
    """Put a marker where it covers no tissue (markers lie beside the hand)."""
    h, w = patch.shape
    if h >= img.shape[0] or w >= img.shape[1]:
        return False
    for _ in range(tries):
        y = int(rng.integers(0, img.shape[0] - h))
        x = int(rng.integers(0, img.shape[1] - w))
        if not keep_out[y:y + h, x:x + w].any():
            region = img[y:y + h, x:x + w]
            np.maximum(region, value * patch, out=region)
            keep_out[y:y + h, x:x + w] = True
            return True
    return False


def add_markers(img: np.ndarray, tmask: np.ndarray, mirrored: bool, rng: np.random.Generator) -> None:
    """Burned-in side markers ('L' or 'R' with initials), ring markers and corner text."""
    hi, wi = img.shape
    keep_out = ndimage.binary_dilation(tmask[::4, ::4], iterations=3)
    keep_out = np.repeat(np.repeat(keep_out, 4, 0), 4, 1)[:hi, :wi].copy()
    side = "R" if mirrored else "L"
    if rng.random() < 0.85:
        plate, letters = _marker(side, rng.uniform(0.035, 0.06) * hi, rng)
        plate_level = rng.uniform(0.08, 0.3)
        both = np.maximum(plate * plate_level, letters * rng.uniform(1.1, 1.4))  # lead: saturates
        _place(img, keep_out, both, 1.0, rng)
    if rng.random() < 0.3:
        _place(img, keep_out, _ring(rng.uniform(0.025, 0.045) * hi), rng.uniform(1.0, 1.4), rng)
    if rng.random() < 0.25:
        font = ImageFont.load_default(size=max(6, round(0.012 * hi)))
        im = Image.new("L", (wi, hi))
        who = "".join(rng.choice(list(INITIALS), 3))
        ImageDraw.Draw(im).multiline_text((0.01 * wi, 0.01 * hi), f"{'RIGHT' if mirrored else 'LEFT'}\n{who}",
                                          font=font, fill=255)
        np.maximum(img, np.asarray(im, np.float32) / 255 * rng.uniform(0.5, 0.9), out=img)


def expose(img: np.ndarray, hand_box: np.ndarray, rng: np.random.Generator):
    """Exposure, gradients, collimation and frames on the internal image (values 0..1).
    Returns the image and the exposed field (where anatomy is visible)."""
    hi, wi = img.shape
    yy = (np.arange(hi, dtype=np.float32) / hi)[:, None]
    xx = (np.arange(wi, dtype=np.float32) / wi)[None, :]
    grey = rng.random() < 0.1  # some scans are washed out: grey background, low contrast
    bg = rng.uniform(0.35, 0.5) if grey else rng.uniform(0.0, 0.1)
    gain = rng.uniform(0.3, 0.5) if grey else rng.uniform(0.7, 1.05)
    a = rng.uniform(0, 2 * np.pi)
    ramp_ = (math.cos(a) * (xx - 0.5) + math.sin(a) * (yy - 0.5)) * rng.uniform(0, 0.12)
    heel = -rng.uniform(0, 0.08) * ((xx - rng.uniform(0.3, 0.7)) ** 2 + (yy - rng.uniform(0.3, 0.7)) ** 2)
    out = bg + ramp_ + heel + gain * img

    field_ = np.ones_like(out)
    if rng.random() < 0.35:  # collimated: a tilted exposed rectangle around the hand
        lo, hi_ = hand_box
        ang = math.radians(float(np.clip(rng.normal(0, 3), -8, 8)))
        # margins, plus what the tilt takes off the corners, so the field never cuts the hand
        m = rng.uniform(0.03, 0.12, 4) * [wi, hi, wi, hi] + abs(math.sin(ang)) * max(hi_ - lo) / 2
        x0, y0 = lo - m[:2]
        x1 = hi_[0] + m[2]
        y1 = hi_[1] + m[3] if rng.random() < 0.5 else 2.0 * hi  # or open towards the forearm
        c = np.array([(x0 + x1) / 2, (y0 + y1) / 2])
        rect = np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]]) - c
        rot = np.array([[math.cos(ang), -math.sin(ang)], [math.sin(ang), math.cos(ang)]])
        rect = rect @ rot.T + c
        field_ = ndimage.gaussian_filter(_draw_mask((hi, wi), [rect]), 0.004 * hi)
        outside = rng.uniform(0.25, 0.55) if rng.random() < 0.35 else rng.uniform(0.0, 0.06)
        out = field_ * out + (1 - field_) * outside
        if rng.random() < 0.6:  # the bright edge of a cassette frame along the field
            edge = Image.new("L", (wi, hi))
            ImageDraw.Draw(edge).polygon([tuple(p) for p in rect], outline=255, width=max(1, round(0.006 * hi)))
            glow = ndimage.gaussian_filter(np.asarray(edge, np.float32) / 255, 0.004 * hi)
            out += rng.uniform(0.3, 0.7) * glow / max(glow.max(), 1e-6)
    if rng.random() < 0.2:  # plain borders at the picture's edges, bright or black
        band = max(1, round(rng.uniform(0.003, 0.02) * hi))
        level = 1.0 if rng.random() < 0.6 else 0.0
        for side in np.flatnonzero(rng.random(4) < 0.5):
            sl = [np.s_[:band, :], np.s_[-band:, :], np.s_[:, :band], np.s_[:, -band:]][side]
            out[sl] = level
            field_[sl] = 0.0
    gamma = rng.uniform(0.75, 1.35)
    return np.clip(out, 0, 1) ** gamma, field_ > 0.5


# --------------------------------------------------------------------------------------------
# 6. Public API
# --------------------------------------------------------------------------------------------


@dataclass
class SynthCase:
    id: str
    boneage: float  # the label: true maturity plus reader noise, rounded to a month like RSNA
    true_age: float  # the maturity the anatomy was drawn at (months)
    male: bool
    image: np.ndarray  # uint8 (H, W)
    keypoints: np.ndarray  # (3, 2) float (x, y) output pixels, order frame.KEYPOINT_NAMES
    mask: np.ndarray  # bool (H, W): soft-tissue silhouette in the exposed field
    mirrored: bool


def _render(seed: int, age_months: float | None, male: bool | None,
            size: tuple[int, int] | None, nuisance: bool):
    # independent streams: fixing the age or the sex does not change the pose or the nuisance,
    # so one seed over several ages shows the same hand growing up
    r_demo, r_anat, r_pose, r_nuis = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(4))
    sampled_age, sampled_male, noise = sample_age(r_demo), bool(r_demo.random() < 0.5), r_demo.normal(0, LABEL_SD)
    true_age = float(sampled_age if age_months is None else age_months)
    male = sampled_male if male is None else bool(male)
    label = float(np.clip(round(true_age + noise), 1, MAX_AGE))

    if size is None:
        size = (round(FULL_SIZE[0] * r_pose.uniform(0.85, 1.15)), round(FULL_SIZE[1] * r_pose.uniform(0.85, 1.15)))
    height, width = size
    canvas = Canvas(height, width, max(1.0, max(height, width) / INTERNAL_MAX))
    hand = build_hand(true_age, male, r_anat)
    pose = sample_pose(hand, height, width, r_pose, nuisance)
    img, tmask, bmask = rasterise(hand, pose, canvas, r_nuis)
    if nuisance:
        add_markers(img, tmask, pose.mirrored, r_nuis)
        box = canvas.to_inner(pose.apply(hand.extent))
        img = ndimage.gaussian_filter(img, r_nuis.uniform(0.4, 1.0))
        img, field_ = expose(img, np.array([box.min(0), box.max(0)]), r_nuis)
    else:
        img = np.clip(0.03 + 0.85 * img, 0, 1)
        field_ = np.ones_like(tmask)
    u8 = _resize((img * 255 + 0.5).astype(np.uint8), height, width)
    if nuisance:
        sd = r_nuis.uniform(1.0, 5.0)
        u8 = np.clip(u8 + sd * _window(_noise_tile(), (height, width), r_nuis), 0, 255).astype(np.uint8)
    mask = _resize(((tmask & field_) * np.uint8(255)), height, width) > 127
    case = SynthCase(id=str(seed), boneage=label, true_age=true_age, male=male, image=u8,
                     keypoints=pose.apply(hand.keypoints), mask=mask, mirrored=pose.mirrored)
    return case, hand, pose, bmask, tmask


def render_case_with_truth(seed: int, age_months: float | None = None, male: bool | None = None,
                           size: tuple[int, int] | None = None, nuisance: bool = True):
    """`render_case` plus internal ground truth: dict with 'bone' (bool mask of bone at
    output resolution), 'tissue' (the silhouette before collimation and borders hide parts of
    it; `mask` is tissue in the exposed field), 'soft_tips' ((2, 2) px: soft-tissue tips of middle finger and thumb),
    'stats' (maturity measures: carpal count and area, epiphysis/metaphysis width ratio,
    fusion) and 'pose'."""
    case, hand, pose, bmask, tmask = _render(seed, age_months, male, size, nuisance)
    height, width = case.image.shape
    truth = {"bone": _resize(bmask.astype(np.uint8) * np.uint8(255), height, width) > 127,
             "tissue": _resize(tmask.astype(np.uint8) * np.uint8(255), height, width) > 127,
             "soft_tips": pose.apply(hand.soft_tips), "stats": hand.stats, "pose": pose}
    return case, truth


def render_case(seed: int, age_months: float | None = None, male: bool | None = None,
                size: tuple[int, int] | None = None, nuisance: bool = True) -> SynthCase:
    """One synthetic radiograph, identical pixels for the same arguments. `size` is
    (height, width); None draws a size around 2044x1514 (+-15%). Age (months) and sex are
    sampled from the seed unless given; `nuisance=False` gives an upright, clean left hand."""
    return _render(seed, age_months, male, size, nuisance)[0]


def case_seed(seed: int, i: int) -> int:
    """Seed of case i (1-based) of the data set with seed `seed`: fixed whatever the workers."""
    return seed * 1_000_003 + i


def synthetic_mark() -> PngInfo:
    """The Software text chunk of every radiograph written here ("boneage synth <version>"): how a
    bundle and `boneage score` tell synthetic hands from real ones (boneage.data.images.is_synthetic)."""
    info = PngInfo()
    info.add_text("Software", f"{SYNTH_SOFTWARE} {boneage.__version__}")
    return info


def _write_one(job: tuple) -> tuple:
    """Render and save case i; returns its CSV fields (runs in worker processes)."""
    i, seed, size, out_dir, masks = job
    case = render_case(case_seed(seed, i), size=size)
    out = Path(out_dir)
    # compress_level 1: ~1.4 MB at full size; level 6 is 3x slower for files only ~15% smaller
    Image.fromarray(case.image).save(out / "images" / f"{i}.png", compress_level=1, pnginfo=synthetic_mark())
    if masks:
        Image.fromarray(case.mask.astype(np.uint8) * np.uint8(255)).save(out / "masks" / f"{i}.png")
    return str(i), case.boneage, case.male, case.true_age, case.mirrored, case.keypoints


def write_dataset(n: int, out_dir, seed: int = 0, size: tuple[int, int] | None = None, workers: int = 1,
                  progress: bool = True, masks: bool = False) -> dict:
    """Write n synthetic cases in the RSNA layout: images/<id>.png (each marked "boneage synth <version>"
    in its PNG Software chunk, see synthetic_mark), labels.csv (id,boneage,male),
    truth.csv (id,true_age,mirrored), keypoints.csv and, with masks=True, masks/<id>.png.
    Ids are '1'..'n'. Output is identical for any number of workers (which are spawned: call
    it under `if __name__ == "__main__":` in a script). Returns the paths."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    if masks:
        (out / "masks").mkdir(exist_ok=True)
    size = None if size is None else (int(size[0]), int(size[1]))
    jobs = [(i, seed, size, str(out), masks) for i in range(1, n + 1)]
    if workers > 1:
        # spawn: safe with threads (Ray, torch) in the parent and the same on every platform
        with mp.get_context("spawn").Pool(workers) as pool:
            made = pool.imap(_write_one, jobs, chunksize=4)
            rows = list(track(made, n, "synthetic radiographs", "images") if progress else made)
    else:
        made = map(_write_one, jobs)
        rows = list(track(made, n, "synthetic radiographs", "images") if progress else made)

    paths = {"images": out / "images", "labels": out / "labels.csv", "truth": out / "truth.csv",
             "keypoints": out / "keypoints.csv"}
    with open(paths["labels"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "boneage", "male"])
        w.writerows([r[0], int(r[1]), str(r[2])] for r in rows)
    with open(paths["truth"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "true_age", "mirrored"])
        w.writerows([r[0], f"{r[3]:.3f}", str(r[4])] for r in rows)
    with open(paths["keypoints"], "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id"] + [f"{k}_{c}" for k in KEYPOINT_NAMES for c in "xy"])
        w.writerows([r[0]] + [f"{v:.2f}" for v in r[5].ravel()] for r in rows)
    if masks:
        paths["masks"] = out / "masks"
    return paths


def age_strip(path, ages_years=(1, 3, 6, 10, 13, 16, 18), seed: int = 7, size=(600, 400)) -> None:
    """One hand (same seed, no nuisance) at several ages, boys above girls: maturation at a glance."""
    h, w = size
    sheet = Image.new("L", (w * len(ages_years), h * 2 + 40))
    dr = ImageDraw.Draw(sheet)
    font = ImageFont.load_default(size=22)
    for row, male in enumerate((True, False)):
        for col, years in enumerate(ages_years):
            case = render_case(seed, age_months=12.0 * years, male=male, size=size, nuisance=False)
            sheet.paste(Image.fromarray(case.image), (col * w, 40 + row * h))
            dr.text((col * w + 8, 40 + row * h + 8), f"{'boy' if male else 'girl'} {years} y", font=font, fill=255)
    dr.text((8, 8), "synthetic hand over bone age (same seed)", font=font, fill=255)
    sheet.save(path)
