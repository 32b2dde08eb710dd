"""The whole boneage pipeline as one Ray job.

    python workflows/full_cv.py                       # embedded default: synthetic radiographs, local Ray, CPU
    python workflows/full_cv.py --config configs/rsna.yaml \
        --images s3://bucket/boneage-training-dataset --labels s3://bucket/train.csv \
        --output s3://bucket/runs/rsna                 # on a cluster: submit this with `ray job submit`

Stages: data (synthetic when no --images) → preprocess and register on Ray Data → (k-fold CV of the
12 zone models on Ray Train/Tune, ensemble, bundle and report: being built, see docs/architecture.md).
Everything goes under --output (default runs/embedded); the resolved config is saved there first.
"""

import argparse
import sys
import time

from boneage import ray_env, run
from boneage.cli import add_run_args, config_from_args, user_errors


@user_errors("full_cv")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    config = config_from_args(parser.parse_args(argv))
    started = time.time()

    # 1. Data: the user's, or the embedded synthetic set.
    config = run.resolve_data(config)
    run.save_config(config)

    # 2. Ray: join the cluster this job was submitted to, or start a local one.
    ray_env.init_ray(config.ray)

    # 3. Preprocess and register every radiograph (Ray Data), one row per input.
    run.preprocess(config)

    print(f"[full_cv] done in {time.time() - started:.0f} s; outputs under {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
