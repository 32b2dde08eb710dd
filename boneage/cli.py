"""The `boneage` command. Each subcommand is a thin layer over a library function; flags default to
None so that the configuration (boneage.config, YAML presets) stays the single source of defaults."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from typing import Any

from boneage.config import Config, load_config
from boneage import progress
from boneage.errors import UserError


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every workflow that reads data and writes a run folder."""
    data = parser.add_argument_group("data")
    data.add_argument("--images", help="folder, s3:// prefix or .txt list of radiographs (PNG, JPEG, DICOM); "
                                       "default: make synthetic radiographs")
    data.add_argument("--labels", help="label CSV: id,boneage,male (or the RSNA validation/test variants)")
    data.add_argument("--keypoints", help="key point annotations (VIA CSV/JSON or id,finger_tip_x,...)")
    data.add_argument("--storage-options", type=json.loads, metavar="JSON",
                      help='fsspec options for s3://, e.g. \'{"client_kwargs": {"endpoint_url": "http://..."}}\'')
    data.add_argument("--synthetic-n", type=int, help="how many synthetic radiographs when no --images (default 240)")
    data.add_argument("--seed", type=int, help="seed for synthetic data, folds and training (default 0)")
    kp = parser.add_argument_group("key points")
    kp.add_argument("--keypoint-source", choices=["model", "geometric"],
                    help="'model': the key point CNN (trained on --keypoints annotations and confident "
                         "geometric pseudo-labels unless --keypoint-model is given), falling back to the "
                         "geometric estimate where its registration fails QA; 'geometric': from the hand "
                         "mask only (default: model)")
    kp.add_argument("--keypoint-model", help="a trained key point model (.pt, local or s3://)")
    run = parser.add_argument_group("run")
    run.add_argument("--config", help="YAML preset (configs/embedded.yaml, configs/rsna.yaml); flags override it")
    run.add_argument("--output", help="run folder, local or s3:// (default runs/embedded)")
    run.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    run.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    run.add_argument("--verbose", action="store_true", default=None,
                     help="also show Ray's INFO lines, the workers' output and per-operator progress bars "
                          "(Ray's log files under /tmp/ray/session_latest/logs keep them either way)")


def add_cv_args(parser: argparse.ArgumentParser) -> None:
    """Options of the k-fold CV stage (the rest: YAML, e.g. configs/rsna.yaml)."""
    cv = parser.add_argument_group("cross-validation")
    cv.add_argument("--folds", type=int, help="k of k-fold CV (default 3; rsna.yaml: 5)")
    cv.add_argument("--kinds", type=lambda s: tuple(s.split(",")),
                    help="comma-separated model kinds, e.g. A-reg,B-cls (default: all six)")
    cv.add_argument("--cv-epochs", type=int, help="epochs per CV trial (default 15; rsna.yaml: 50)")
    cv.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default 1)")
    cv.add_argument("--gpus-per-trial", type=float,
                    help="GPUs per trial; a fraction packs trials on a GPU (default 0: CPU)")
    cv.add_argument("--max-concurrent-trials", type=int, help="default: as many as the cluster holds")
    cv.add_argument("--inner-val-fraction", type=float,
                    help="share of each trial's training folds held out to choose its epoch (default 0.15); "
                         "0: a fixed schedule, the last epoch. The scored fold never chooses anything")


def add_test_args(parser: argparse.ArgumentParser) -> None:
    """The locked test split of a full run."""
    test = parser.add_argument_group("locked test split (scored once, at the end, by the shipped bundle)")
    test.add_argument("--test-fraction", type=float,
                      help="share of the labelled images set aside before anything is fit, stratified by sex "
                           "and age, fixed by --seed (default 0.1; 0: none)")
    test.add_argument("--test-images", help="an official test set instead (folder, s3:// prefix or .txt list)")
    test.add_argument("--test-labels", help="the test set's labels (with --test-images)")


