"""The whole boneage pipeline as one Ray job.

    python workflows/full_cv.py                       # embedded default: synthetic radiographs, local Ray, CPU
    python workflows/full_cv.py --config configs/rsna.yaml \
        --images s3://bucket/boneage-training-dataset --labels s3://bucket/train.csv \
        --output s3://bucket/runs/rsna                 # on a cluster: submit this with `ray job submit`

    python workflows/full_cv.py --output runs/embedded --skip-preprocess   # CV again on the registered table

Stages: data (synthetic when no --images) → a locked test split set aside (--test-fraction, or
--test-images/--test-labels) → preprocess and register on Ray Data → k-fold CV of the 12 zone models
(6 kinds x 2 sexes), one Ray Tune trial per (kind, sex, fold), each a Ray Train run whose epoch is
chosen on a split of its training folds → OUTPUT/cv/oof.parquet (one out-of-fold prediction per kind)
→ ensemble weights per sex by Ray Tune (LAD and NNLS beside it), cross-validated → OUTPUT/bundle →
the bundle scores the locked test split through `boneage score`'s code path (the headline number)
→ OUTPUT/report/report.html. Rerun with the same --output after an interruption: finished trials are
not trained again. Every local path is taken relative to the directory you run this from.
"""

import argparse
import sys

from boneage.distributed import ray_env
from boneage import run
from boneage.cli import add_cv_args, add_run_args, add_test_args, config_from_args, user_errors


@user_errors("full_cv")
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_args(parser)
    add_cv_args(parser)
    add_test_args(parser)
    parser.add_argument("--skip-preprocess", action="store_true",
                        help="use OUTPUT/registered as it is (from an earlier run) and go straight to CV")
    args = parser.parse_args(argv)
    config = config_from_args(args)  # every local path made absolute here, before Ray starts
    run.check_config(config, need_data=not args.skip_preprocess)
    timings = run.StageTimer()

    with timings("1/7 data"):  # the user's, or the embedded synthetic set; then the locked test split
        if args.skip_preprocess:
            run.check_registered(config)  # the registered data's config.yaml stays; CV saves cv/config.yaml
            run.check_folds(config)
        else:
            config = run.resolve_data(config)
            run.save_config(config)
            run.split_test(config)
        ray_env.init_ray(config.ray)  # join the cluster this job was submitted to, or start a local one

    if not args.skip_preprocess:
        with timings("2/7 preprocess and register (Ray Data)"):
            run.preprocess(config)

    with timings("3/7 k-fold CV of the zone models (Ray Tune trials, each a Ray Train run)"):
        run.cross_validate(config)

    with timings("4/7 ensemble weights per sex (Ray Tune; LAD and NNLS beside it)"):
        ensembles = run.fit_ensembles(config)

    with timings("5/7 bundle"):
        bundle = run.write_bundle(config)

    with timings("6/7 the shipped bundle on the locked test split (boneage score)"):
        test = run.evaluate_test(config, bundle)

    with timings("7/7 report"):
        run.report(config, ensembles, test)

    run.print_final_summary(config, test, timings)
    return 0


if __name__ == "__main__":
    sys.exit(main())
