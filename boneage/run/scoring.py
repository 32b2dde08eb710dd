"""Scoring radiographs with a bundle (`boneage score`, and the locked test split's evaluation): the
scorer's resources, the subjects' sex and age, the Ray Data run, and its printed summary."""

from __future__ import annotations

import sys
import time

import numpy as np
import pandas as pd

from boneage.config import Config, absolute
from boneage.data import ingest, storage
from boneage.data.labels import read_subjects
from boneage.errors import STATUS_OK


SUMMARY_COLUMNS = ("id", "uri", "status", "error", "sex_source", "registration_doubtful", "boneage_months",
                   "boneage_sd_months", "boneage_lower_months", "boneage_upper_months")


# what the gate's and the SDS's counts are read from (boneage.clinical.columns.describe)
CLINICAL_SUMMARY_COLUMNS = ("accepted", "reject_reason", "boneage_interpretation", "sds_note", "sex_mismatch")


def scoring_resources(actors: int | None, gpus_per_actor: float | None, cluster_gpus: float,
                      pipeline: str = "staged", cluster_cpus: float = 1.0,
                      cpus_per_write: float = 0.1) -> tuple[int, float]:
    """(actors, GPUs per actor) of a scoring run: what the user gave, else from the cluster: one actor
    per GPU where there are GPUs; on CPU, one lean actor per core (ray_score.lean_actors), or one
    staged scoring actor."""
    from boneage.distributed.ray_score import lean_actors

    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster_gpus >= 1 and pipeline != "lean" else 0.0
    if actors is None:
        if gpus_per_actor > 0:
            actors = max(1, int(cluster_gpus // gpus_per_actor))
        else:
            actors = lean_actors(cluster_cpus, cpus_per_write) if pipeline == "lean" else 1
    return int(actors), float(gpus_per_actor)


def scoring_pipeline(pipeline: str, gpus_per_actor: float | None, cluster_gpus: float) -> str:
    """"lean" or "staged" for `pipeline` ("auto", "lean" or "staged"; boneage.distributed.ray_score.run_score).
    auto: staged where the scoring actors have GPUs (preparation then runs in CPU tasks over the whole
    cluster, feeding the GPUs), else lean (every stage of a batch in one actor per core: docs/benchmarks.md,
    "The lean scoring path")."""
    from boneage.errors import UserError

    on_gpu = gpus_per_actor > 0 if gpus_per_actor is not None else cluster_gpus >= 1
    if pipeline == "auto":
        return "staged" if on_gpu else "lean"
    if pipeline == "lean" and gpus_per_actor:
        raise UserError("--pipeline lean scores on CPU: leave --gpus-per-actor out (or 0), or use --pipeline staged")
    return pipeline


def scoring_config(config: Config, actors: int, gpus_per_actor: float) -> Config:
    """The bundle's preprocessing and key point settings with the scorer's resources: the key point
    model's actors take what the scoring actors take. A bundle trained with GPU actors (configs/rsna.yaml)
    would otherwise ask a CPU-only machine for GPUs that are not there, and wait forever."""
    config.keypoints.actors, config.keypoints.gpus_per_actor = actors, gpus_per_actor
    config.keypoints.use_gpu = gpus_per_actor > 0
    return config


def data_noun(data: dict) -> str:
    """'synthetic radiographs', 'real radiographs'... for a bundle's training_data."""
    return {"synthetic": "synthetic radiographs", "real": "real radiographs",
            "mixed": "radiographs, synthetic and real,"}.get(data["kind"], "radiographs")


def measured_accuracy_line(manifest: dict) -> str | None:
    """The bundle's measured accuracy, saying on what: its locked test split of N synthetic (or real)
    radiographs, else out of fold on its N training radiographs. None when it has neither."""
    from boneage import bundle as bundle_mod
    from boneage.validation import metrics

    measured, data = manifest.get("accuracy", {}), bundle_mod.training_data(manifest)
    if "test_split" in measured:
        test = measured["test_split"]
        return (f"[score] the bundle's measured accuracy on its locked test split of {test.get('images')} "
                f"{data_noun(data)}: {metrics.describe(test)}")
    if "out_of_fold" in measured:
        on = f"the {data['images']} {data_noun(data)} it was trained on" if data["images"] else "its training images"
        return f"[score] the bundle's measured accuracy, out of fold on {on}: {metrics.describe(measured['out_of_fold'])}"
    return None


# Input files whose PNG marks are read when a bundle trained on synthetic hands scores them.
SYNTHETIC_CHECK_SAMPLE = 256


def synthetic_warning(manifest: dict, uris: list[str], storage_options: dict | None = None,
                      counts: dict | None = None) -> str | None:
    """The banner `score` prints when a bundle trained on synthetic radiographs scores images that are
    not synthetic (not written by `boneage synth`: boneage.data.images.is_synthetic; up to
    SYNTHETIC_CHECK_SAMPLE of them are read, unless `counts` says already); None otherwise, and for a
    bundle trained on real images."""
    from boneage import bundle as bundle_mod
    from boneage.data.images import count_synthetic

    data = bundle_mod.training_data(manifest)
    if data["kind"] != "synthetic":
        return None
    counts = counts or count_synthetic(uris, storage_options, limit=SYNTHETIC_CHECK_SAMPLE)
    real = counts["checked"] - counts["synthetic"]
    if not real:
        return None
    rule = "WARNING " + "=" * 92
    return "\n".join([
        rule,
        f"WARNING: this bundle was trained on {data['images']} SYNTHETIC hand radiographs (made by `boneage synth`:",
        f"WARNING: the embedded default data), and it is scoring real ones: {real} of the {counts['checked']} input "
        "images checked are not synthetic.",
        "WARNING: Its bone ages, and the accuracy it measured on synthetic hands, mean nothing for real hands.",
        "WARNING: To score real radiographs, train a bundle on real ones (README, 'Using it': the RSNA data).",
        rule,
    ])


def dicom_summary(table: pd.DataFrame, folder: str) -> str:
    """--dicom-out's line: how many rows have an SR and SC in `folder`, and why the others have none."""
    written = int(table["dicom_sr_uid"].notna().sum())
    reasons = table.loc[table["dicom_sr_uid"].isna(), "dicom_error"].fillna("unknown").str.split(":").str[0]
    why = "; ".join(f"{n} {reason}" for reason, n in reasons.value_counts().items())
    return f"[score] DICOM output: {written}/{len(table)} rows have an SR and a card SC in {folder}" + (
        f"; none for {len(table) - written}: {why}" if why else "")


def dicomweb_input(source: str, studies: str | None, qido: str | None, auth_file: str | None,
                   timeout: float | None, keep_uids: bool, storage_options: dict | None = None):
    """(manifest, reader) of a DICOMweb input (boneage.data.dicomweb): the instances of the --studies
    file's studies and/or of the --qido query, listed here (UIDs only); the reader retrieves each one in
    Ray's decoding tasks. UserError (one line, exit status 2) when the service cannot be reached, refuses
    the credentials, or has nothing to score."""
    from boneage.data import dicomweb
    from boneage.errors import UserError

    if not studies and not qido:
        raise UserError("a DICOMweb input needs --studies FILE (StudyInstanceUIDs, one a line) and/or --qido QUERY "
                        "(e.g. 'Modality=CR&StudyDate=20240101-20240131'): boneage does not list a whole PACS")
    service = dicomweb.service(source, auth_file, timeout)
    study_uids = dicomweb.read_study_list(absolute(studies), storage_options) if studies else None
    instances, missing, own = dicomweb.list_instances(service, study_uids, dicomweb.parse_query(qido))
    asked = " and ".join(([f"--studies {studies}"] if studies else []) + ([f"--qido {qido!r}"] if qido else []))
    if not instances:
        if study_uids and len(missing) == len(study_uids):
            raise UserError(f"the DICOMweb service {service.url} has no study of {asked}"
                            + (f" (e.g. {missing[0]})" if missing else ""))
        raise UserError(f"nothing to score: no instance on {service.url} matches {asked}")
    print(f"[score] DICOMweb {service.url}: {len(instances)} instances in "
          f"{len({i.study for i in instances})} studies ({asked})"
          + (f"; {len(missing)} studies not found, each an error row" if missing else "")
          + (f"; {own} instances of boneage's own result series left out" if own else ""))
    return dicomweb.manifest_rows(source, instances, missing, keep_uids), dicomweb.Reader(service)


def stow_summary(table: pd.DataFrame, url: str) -> str:
    """--stow's line: how many rows' SR and SC the service took, how many failed (sent again by a rerun)."""
    stowed = table["dicom_stow"].fillna("")
    failed = stowed.str.startswith("failed")
    line = f"[score] STOW-RS to {url}: {int((stowed == 'stored').sum())}/{len(table)} rows' SR and card SC stored"
    if failed.any():
        line += f"; {int(failed.sum())} failed (a rerun on the same --out sends them again), e.g. {stowed[failed].iloc[0]}"
    return line


def score(images: str | list[str], bundle_uri: str, out_uri: str, subjects: str | None = None,
          storage_options: dict | None = None, actors: int | None = None, gpus_per_actor: float | None = None,
          batch_size: int | None = None, id_from: str = "path", keep_dicom_uids: bool = False,
          resume: bool = True, cards: str | None = None, dicom_out: str | None = None, studies: str | None = None,
          qido: str | None = None, stow: bool = False, dicomweb_auth: str | None = None,
          dicomweb_timeout: float | None = None, pipeline: str = "auto") -> pd.DataFrame:
    """Score radiographs with a bundle (boneage.distributed.ray_score): one row per input file in `out_uri` (a
    .parquet file, or a folder of parts), with sex and chronological age from `subjects` (CSV) or the
    DICOM header. Bad files are rows with status 'error'; the summary is printed. A rerun on the same
    `out_uri` scores only the files without a row (`resume=False`: all of them, afresh). Returns the
    table's SUMMARY_COLUMNS (the driver never holds the whole table). With `cards` (a folder), a PNG
    per image (boneage.clinical.cards); with `dicom_out` (a folder), a DICOM SR and the card as a Secondary
    Capture per image read from a DICOM file (boneage.clinical.dicom_out; docs/pacs.md). `actors` / `gpus_per_actor`: the scoring actors' (and the key point
    model's), never the bundle's training run's; None: from the cluster (scoring_resources). Ray is
    started by the caller.

    `images` may be a DICOMweb service, dicomweb+http(s)://HOST[:PORT]/PATH, with `studies` (a file of
    StudyInstanceUIDs) and/or `qido` (a QIDO-RS query); its credentials come from `dicomweb_auth` (a JSON
    file) or the environment, never an argument (boneage.data.dicomweb; docs/pacs.md). `stow`: send each
    SR and card SC back to it with STOW-RS (column dicom_stow). `pipeline`: scoring_pipeline's."""
    from boneage import bundle as bundle_mod, score as score_mod
    from boneage.clinical import columns, gate
    from boneage.distributed import ray_env, ray_score
    from boneage.validation import intervals
    from boneage.config import load_config
    from boneage.data import dicomweb
    from boneage.errors import UserError

    started = time.time()
    from_pacs = dicomweb.is_dicomweb(images)
    if not from_pacs and (studies or qido or stow or dicomweb_auth):
        raise UserError("--studies, --qido, --stow and --dicomweb-auth go with a DICOMweb input "
                        "(dicomweb+http://HOST[:PORT]/PATH)")
    if from_pacs:
        id_from = "sop"  # a DICOMweb instance's id is its SOPInstanceUID (and the provenance says so)
    if dicom_out or stow:
        from boneage.clinical import dicom_out as dicom_out_mod

        dicom_out_mod.check_installed()  # said before any work: exit status 2
    # Local paths against the caller's working directory: Ray's workers run elsewhere.
    if isinstance(images, (list, tuple)) and any(dicomweb.is_dicomweb(i) for i in images):
        raise UserError("a DICOMweb input is scored alone: give one dicomweb+http(s):// URL, no other inputs")
    images = [absolute(i) for i in images] if isinstance(images, (list, tuple)) else absolute(images)
    bundle_uri, out_uri, subjects = absolute(bundle_uri), absolute(out_uri), absolute(subjects)
    options = dict(storage_options or {})
    loaded = bundle_mod.load_bundle(bundle_uri, options)  # a bad bundle fails here, before any work
    provenance = ray_score.new_provenance(
        bundle_uri, storage.read_bytes(storage.join_uri(bundle_uri, bundle_mod.MANIFEST), options), loaded.manifest,
        id_from, keep_dicom_uids)
    if not resume:
        ray_score.remove_output(out_uri, options)
    trained = loaded.config or {}
    config = load_config(None, {"preprocess": trained.get("preprocess", {}), "keypoints": trained.get("keypoints", {}),
                                "data": {"storage_options": options}})
    gpus = ray_env.cluster_gpus()
    pipeline = scoring_pipeline(pipeline, gpus_per_actor, gpus)
    actors, gpus_per_actor = scoring_resources(actors, gpus_per_actor, gpus, pipeline, ray_env.cluster_cpus(),
                                               config.preprocess.cpus_per_write)
    config = scoring_config(config, actors, gpus_per_actor)
    print(f"[score] {pipeline} pipeline: {actors} scoring actor(s), {gpus_per_actor:g} GPU each (the cluster has "
          f"{gpus:g} GPUs)")
    if batch_size:
        config.preprocess.batch_size = batch_size
    reader = None
    if from_pacs:  # ids are the SOPInstanceUIDs; each instance is retrieved in Ray's decoding tasks
        manifest, reader = dicomweb_input(images, studies, qido, dicomweb_auth, dicomweb_timeout, keep_dicom_uids,
                                          options)
    else:
        manifest = ingest.build_manifest(images, None, options, id_from=id_from, keep_uids=keep_dicom_uids)
    ages: dict[str, float] = {}
    if subjects:
        table, errors = read_subjects(subjects, options)
        manifest = score_mod.with_subjects(manifest, table, errors)
        ages = {r.id: r.age_months for r in table.itertuples() if np.isfinite(r.age_months)}
        unmatched = sorted(set(table.id) - set(manifest.id))
        if unmatched:
            print(f"[score] {len(unmatched)} ids in {subjects} have no image, e.g. {unmatched[:3]}")
    per_kind = ("one model refit on every CV image" if loaded.manifest.get("ship") == "refit"
                else f"{loaded.manifest['folds']} fold models")  # cv.ship
    print(f"[score] {len(manifest)} files; bundle {bundle_uri}: {len(loaded.kinds)} kinds x "
          f"{len(loaded.sexes)} sexes, {per_kind} each")
    accuracy = measured_accuracy_line(loaded.manifest)
    if accuracy:
        print(accuracy)
    if loaded.manifest.get("sex_kind"):  # said once: whether a predicted sex may replace an unknown one
        from boneage.validation import sex_calls

        print(sex_calls.describe(sex_calls.of_bundle(loaded.training, loaded.manifest["sex_kind"])))
    readable = manifest.loc[manifest.status == STATUS_OK, "uri"].tolist()
    warning = synthetic_warning(loaded.manifest, readable, options,  # a PACS's instances: DICOM, never synthetic
                                {"checked": len(readable), "synthetic": 0} if from_pacs else None)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    manifest = manifest.drop(columns=["age_months"], errors="ignore")
    ray_score.run_score(manifest, bundle_uri, config, out_uri, provenance, actors=actors,
                        gpus_per_actor=gpus_per_actor, ages=ages,
                        uid_columns=ingest.UID_COLUMNS if keep_dicom_uids else (), cards=absolute(cards),
                        dicom_dir=absolute(dicom_out), reader=reader, stow=stow, pipeline=pipeline)
    table = ray_score.read_output(out_uri, SUMMARY_COLUMNS + (*CLINICAL_SUMMARY_COLUMNS, *(("card", "card_error") if cards else ()),
                                                              *(score_mod.DICOM_COLUMNS if dicom_out or stow else ()),
                                                              *(score_mod.STOW_COLUMNS if stow else ())),
                                  options)
    result = score_mod.summary(table)
    print(f"[score] {result['scored']}/{result['files']} scored, {result['failed']} failed "
          f"{result['failed_by_code'] or ''}; sex from {result['sex_source']}; "
          f"{result['registration_doubtful']} registrations doubtful; {time.time() - started:.0f} s → {out_uri}")
    print(columns.describe(table, gate.calibration_of(loaded.training)))
    print(intervals.describe(intervals.calibration_of(loaded.training), loaded.training))  # once: a null-bound bundle too
    if dicom_out:
        print(dicom_summary(table, absolute(dicom_out)))
    if stow:
        print(stow_summary(table, reader.service.url))
    for row in table[table.status != STATUS_OK].head(10).itertuples():
        print(f"  {row.id}: {row.error}")
    return table