def config_from_args(args: argparse.Namespace) -> Config:
    overrides: dict[str, Any] = {
        "data": {k: v for k, v in {
            "images": args.images, "labels": args.labels, "keypoints": args.keypoints,
            "storage_options": args.storage_options, "synthetic_n": args.synthetic_n, "seed": args.seed,
            "test_fraction": getattr(args, "test_fraction", None), "test_images": getattr(args, "test_images", None),
            "test_labels": getattr(args, "test_labels", None),
        }.items() if v is not None},
        "keypoints": {k: v for k, v in {"source": args.keypoint_source, "model": args.keypoint_model}.items()
                      if v is not None},
        "ray": {k: v for k, v in {"address": args.address, "num_cpus": args.num_cpus,
                                  "verbose": args.verbose}.items() if v is not None},
        "cv": {k: v for k, v in {
            "k": getattr(args, "folds", None), "kinds": getattr(args, "kinds", None),
            "epochs": getattr(args, "cv_epochs", None), "cpus_per_trial": getattr(args, "cpus_per_trial", None),
            "gpus_per_trial": getattr(args, "gpus_per_trial", None),
            "max_concurrent_trials": getattr(args, "max_concurrent_trials", None),
            "inner_val_fraction": getattr(args, "inner_val_fraction", None),
        }.items() if v is not None},
    }
    if args.output is not None:
        overrides["output"] = args.output
    try:
        return load_config(args.config, overrides)
    except (ValueError, FileNotFoundError) as err:  # all of it is the user's configuration
        raise UserError(str(err)) from err


def _synth(args: argparse.Namespace) -> int:
    from boneage.data import synth

    paths = synth.write_dataset(args.n, args.out, seed=args.seed, size=args.size, workers=args.workers,
                                masks=args.masks)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    from boneage.distributed import ray_env
    from boneage import run

    config = config_from_args(args)
    run.check_config(config, need_labels=False)  # registering needs no labels
    config = run.resolve_data(config)
    run.save_config(config)
    ray_env.init_ray(config.ray)
    run.preprocess(config)
    return 0


def _cv(args: argparse.Namespace) -> int:
    from boneage.distributed import ray_env
    from boneage import run

    config = config_from_args(args)
    run.check_config(config, need_data=False)
    run.check_registered(config)
    run.check_folds(config)  # too few images for k folds: said before Ray starts
    ray_env.init_ray(config.ray)
    run.cross_validate(config)  # saves its resolved config as OUTPUT/cv/config.yaml
    return 0


def _score(args: argparse.Namespace) -> int:
    from boneage import bundle, run
    from boneage.distributed import ray_env
    from boneage.config import RayConfig

    bundle.read_manifest(args.bundle, args.storage_options)  # a wrong --bundle fails before Ray starts
    ray_env.init_ray(RayConfig(address=args.address, num_cpus=args.num_cpus, verbose=args.verbose))
    run.score(args.input if len(args.input) > 1 else args.input[0], args.bundle, args.out,
              subjects=args.subjects, storage_options=args.storage_options, actors=args.actors,
              gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size, id_from=args.id_from,
              keep_dicom_uids=args.keep_dicom_uids, cards=args.cards)
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, e.g. 2044x1514, not {text!r}") from None
    return h, w


def version_text() -> str:
    """`boneage --version`: this package's, Ray's, torch's and Python's versions and the bundle format
    this code writes and reads. From the installed packages' metadata: neither Ray nor torch is imported."""
    import platform
    from importlib import metadata

    import boneage
    from boneage.bundle import BUNDLE_FORMAT, BUNDLE_VERSION

    def installed(name: str) -> str:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return "not installed"

    return "\n".join([f"boneage {boneage.__version__}", f"ray {installed('ray')}", f"torch {installed('torch')}",
                      f"python {platform.python_version()}", f"bundle format {BUNDLE_VERSION} ({BUNDLE_FORMAT})"])


