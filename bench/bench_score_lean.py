"""Batch scoring against the work it does (issue 25, item 0): one image's cost split into stages, summed,
and `boneage score` end to end with the staged and the lean pipeline, in one run, on the same images.

    python bench/bench_score_lean.py $RSNA_DEV/images /work/runs/rsna-dev-v3/bundle --n 400 --repeats 2

1. Stages, one process, torch on one thread, the images in batches of the bundle's batch size, as a lean
   actor runs them: read + decode (boneage.data.images), hand mask + contrast + geometric key points
   (prepare.analyse_image, the key point input's PNG included), the key point CNN, registration (warp and
   QA, no PNG), each model kind's forwards (both sexes' fold models: no sex is given), the sex classifier,
   and the rest of score_rows (ensemble, interval, clinical columns); for scale, the registered image's
   PNG encode + decode that the staged pipeline adds. Their sum S (s per image) is what one core needs
   per image: C cores allow C / S images/s.
2. `boneage score` (boneage.run.score) on a local Ray already started (its start-up excluded), every
   image afresh, `--repeats` times each pipeline, alternating: images/s from its wall time (manifest,
   bundle and model loads, actor starts, parquet parts and the gathered file included).
Prints JSON: the stages (ms per image), S, the rate the cores allow, each pipeline's images/s (median)
and its fraction of that rate; `--json FILE` also writes it.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from boneage import run, score
from boneage.bundle import keypoint_model_sha256, keypoint_model_uri, load_bundle, read_manifest
from boneage.config import RayConfig, load_config
from boneage.data import storage
from boneage.data.images import read_image
from boneage.distributed import ray_env
from boneage.model import keypoint_model
from boneage.registration import prepare

from _common import emit  # bench/_common.py


def stage_times(paths: list[str], bundle_uri: str, batch: int) -> dict[str, float]:
    """ms per image of each stage (see the module's docstring), one thread."""
    torch.set_num_threads(1)
    loaded = load_bundle(bundle_uri)
    models = score.BundleModels(loaded, "cpu")
    manifest = read_manifest(bundle_uri)
    kp_uri = keypoint_model_uri(bundle_uri, manifest)
    kp = (keypoint_model.load(storage.read_bytes(kp_uri), kp_uri, keypoint_model_sha256(manifest), "cpu")
          if kp_uri else None)
    t: dict[str, float] = {}

    def timed(name, fn, *args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        t[name] = t.get(name, 0.0) + time.perf_counter() - started
        return out

    for start in range(0, len(paths), batch):
        analysed = []
        for i, path in enumerate(paths[start:start + batch]):
            record = timed("read_decode", read_image, path)
            row = {"id": str(start + i), "uri": path, "path": path, "status": "ok", "error": None}
            analysed.append(timed("mask_contrast_geometric_keypoints", prepare.analyse_image, row, record.image,
                                  record.meta))
        ok = [r for r in analysed if r["status"] == "ok"]
        points = [None] * len(analysed)
        if kp is not None and ok:
            predicted = iter(timed("keypoint_cnn", keypoint_model.predict_pixels, kp,
                                   np.stack([prepare.decode_png(r["keypoint_input"]) for r in ok]),
                                   np.array([[r["width"], r["height"]] for r in ok], float)))
            points = [next(predicted) if r["status"] == "ok" else None for r in analysed]
        registered = [timed("register_warp_qa", prepare.register_row, r, p, encode=False)
                      for r, p in zip(analysed, points)]
        images = [r.pop(prepare.REGISTERED_IMAGE, None) for r in registered]
        for image in images:
            if image is not None:
                timed("staged_only_png_encode_decode", lambda: prepare.decode_png(prepare.encode_png(image)))
        frame = pd.DataFrame(registered)
        frame["age_months"] = np.nan
        bank = torch.from_numpy(np.stack([i for i in images if i is not None])[:, None])
        for kind in models.kinds:
            for sex in ("F", "M"):
                timed(f"forward_{kind}", models.kind_predictions, bank, sex, kind)
        if models.sex_kind:
            timed("forward_sex_classifier", models.p_male, bank)
        timed("score_rows_total", score.score_rows, frame, models, images=images)
    per_image = {k: 1000 * v / len(paths) for k, v in t.items()}
    forwards = sum(v for k, v in per_image.items() if k.startswith("forward_"))
    per_image["ensemble_interval_clinical_columns"] = max(0.0, per_image.pop("score_rows_total") - forwards)
    return per_image


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="a folder of radiographs (the first --n, sorted)")
    parser.add_argument("bundle")
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--pipelines", default="staged,lean")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args()
    paths = sorted(str(p) for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".dcm"))
    paths = paths[: args.n]
    trained = load_bundle(args.bundle).config or {}
    batch = load_config(None, {"preprocess": trained.get("preprocess", {})}).preprocess.batch_size
    stages = stage_times(paths, args.bundle, batch)
    summed = sum(v for k, v in stages.items() if not k.startswith("staged_only")) / 1000
    ray_env.init_ray(RayConfig())
    cores = ray_env.cluster_cpus()
    rates: dict[str, list[float]] = {p: [] for p in args.pipelines.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "images"
        folder.mkdir()
        for path in paths:
            (folder / Path(path).name).symlink_to(path)
        for _ in range(args.repeats):
            for pipeline in rates:
                started = time.perf_counter()
                table = run.score(str(folder), args.bundle, str(Path(tmp) / f"{pipeline}.parquet"), resume=False,
                                  pipeline=pipeline)
                rates[pipeline].append(len(table) / (time.perf_counter() - started))
    allowed = cores / summed
    result = {
        "images": len(paths), "bundle": args.bundle, "cores": cores, "batch": batch,
        "stages_ms_per_image_one_thread": {k: round(v, 1) for k, v in stages.items()},
        "summed_stages_s_per_image": round(summed, 4), "rate_the_cores_allow": round(allowed, 2),
        "images_per_s": {p: [round(r, 2) for r in v] for p, v in rates.items()},
        "median_images_per_s": {p: round(statistics.median(v), 2) for p, v in rates.items()},
        "fraction_of_allowed": {p: round(statistics.median(v) / allowed, 3) for p, v in rates.items()},
    }
    emit(result, args.json)


if __name__ == "__main__":
    main()
