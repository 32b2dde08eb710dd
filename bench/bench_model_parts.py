"""Where a bundle's model time goes at scoring: the bone age models (`BundleModels.score`, one sex) and the
sex classifier (`BundleModels.p_male`, every image) of each bundle, in one process, torch on 1 thread (one
scoring actor's CPU), on the first --n registered CV images of a run; every bundle timed --repeats times,
interleaved; median seconds per image. Decoding, preprocessing and registration are not in it (they do not
depend on the bundle); `bench/bench_score_bundles.py` times whole `boneage score` runs.

    python bench/bench_model_parts.py runs/rsna-dev-k5-refit-2 runs/rsna-dev-v2-arch/bundle \
        runs/rsna-dev-k5-refit-2/bundle runs/rsna-dev-k5-refit-tta3/bundle --json bench/results/model_parts.json

Prints JSON.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from boneage import score
from boneage.bundle import load_bundle

from _common import cv_bank, emit  # bench/_common.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a full_cv.py output folder whose registered images to use")
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bank, _, _ = cv_bank(args.run, args.n)
    models = {uri: score.BundleModels(load_bundle(uri)) for uri in args.bundles}
    times: dict[str, dict[str, list[float]]] = {uri: {"bone_age": [], "sex": []} for uri in args.bundles}
    for _ in range(args.repeats):
        for uri, m in models.items():
            start = time.perf_counter()
            m.score(bank, "M")
            middle = time.perf_counter()
            m.p_male(bank)  # NaNs at no cost without a sex classifier
            times[uri]["bone_age"].append((middle - start) / args.n)
            times[uri]["sex"].append((time.perf_counter() - middle) / args.n)
    result = {"images": args.n, "repeats": args.repeats, "torch_threads": 1, "s_per_image": {}}
    for uri, parts in times.items():
        median = {part: statistics.median(values) for part, values in parts.items()}
        result["s_per_image"][uri] = {**{p: round(v, 4) for p, v in median.items()},
                                      "models": round(sum(median.values()), 4),
                                      "tta_views": models[uri].tta_views, "sex_tta_views": models[uri].sex_tta_views}
    emit(result, args.json)


if __name__ == "__main__":
    main()
