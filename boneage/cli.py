"""The `boneage` command. Each subcommand is a thin layer over a library function; flags default to
None so that the configuration (boneage.config, YAML presets) stays the single source of defaults."""

from __future__ import annotations

import argparse
import functools
import json
import sys
import typing
from pathlib import Path
from typing import Any

from boneage import config as config_module
from boneage.config import Config, _plain, load_config
from boneage import progress
from boneage.errors import UserError


# Each flag of the run commands and the setting it sets. Its type, choices and help text (with the
# default) come from the setting in boneage.config, so that a flag never says another default than the
# run uses; flags default to None, so that an unset flag keeps the YAML preset's value.
RUN_FLAGS = {
    "data": {"--images": "data.images", "--labels": "data.labels", "--keypoints": "data.keypoints",
             "--storage-options": "data.storage_options", "--synthetic-n": "data.synthetic_n",
             "--seed": "data.seed"},
    "key points": {"--keypoint-source": "keypoints.source", "--keypoint-model": "keypoints.model"},
    "run": {"--output": "output", "--address": "ray.address", "--num-cpus": "ray.num_cpus",
            "--verbose": "ray.verbose"},
}
CV_FLAGS = {
    "cross-validation": {"--folds": "cv.k", "--kinds": "cv.kinds", "--cv-epochs": "cv.epochs",
                         "--cpus-per-trial": "cv.cpus_per_trial", "--gpus-per-trial": "cv.gpus_per_trial",
                         "--max-concurrent-trials": "cv.max_concurrent_trials",
                         "--inner-val-fraction": "cv.inner_val_fraction"},
}
TEST_FLAGS = {
    "locked test split (scored once, at the end, by the shipped bundle)": {
        "--test-fraction": "data.test_fraction", "--test-images": "data.test_images",
        "--test-labels": "data.test_labels"},
}
SERVE_FLAGS = {
    "service (boneage serve; docs/serving.md)": {
        "--host": "serve.host", "--port": "serve.port", "--replicas": "serve.replicas",
        "--max-replicas": "serve.max_replicas", "--cpus-per-replica": "serve.cpus_per_replica",
        "--gpus-per-replica": "serve.gpus_per_replica", "--torch-threads": "serve.torch_threads",
        "--max-batch-size": "serve.max_batch_size",
        "--max-ongoing-requests": "serve.max_ongoing_requests", "--max-queued-requests": "serve.max_queued_requests",
        "--max-request-mb": "serve.max_request_mb", "--max-pixels-mpx": "serve.max_pixels_mpx",
        "--request-timeout-s": "serve.request_timeout_s",
        "--token-file": "serve.token_file"},
}
FLAGS = {flag: setting for table in (RUN_FLAGS, CV_FLAGS, TEST_FLAGS, SERVE_FLAGS) for group in table.values()
         for flag, setting in group.items()}  # flag -> setting, e.g. "--folds" -> "cv.k"
SETTING_FLAGS = {setting: flag for flag, setting in FLAGS.items()}  # "cv.k" -> "--folds"
PRESETS = Path(__file__).resolve().parents[1] / "configs"  # configs/*.yaml in a checkout


@functools.cache
def preset_values() -> dict[str, list[tuple[str, Any]]]:
    """Setting -> [(preset file, its value)] for the presets in configs/ that change a default
    (embedded.yaml writes the defaults out); empty where the package runs without its checkout."""
    found: dict[str, list[tuple[str, Any]]] = {}
    known = config_module.settings()
    for path in sorted(PRESETS.glob("*.yaml")) if PRESETS.is_dir() else []:
        for name, value in _flatten(config_module.read_yaml(path)).items():
            if name in known and _plain(value) != _plain(config_module.default_of(known[name])):
                found.setdefault(name, []).append((path.name, value))
    return found


def _flatten(tree: dict[str, Any]) -> dict[str, Any]:
    return {f"{section}.{key}" if isinstance(values, dict) and section in config_module.SECTIONS else section: value
            for section, values in tree.items()
            for key, value in (values.items() if isinstance(values, dict) and section in config_module.SECTIONS
                               else [(None, values)])}


