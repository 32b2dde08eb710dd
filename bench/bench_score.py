"""Batch scoring speed: where the time of one image goes, stage by stage (torch and numpy alone, one
process), and the whole Ray Data pipeline's images/s, each against plain PNG decoding of the same
images measured in the same run.

    python bench/bench_score.py $RSNA_DEV/images runs/rsna-dev-cv/bundle --n 64 --repeats 3

Stages per image: read + decode (boneage.data.images), hand mask + contrast + geometric key points, key point
model (batched), registration, zone crops + every fold model of the bundle + ensemble (batched).
Then `boneage score` on Ray (local, all CPUs) over the same images, `--repeats` times. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from boneage.validation import cv
from boneage.registration import prepare
from boneage.distributed import ray_env
from boneage import run, score
from boneage.data import storage
from boneage.model import train, weights
from boneage.data.images import image_id, read_image
from boneage.bundle import load_bundle
from boneage.config import RayConfig


def timed(fn, *args):
    started = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - started


def stage_times(paths: list[str], bundle_uri: str) -> dict[str, float]:
    """Seconds per image of each stage, one process, torch on all its threads."""
    bundle = load_bundle(bundle_uri)
    models = score.BundleModels(bundle)
    keypoint_model = None
    if bundle.keypoint_model:
        keypoint_model = train.model_from_state(weights.load_state(storage.read_bytes(bundle.keypoint_model)))
    t: dict[str, float] = {}
    _, t["png_decode_plain"] = timed(lambda: [np.asarray(Image.open(p).convert("L")) for p in paths])
    _, t["read_decode"] = timed(lambda: [read_image(p) for p in paths])
    rows = [{"id": image_id(p), "uri": p, "boneage": None, "male": False, "status": "ok", "error": None}
            for p in paths]
    analysed, t["decode_mask_geometric_keypoints"] = timed(lambda: [prepare.analyse_row(r) for r in rows])
    ok = [r for r in analysed if r["status"] == "ok"]
    model_points = [None] * len(ok)
    if keypoint_model is not None:
        def keypoints():
            images = torch.from_numpy(np.stack([prepare.decode_png(r["keypoint_input"])[None] for r in ok]))
            points = train.predict_keypoints(keypoint_model, images, np.arange(len(ok))).numpy()
            return [p * [r["width"], r["height"]] for p, r in zip(points, ok)]
        model_points, t["keypoint_model"] = timed(keypoints)
    registered, t["register"] = timed(lambda: [prepare.register_row(r, p) for r, p in zip(ok, model_points)])
    pngs = [r["registered_png"] for r in registered if r["status"] == "ok"]
    bank, t["decode_registered"] = timed(cv.decode_bank, pngs)
    _, t["fold_models_and_ensemble"] = timed(models.score, bank, "F")
    n = len(paths)
    out = {k: v / n for k, v in t.items()}
    out["models"] = sum(len(v) for v in bundle.models.values()) // 2  # per sex
    out["images"] = n
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images")
    parser.add_argument("bundle")
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    paths = sorted(str(p) for p in Path(args.images).glob("*.png"))[: args.n]

    stages = [stage_times(paths, args.bundle) for _ in range(args.repeats)]
    median = {k: statistics.median(s[k] for s in stages) for k in stages[0]}
    ray_env.init_ray(RayConfig())
    ray_runs = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as folder:
            plain = timed(lambda: [np.asarray(Image.open(p).convert("L")) for p in paths])[1]
            _, seconds = timed(run.score, paths, args.bundle, str(Path(folder) / "p.parquet"))
            ray_runs.append({"seconds": seconds, "images_per_s": len(paths) / seconds,
                             "ratio_to_plain_png_decode": seconds / plain})
    result = {
        "images": len(paths),
        "ms_per_image_one_process": {k: round(v * 1000, 2) for k, v in median.items() if k not in ("models", "images")},
        "fold_models_per_sex": median["models"],
        "ray_pipeline": {k: statistics.median(r[k] for r in ray_runs) for k in ray_runs[0]},
        "ray_runs": ray_runs,
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
