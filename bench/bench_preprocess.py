"""Speed of preprocess + key points + registration against plain PNG decode, at full RSNA size.

    .venv/bin/python bench/bench_preprocess.py --data $RSNA_DEV [--n 40] [--runs 3]

The rsna-dev images are 0.5x; they are upsampled 2x with PIL (bicubic) and written as PNG to a
temporary folder to emulate the original ~2044x1514 files. One process, one thread of Python;
prints the median over runs of the per-image mean time.
"""

from __future__ import annotations

import argparse
import glob
import os
import tempfile
import time

import numpy as np
from PIL import Image

from boneage.registration import keypoints_geometric, preprocess, register
from boneage.errors import ItemError

# An rsna-dev folder (docs/benchmarks.md: images/<id>.png, labels.csv, keypoints_hand21.csv), from $RSNA_DEV
DATA = os.environ.get("RSNA_DEV")


def decode(path: str) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        return np.asarray(im.convert("L") if im.mode != "L" else im)


def process(image: np.ndarray) -> np.ndarray:
    clean, mask, qa = preprocess.preprocess(image)
    kp, conf, info = keypoints_geometric.estimate_keypoints(mask)
    m = register.registration_transform(kp)
    return register.warp_to_frame(clean, m)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DATA, required=DATA is None,
                    help="an rsna-dev folder: images/<id>.png, labels.csv, keypoints_hand21.csv (docs/benchmarks.md); "
                         "default: $RSNA_DEV")
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args()
    src = sorted(glob.glob(f"{a.data}/images/*.png"))[:: max(1, 793 // a.n)][: a.n]
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for p in src:
            im = Image.open(p).convert("L")
            out = os.path.join(tmp, os.path.basename(p))
            im.resize((im.width * 2, im.height * 2), Image.BICUBIC).save(out)
            files.append(out)
        shapes = np.array([decode(f).shape for f in files])
        t_dec, t_proc = [], []
        for _ in range(a.runs):
            t0 = time.perf_counter()
            images = [decode(f) for f in files]
            t1 = time.perf_counter()
            for im in images:
                try:
                    process(im)
                except ItemError:  # no key points: still counted
                    pass
            t2 = time.perf_counter()
            t_dec.append((t1 - t0) / len(files))
            t_proc.append((t2 - t1) / len(files))
        # where the time goes, once
        parts = np.zeros(4)
        for im in images:
            s0 = time.perf_counter()
            clean, mask, qa = preprocess.preprocess(im)
            s1 = time.perf_counter()
            kp, conf, info = keypoints_geometric.estimate_keypoints(mask)
            s2 = time.perf_counter()
            if np.isfinite(kp).all():
                register.warp_to_frame(clean, register.registration_transform(kp))
            s3 = time.perf_counter()
            parts += [s1 - s0, s2 - s1, s3 - s2, 0]
        parts /= len(images)
    dec, proc = np.median(t_dec), np.median(t_proc)
    h, w = np.median(shapes, 0).astype(int)
    print(f"{len(files)} images, median {w}x{h} (0.5x rsna-dev upsampled 2x), median of {a.runs} runs")
    print(f"PNG decode (PIL open+load):                 {1000 * dec:7.1f} ms/image")
    print(f"preprocess + key points + registration:     {1000 * proc:7.1f} ms/image  = {proc / dec:.2f}x decode")
    print(f"  split: preprocess {1000 * parts[0]:.1f}, key points {1000 * parts[1]:.1f}, "
          f"transform + warp {1000 * parts[2]:.1f} ms")


if __name__ == "__main__":
    main()
