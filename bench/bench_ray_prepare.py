"""Ray Data scaling of preparation (decode → mask → key points → registration → PNG) from 1 to N CPUs,
and the peak memory of a worker process, on the same images in one run.

    .venv/bin/python bench/bench_ray_prepare.py --images $RSNA_DEV/images --n 200 --cpus 1 2

For each CPU count: a fresh local Ray with that many CPUs, the registration stage of the pipeline
(boneage.distributed.ray_prepare, geometric key points) over the first N images, timed from the first task to the
last row (Ray start-up excluded); workers report their peak RSS. Prints images/s and the speed-up.
"""

from __future__ import annotations

import argparse
import resource
import time

import pandas as pd
import ray

from boneage.distributed import ray_prepare
from boneage.config import load_config
from boneage.data.ingest import build_manifest


def _with_peak_rss(batch: pd.DataFrame) -> pd.DataFrame:
    batch = batch[["id", "status"]].copy()
    batch["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return batch


def measure(manifest: pd.DataFrame, cpus: int) -> dict:
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        config = load_config(overrides={"keypoints": {"source": "geometric"}})
        ds = ray_prepare.prepare_dataset(manifest, config).map_batches(_with_peak_rss, batch_format="pandas")
        started = time.perf_counter()
        out = ds.to_pandas()
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    return {"cpus": cpus, "images": len(out), "ok": int((out.status == "ok").sum()), "seconds": seconds,
            "images_per_s": len(out) / seconds, "peak_rss_mb_max": float(out.peak_rss_mb.max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()
    manifest = build_manifest(args.images).head(args.n)
    results = [measure(manifest, c) for c in args.cpus]
    base = results[0]["images_per_s"]
    for r in results:
        print(f"{r['cpus']} CPU: {r['images']} images ({r['ok']} ok) in {r['seconds']:.1f} s = "
              f"{r['images_per_s']:.2f} img/s, speed-up {r['images_per_s'] / base:.2f}x, "
              f"worker peak RSS {r['peak_rss_mb_max']:.0f} MB")


if __name__ == "__main__":
    main()
