"""Throughput of the synthetic data set writer (render + PNG encode + CSVs).

    python bench/bench_synth.py --n 200 --size full --workers 1 --repeats 3
    python bench/bench_synth.py --n 400 --size 512x380 --workers 2 --repeats 3
    python bench/bench_synth.py --n 200 --size full --render-only

Prints images/s of each repeat and the median. `--size full` draws the RSNA-like size
(2044x1514 +-15%); HxW gives a fixed size. Worker start-up (spawn) is inside the timing,
as it is for a real run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from boneage.data import synth


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100, help="images per repeat")
    ap.add_argument("--size", default="full", help="'full' or HxW, e.g. 512x380")
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--render-only", action="store_true", help="time render_case alone (one process)")
    args = ap.parse_args()
    size = None if args.size == "full" else tuple(int(v) for v in args.size.lower().split("x"))

    synth.render_case(0, size=(64, 48))  # imports, font and noise caches
    rates = []
    for r in range(args.repeats):
        t0 = time.perf_counter()
        if args.render_only:
            for i in range(1, args.n + 1):
                synth.render_case(synth.case_seed(r, i), size=size)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                synth.write_dataset(args.n, tmp, seed=r, size=size, workers=args.workers, progress=False)
        rates.append(args.n / (time.perf_counter() - t0))
        print(f"repeat {r}: {rates[-1]:.2f} images/s", flush=True)
    mode = "render_case" if args.render_only else f"write_dataset workers={args.workers}"
    print(f"{mode} size={args.size} n={args.n}: median {statistics.median(rates):.2f} images/s "
          f"over {args.repeats} repeats")


if __name__ == "__main__":
    main()
