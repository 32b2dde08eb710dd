"""The whole boneage pipeline as one Ray job.

    python workflows/full_cv.py                       # embedded default: synthetic radiographs, local Ray, CPU
    python workflows/full_cv.py --config configs/rsna.yaml \
        --images s3://bucket/boneage-training-dataset --labels s3://bucket/train.csv \
        --output s3://bucket/runs/rsna                 # on a cluster: submit this with `ray job submit`

    python workflows/full_cv.py --output runs/embedded --skip-preprocess   # CV again on the registered table

Stages: data (synthetic when no --images) → preprocess and register on Ray Data → k-fold CV of the 12
zone models (6 kinds x 2 sexes), one Ray Tune trial per (kind, sex, fold), each a Ray Train run →
OUTPUT/cv/oof.parquet (one row per labelled image, one out-of-fold prediction per kind),
OUTPUT/cv/trials.parquet, OUTPUT/cv/models/<trial>.pt, OUTPUT/cv/summary.json → ensemble weights per
sex fit by Ray Tune and by LAD and NNLS, each cross-validated over the out-of-fold table
(OUTPUT/cv/ensemble.json) → OUTPUT/bundle (everything `boneage score` needs) → OUTPUT/report/report.html.
Rerun with the same --output after an interruption: finished trials are not trained again.
Everything goes under --output (default runs/embedded); the resolved config is saved there first.
"""

import argparse
import sys
import time

from boneage import ray_env, run
from boneage.cli import add_cv_args, add_run_args, config_from_args, user_errors


@user_errors("full_cv")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    add_cv_args(parser)
    parser.add_argument("--skip-preprocess", action="store_true",
                        help="use OUTPUT/registered as it is (from an earlier run) and go straight to CV")
    args = parser.parse_args(argv)
    config = config_from_args(args)
    started = time.time()

    # 1. Data: the user's, or the embedded synthetic set.
    if args.skip_preprocess:
        run.check_registered(config)  # the registered data's config.yaml stays; CV saves cv/config.yaml
    else:
        config = run.resolve_data(config)
        run.save_config(config)

    # 2. Ray: join the cluster this job was submitted to, or start a local one.
    ray_env.init_ray(config.ray)

    # 3. Preprocess and register every radiograph (Ray Data), one row per input.
    if not args.skip_preprocess:
        run.preprocess(config)

    # 4. k-fold CV of every zone model kind and sex: Ray Tune trials, each a Ray Train run.
    run.cross_validate(config)

    # 5. Ensemble weights per sex (Ray Tune, checked against LAD and NNLS), the bundle, the report.
    ensembles = run.fit_ensembles(config)
    run.write_bundle(config)
    run.report(config, ensembles)

    print(f"[full_cv] done in {time.time() - started:.0f} s; outputs under {config.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