class VersionAction(argparse.Action):
    """argparse's 'version' action, with the text computed only when --version is given."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        print(version_text())  # on stdout, as argparse's own version action prints
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="boneage",
        description="Pediatric bone age from hand radiographs: synthetic data, preprocessing and "
                    "registration on Ray Data, k-fold CV of the zone models on Ray Tune + Train. "
                    "See README.md and docs/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action=VersionAction,
                        help="print the versions of boneage, Ray, torch and Python and the bundle format, and exit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("synth", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="write synthetic hand radiographs with ground truth",
                       description="Write N synthetic left-hand radiographs (PNG) whose anatomy follows bone "
                                   "age and sex, with labels.csv (RSNA format), keypoints.csv, truth.csv "
                                   "and optionally the hand masks.")
    p.add_argument("--n", type=int, required=True, help="number of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0, help="the set is deterministic by seed")
    p.add_argument("--size", type=_size, default=None, help="HEIGHTxWIDTH, e.g. 640x480 (default: ~2044x1514, varying)")
    p.add_argument("--workers", type=int, default=1, help="processes")
    p.add_argument("--masks", action="store_true", help="also write masks/<id>.png")
    p.set_defaults(func=_synth)

    p = sub.add_parser("preprocess", help="mask, key points and registration of every image, on Ray Data",
                       description="Read radiographs and labels, mask each hand, find its key points, register "
                                   "it into the 2080x1600 frame and write OUTPUT/registered/*.parquet (one row "
                                   "per input, failures included) and OUTPUT/qa/registered_sheet.png.")
    add_run_args(p)
    p.set_defaults(func=_preprocess)

    p = sub.add_parser("cv", help="k-fold CV of the zone models on a registered table, on Ray Tune + Train",
                       description="Read OUTPUT/registered/*.parquet (from `boneage preprocess`), train every "
                                   "(model kind, sex, fold) as a Ray Tune trial running a Ray Train TorchTrainer, "
                                   "and write OUTPUT/cv/oof.parquet (one row per labelled image, an out-of-fold "
                                   "prediction per kind), trials.parquet, models/<trial>.pt and summary.json. "
                                   "Trials finished by an earlier run of the same OUTPUT are skipped.")
    add_run_args(p)
    add_cv_args(p)
    p.set_defaults(func=_cv)

    p = sub.add_parser("score", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                       help="bone age of every radiograph in a folder, with a bundle, to parquet (Ray Data)",
                       description="Decode, preprocess, find key points, register and score every radiograph "
                                   "with every fold model of a bundle and its ensemble. One row per input file, "
                                   "bad files included (status 'error' and why); exit status 0 when the run "
                                   "finishes, whatever the files. Rows are written as they are scored; a rerun "
                                   "on the same --out scores only the files without a row. Columns and "
                                   "provenance: docs/scoring.md.")
    p.add_argument("input", nargs="+", help="folder, s3:// prefix, .txt list, or image files (PNG, JPEG, DICOM)")
    p.add_argument("--bundle", required=True, help="model bundle folder (OUTPUT/bundle of full_cv), local or s3://")
    p.add_argument("--out", required=True, help="output: a .parquet file (its parts go to OUT.parts/ as they are "
                                                "scored), or a folder of parquet parts; local or s3://")
    p.add_argument("--id-from", choices=["path", "sop"], default="path",
                   help="row ids: 'path', the file's path under the input folder without extension (a flat "
                        "folder: the file name); 'sop', the DICOM SOPInstanceUID (other files: their path)")
    p.add_argument("--keep-dicom-uids", action="store_true",
                   help="add StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID columns: identifiers, "
                        "which link a row back to the patient's study (off: no identifying tag is copied)")
    p.add_argument("--subjects", help="CSV with id and sex (male or sex column) and/or chronological age in months "
                                      "(age_months); else DICOM PatientSex and dates; else sex unknown")
    p.add_argument("--storage-options", type=json.loads, metavar="JSON", help="fsspec options for s3://")
    p.add_argument("--cards", help="also write a PNG card per image here (registered hand, zones, occlusion heatmap, "
                                   "bone age, SDS, gate; ~130 extra ensemble passes per image)")
    p.add_argument("--actors", type=int, default=None,
                   help="scoring actors (model copies); default: one per GPU of the cluster, else 1")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPU per scoring actor (0: CPU); default: 1 where the cluster has GPUs, else 0. "
                        "Never the bundle's training settings: a GPU-trained bundle scores on a CPU machine")
    p.add_argument("--batch-size", type=int, help="images per preprocessing task (default: the bundle's)")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--verbose", action="store_true", help="also show Ray's INFO lines and the workers' output")
    p.set_defaults(func=_score)
    return parser


def user_errors(name: str):
    """Whole-run input problems (boneage.errors.UserError: a wrong folder, a CSV without the columns we
    need, a bad config key, a missing, damaged or unsafe bundle) end with one line and exit status 2.
    Anything else is a bug and keeps its traceback (exit status 1): a message alone would hide where.
    Per-item problems never get here, they are rows with status 'error'."""

    def wrap(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            progress.line_buffered()
            try:
                return fn(*args, **kwargs)
            except UserError as err:
                print(f"{name}: error: {err}", file=sys.stderr)
                return 2

        return wrapped

    return wrap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return user_errors(f"boneage {args.command}")(args.func)(args)


if __name__ == "__main__":
    sys.exit(main())