def flag_help(setting: str) -> str:
    """A flag's help: the setting's description, its default and the presets' values, from boneage.config."""
    info = config_module.settings()[setting]
    presets = "".join(f"; {name}: {config_module.show_value(value)}" for name, value in preset_values().get(setting, []))
    text = f"{info.description} (default: {config_module.show_value(config_module.default_of(info))}{presets})"
    return text.replace("%", "%%")


def _add_flags(parser: argparse.ArgumentParser, table: dict[str, dict[str, str]],
               before: dict[str, Any] | None = None) -> None:
    for title, flags in table.items():
        group = parser.add_argument_group(title)
        for flag, setting in flags.items():
            if before and title in before:
                before.pop(title)(group)
            info = config_module.settings()[setting]
            kind = config_module.type_name(info.annotation)
            kwargs: dict[str, Any] = {"default": None, "help": flag_help(setting)}
            inner = typing.get_args(info.annotation)
            if kind.startswith("bool"):
                kwargs["action"] = "store_true"
            elif kind.startswith("list of"):
                kwargs["metavar"] = "A,B,..."
            elif kind.startswith("mapping"):
                kwargs["metavar"] = "JSON"
            elif inner and all(isinstance(a, str) for a in inner):  # a Literal: its choices, checked by the model
                kwargs["metavar"] = "{" + ",".join(inner) + "}"
            group.add_argument(flag, **kwargs)


def add_run_args(parser: argparse.ArgumentParser) -> None:
    """Options shared by every workflow that reads data and writes a run folder."""
    config_flag = {"run": lambda group: group.add_argument(
        "--config", help="YAML preset (configs/embedded.yaml, configs/rsna.yaml); flags override it")}
    _add_flags(parser, RUN_FLAGS, before=config_flag)


def add_cv_args(parser: argparse.ArgumentParser) -> None:
    """Options of the k-fold CV stage (the rest: YAML, e.g. configs/rsna.yaml; docs/settings.md)."""
    _add_flags(parser, CV_FLAGS)


def add_test_args(parser: argparse.ArgumentParser) -> None:
    """The locked test split of a full run."""
    _add_flags(parser, TEST_FLAGS)


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    """The HTTP service's settings (the rest: YAML's serve section; docs/settings.md)."""
    _add_flags(parser, SERVE_FLAGS)


def _from_flag(flag: str, setting: str, value: Any) -> Any:
    """A flag's text as the setting's YAML value would be: lists split at commas, mappings as JSON;
    the rest goes to the model as text, which checks and converts it (one line per bad value)."""
    kind = config_module.type_name(config_module.settings()[setting].annotation)
    if isinstance(value, str) and kind.startswith("list of"):
        return tuple(v.strip() for v in value.split(",") if v.strip())
    if isinstance(value, str) and kind.startswith("mapping"):
        try:
            return json.loads(value)
        except json.JSONDecodeError as err:
            raise UserError(f"{setting}={value} ({flag}): must be JSON ({err.msg})") from None
    return value


def config_from_args(args: argparse.Namespace) -> Config:
    """Defaults, then --config, then every flag given (FLAGS), validated together (boneage.config)."""
    overrides: dict[str, Any] = {}
    for flag, setting in FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"), None)
        if value is None:
            continue
        *sections, key = setting.split(".")
        target = overrides
        for section in sections:
            target = target.setdefault(section, {})
        target[key] = _from_flag(flag, setting, value)
    try:
        return load_config(getattr(args, "config", None), overrides, labels=SETTING_FLAGS)
    except (ValueError, FileNotFoundError) as err:  # all of it is the user's configuration
        raise UserError(str(err)) from err


def _config(args: argparse.Namespace) -> int:
    if args.markdown:
        print(config_module.settings_markdown(SETTING_FLAGS), end="")
    else:
        print(config_from_args(args).to_yaml(), end="")
    return 0


