"""Where one image's time goes on the per-image path (boneage.score.prepare_one / score_prepared, what
`boneage serve` runs), stage by stage, one process, next to what batch scoring adds between the same
stages (the registered image PNG-encoded in preparation and decoded again in the scorer), in one run.

    python bench/bench_lean_path.py $RSNA_DEV/images runs/embedded/bundle --n 8 --repeats 2 --threads 1,2

Per image, timed one image at a time (as a request is): decode (boneage.data.images), mask + contrast +
geometric key points (prepare.analyse_image), the key point CNN, registration without the PNG (register_row,
encode=False), scoring (score_prepared: no sex given, both sexes' fold models and the sex classifier, the
clinical columns); and the batch path's extra: the registered image's PNG encode and decode. Medians over
--repeats of the per-image mean, in ms; and score_one end to end, whose time should be about the stages' sum;
for each torch intra-op thread count of --threads. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from boneage import score
from boneage.bundle import keypoint_model_sha256, load_bundle
from boneage.data import storage
from boneage.data.images import decode_image
from boneage.model import keypoint_model
from boneage.registration import prepare


def once(bodies: list[bytes], models, kp_model) -> dict[str, float]:
    t = dict.fromkeys(("decode", "mask_contrast_geometric_keypoints", "keypoint_cnn", "register_without_png",
                       "score_all_fold_models_and_columns", "batch_path_png_encode", "batch_path_png_decode",
                       "score_one_end_to_end"), 0.0)

    def timed(name, fn, *args, **kwargs):
        started = time.perf_counter()
        out = fn(*args, **kwargs)
        t[name] += time.perf_counter() - started
        return out

    for i, data in enumerate(bodies):
        image, meta = timed("decode", decode_image, data, str(i))
        row = timed("mask_contrast_geometric_keypoints", prepare.analyse_image,
                    {"id": str(i), "uri": None, "path": None, "status": "ok", "error": None}, image, meta)
        points = None
        if kp_model is not None:
            points = timed("keypoint_cnn", lambda: keypoint_model.predict_pixels(
                kp_model, prepare.decode_png(row["keypoint_input"])[None],
                np.array([[row["width"], row["height"]]], float))[0])
        registered = timed("register_without_png", prepare.register_row, row, points, encode=False)
        timed("score_all_fold_models_and_columns", score.score_prepared, [registered], models, [None], [None])
        png = timed("batch_path_png_encode", prepare.encode_png, registered[prepare.REGISTERED_IMAGE])
        timed("batch_path_png_decode", prepare.decode_png, png)
        timed("score_one_end_to_end", score.score_one, models, data, None, None, str(i), kp_model)
    return {k: 1000 * v / len(bodies) for k, v in t.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images")
    parser.add_argument("bundle")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", default="1,2", help="torch intra-op threads to measure, one after another")
    args = parser.parse_args()
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".dcm"))[:args.n]
    bodies = [p.read_bytes() for p in paths]
    bundle = load_bundle(args.bundle)
    models = score.BundleModels(bundle)
    kp_model = (keypoint_model.load(storage.read_bytes(bundle.keypoint_model), bundle.keypoint_model,
                                    keypoint_model_sha256(bundle.manifest)) if bundle.keypoint_model else None)
    result = {"images": len(bodies), "repeats": args.repeats, "by_threads": {}}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        once(bodies[:1], models, kp_model)  # warm-up
        runs = [once(bodies, models, kp_model) for _ in range(args.repeats)]
        ms = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        stages = [k for k in ms if not k.startswith(("batch_path", "score_one"))]
        result["by_threads"][threads] = {
            "ms_per_image": ms, "stages_sum_ms": sum(ms[k] for k in stages),
            "batch_path_round_trip_ms": ms["batch_path_png_encode"] + ms["batch_path_png_decode"], "runs": runs}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
