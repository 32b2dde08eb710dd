"""What a recipe costs at scoring: `boneage score` with two (or more) bundles on the same images, in one run,
alternating, on a local Ray already started (issue 26: a new recipe's scoring cost against today's).

    python bench/bench_score_bundles.py $RSNA_DEV/images runs/rsna-dev-v3/bundle runs/rsna-dev-wide/bundle \
        --n 80 --repeats 3 --json bench/results/score_cost_v2_vs_wide.json

Images/s of each bundle from `boneage score`'s wall time (the default pipeline of this machine; its start
and end included), every image afresh, the median over --repeats, and each bundle's cost per image
relative to the first bundle's (its images/s over theirs, inverted). Prints JSON.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from boneage import run
from boneage.config import RayConfig
from boneage.distributed import ray_env

from _common import emit  # bench/_common.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", help="a folder of radiographs (the first --n, sorted)")
    parser.add_argument("bundles", nargs="+", help="the reference bundle first")
    parser.add_argument("--n", type=int, default=80)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    paths = sorted(str(p) for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".dcm"))
    paths = paths[: args.n]
    ray_env.init_ray(RayConfig())
    rates: dict[str, list[float]] = {b: [] for b in args.bundles}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for i, bundle in enumerate(args.bundles):
                started = time.perf_counter()
                table = run.score(paths, bundle, str(Path(tmp) / f"{i}.parquet"), resume=False)
                rates[bundle].append(len(table) / (time.perf_counter() - started))
    reference = statistics.median(rates[args.bundles[0]])
    result = {"images": len(paths), "cpus": ray_env.cluster_cpus(),
              "images_per_s": {b: [round(r, 2) for r in v] for b, v in rates.items()},
              "median_images_per_s": {b: round(statistics.median(v), 2) for b, v in rates.items()},
              "cost_per_image_vs_first": {b: round(reference / statistics.median(v), 2) for b, v in rates.items()}}
    emit(result, args.json)


if __name__ == "__main__":
    main()