def _synth(args: argparse.Namespace) -> int:
    from boneage.data import synth

    paths = synth.write_dataset(args.n, args.out, seed=args.seed, size=args.size, workers=args.workers,
                                masks=args.masks)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return 0


def _preprocess(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # a bad setting is said at once, before the heavy imports
    from boneage.distributed import ray_env
    from boneage import run

    run.check_config(config, need_labels=False)  # registering needs no labels
    config = run.resolve_data(config)
    run.save_config(config)
    ray_env.init_ray(config.ray)
    run.preprocess(config)
    return 0


def _cv(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # a bad setting is said at once, before the heavy imports
    from boneage.distributed import ray_env
    from boneage import run

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

    from boneage.data import dicomweb

    bundle.read_manifest(args.bundle, args.storage_options)  # a wrong --bundle fails before Ray starts
    if len(args.input) == 1 and dicomweb.is_dicomweb(args.input[0]):  # so does an unreachable or refusing PACS
        dicomweb.check(dicomweb.service(args.input[0], args.dicomweb_auth, args.dicomweb_timeout))
    ray_env.init_ray(RayConfig(address=args.address, num_cpus=args.num_cpus, verbose=args.verbose))
    run.score(args.input if len(args.input) > 1 else args.input[0], args.bundle, args.out,
              subjects=args.subjects, storage_options=args.storage_options, actors=args.actors,
              gpus_per_actor=args.gpus_per_actor, batch_size=args.batch_size, id_from=args.id_from,
              keep_dicom_uids=args.keep_dicom_uids, cards=args.cards, dicom_out=args.dicom_out,
              studies=args.studies, qido=args.qido, stow=args.stow, dicomweb_auth=args.dicomweb_auth,
              dicomweb_timeout=args.dicomweb_timeout, pipeline=args.pipeline)
    return 0


def _serve(args: argparse.Namespace) -> int:
    config = config_from_args(args)  # a bad setting is said at once, before the heavy imports
    from boneage import bundle
    from boneage.distributed import ray_env
    from boneage.run import serving

    bundle.read_manifest(args.bundle, config.data.storage_options)  # a wrong --bundle fails before Ray starts
    serving.check_installed()
    ray_env.init_ray(config.ray)
    serving.serve(args.bundle, config.serve, config.data.storage_options)
    return 0


def _size(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must be HEIGHTxWIDTH, e.g. 2044x1514, not {text!r}") from None
    return h, w


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """Appends '(default: X)' where X says something: not for None, an off switch, or a help text that
    already says its default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


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

    p = sub.add_parser("synth", formatter_class=DefaultsHelp,
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

    p = sub.add_parser("score", formatter_class=DefaultsHelp,
                       help="bone age of every radiograph in a folder, with a bundle, to parquet (Ray Data)",
                       description="Decode, preprocess, find key points, register and score every radiograph "
                                   "with every fold model of a bundle and its ensemble. One row per input file, "
                                   "bad files included (status 'error' and why); exit status 0 when the run "
                                   "finishes, whatever the files. Rows are written as they are scored; a rerun "
                                   "on the same --out scores only the files without a row. Columns and "
                                   "provenance: docs/scoring.md.")
    p.add_argument("input", nargs="+", help="folder, s3:// prefix, .txt list, or image files (PNG, JPEG, DICOM); or "
                                            "a DICOMweb service (a PACS), dicomweb+http(s)://HOST[:PORT]/PATH, with "
                                            "--studies and/or --qido")
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
    p.add_argument("--dicom-out", help="also write DICOM here for every image read from a DICOM file: DIR/<id>/sr.dcm "
                                       "(a Structured Report in the source's study) and DIR/<id>/card.dcm (the card "
                                       "as a Secondary Capture; draws the card, seconds per image). Needs the pacs "
                                       "extra; docs/pacs.md")
    pacs = p.add_argument_group(
        "DICOMweb input (a PACS; docs/pacs.md)",
        "Instances are listed with QIDO-RS and retrieved with WADO-RS in the decoding tasks; the row id is the "
        "SOPInstanceUID. Credentials: BONEAGE_DICOMWEB_USER and BONEAGE_DICOMWEB_PASSWORD, or "
        "BONEAGE_DICOMWEB_TOKEN (a bearer token), or --dicomweb-auth; never on the command line.")
    pacs.add_argument("--studies", metavar="FILE", help="the studies to score: StudyInstanceUIDs, one a line")
    pacs.add_argument("--qido", metavar="QUERY",
                      help="a QIDO-RS query for the series to score, e.g. 'Modality=CR&BodyPartExamined=HAND&"
                           "StudyDate=20240101-20240131' (within --studies when both are given)")
    pacs.add_argument("--stow", action="store_true",
                      help="send each image's SR and card SC back to the service (STOW-RS); column dicom_stow. "
                           "Needs the pacs extra")
    pacs.add_argument("--dicomweb-auth", metavar="FILE",
                      help='credentials as JSON, {"username": ..., "password": ...} or {"token": ...} '
                           "(default: the environment variables above)")
    pacs.add_argument("--dicomweb-timeout", type=float, metavar="SECONDS", default=None,
                      help="how long one request may wait for the service (default: 30)")
    p.add_argument("--actors", type=int, default=None,
                   help="scoring actors (model copies); default: one per GPU of the cluster, else one per CPU "
                        "core (lean pipeline) or 1 (staged)")
    p.add_argument("--gpus-per-actor", type=float, default=None,
                   help="GPU per scoring actor (0: CPU); default: 1 where the cluster has GPUs, else 0. "
                        "Never the bundle's training settings: a GPU-trained bundle scores on a CPU machine")
    p.add_argument("--batch-size", type=int, help="images per preprocessing task (default: the bundle's)")
    p.add_argument("--pipeline", choices=("auto", "lean", "staged"), default="auto",
                   help="lean: every stage of a batch of images in one scoring actor per CPU core (no image "
                        "crosses between processes); staged: preparation in CPU tasks over the cluster, "
                        "then the scoring actors (the way to feed GPUs). Default auto: staged where the "
                        "scoring actors have GPUs, else lean. Both give the same rows")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--num-cpus", type=int, help="CPUs for a local Ray (default: all)")
    p.add_argument("--verbose", action="store_true", help="also show Ray's INFO lines and the workers' output")
    p.set_defaults(func=_score)

    p = sub.add_parser("serve", help="a bundle as an HTTP service on Ray Serve: one radiograph in, its bone age out",
                       description="Serve a bundle over HTTP with Ray Serve: POST /v1/boneage scores one radiograph "
                                   "(PNG, JPEG or DICOM) with batch scoring's code and answers its `boneage score` "
                                   "row as JSON (or ?card=1: the card as PNG); GET /v1/health, /v1/model; OpenAPI "
                                   "at /docs. Runs until Ctrl-C. docs/serving.md.")
    p.add_argument("--bundle", required=True, help="model bundle folder (OUTPUT/bundle of full_cv), local or s3://")
    p.add_argument("--config", help="YAML with a serve section (and data.storage_options); flags override it")
    _add_flags(p, {"run": {"--storage-options": "data.storage_options", "--address": "ray.address",
                           "--num-cpus": "ray.num_cpus", "--verbose": "ray.verbose"}})
    add_serve_args(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser("config", help="the configuration a run would use, as YAML; or every setting (--markdown)",
                       description="Print the configuration that a run with these flags would use: the defaults, "
                                   "then --config, then the flags, checked, as YAML (credentials redacted). "
                                   "--markdown: the table of every setting with its type, default, allowed "
                                   "values and flag (docs/settings.md).")
    add_run_args(p)
    add_cv_args(p)
    add_test_args(p)
    add_serve_args(p)
    p.add_argument("--markdown", action="store_true",
                   help="print the settings table instead (boneage config --markdown > docs/settings.md)")
    p.set_defaults(func=_config)
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
