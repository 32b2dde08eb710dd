"""The stages of a run, in order, each reading and writing under `config.output`. Workflows and the
`boneage` command call these; Ray is started by the caller (boneage.ray_env.init_ray)."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

import fsspec
import numpy as np
import pandas as pd

from boneage import frame, ingest, prepare, progress, qa, storage, synth, weights
from boneage.images import list_images
from boneage.labels import read_keypoints, read_subjects
from boneage.config import Config, absolute
from boneage.errors import STATUS_OK, MissingInput, RunError, UserError, error_code
from boneage.progress import fmt_seconds


def check_config(config: Config, need_data: bool = True, need_labels: bool = True) -> None:
    """Settings and input paths that would fail every trial or image, checked before any work starts:
    ValueError or FileNotFoundError naming the setting and what it may be. need_data: check the
    input paths; need_labels: given images need labels (to train)."""
    from boneage.models import MODEL_KINDS, SEX_KINDS
    from boneage.train import CLS_LOSSES, SCHEDULES

    cvc = config.cv
    problems = []
    unknown = [k for k in cvc.kinds if k not in MODEL_KINDS]
    if unknown or not cvc.kinds:
        problems.append(f"cv.kinds {list(cvc.kinds)}: known kinds are {', '.join(MODEL_KINDS)}")
    if cvc.sex_kind is not None and cvc.sex_kind not in SEX_KINDS:
        problems.append(f"cv.sex_kind {cvc.sex_kind!r}: one of {', '.join(SEX_KINDS)}, or null for none")
    if [s for s in cvc.sexes if s not in ("F", "M")] or not cvc.sexes:
        problems.append(f"cv.sexes {list(cvc.sexes)}: each must be F or M")
    if cvc.k < 2:
        problems.append(f"cv.k={cvc.k}: k-fold CV needs at least 2 folds")
    if cvc.epochs < 1 or cvc.batch_size < 1:
        problems.append(f"cv.epochs={cvc.epochs}, cv.batch_size={cvc.batch_size}: both must be at least 1")
    if cvc.cpus_per_trial <= 0 or cvc.gpus_per_trial < 0:
        problems.append(f"cv.cpus_per_trial={cvc.cpus_per_trial} must be > 0 and cv.gpus_per_trial="
                        f"{cvc.gpus_per_trial} >= 0")
    if cvc.schedule not in SCHEDULES:
        problems.append(f"cv.schedule={cvc.schedule!r}: one of {', '.join(SCHEDULES)}")
    if not (cvc.inner_val_fraction == 0 or 0 < cvc.inner_val_fraction < 0.5):
        problems.append(f"cv.inner_val_fraction={cvc.inner_val_fraction}: 0 (fixed schedule) or in (0, 0.5)")
    if cvc.driver_resources is not None and (not isinstance(cvc.driver_resources, dict) or any(
            not isinstance(v, (int, float)) or v < 0 for v in cvc.driver_resources.values())):
        problems.append(f"cv.driver_resources={cvc.driver_resources!r}: a mapping of resource names to amounts >= 0")
    if cvc.cls_loss not in CLS_LOSSES:
        problems.append(f"cv.cls_loss={cvc.cls_loss!r}: one of {', '.join(CLS_LOSSES)}")
    if cvc.cls_sigma <= 0 or cvc.cls_ce_weight < 0:
        problems.append(f"cv.cls_sigma={cvc.cls_sigma} must be > 0 and cv.cls_ce_weight={cvc.cls_ce_weight} >= 0")
    if cvc.schedule == "plateau" and cvc.inner_val_fraction == 0:
        problems.append("cv.schedule=plateau steps on the selection split: set cv.inner_val_fraction > 0")
    if cvc.ensemble not in ("tune", "lad", "nnls"):
        problems.append(f"cv.ensemble={cvc.ensemble!r}: one of tune, lad, nnls")
    if not 0 <= config.data.test_fraction < 0.5:
        problems.append(f"data.test_fraction={config.data.test_fraction}: in [0, 0.5)")
    if config.keypoints.source not in ("model", "geometric"):
        problems.append(f"keypoints.source={config.keypoints.source!r}: 'model' or 'geometric'")
    if problems:
        raise UserError("bad configuration:\n  " + "\n  ".join(problems))
    if not need_data:
        return
    d = config.data
    for flag, uri in (("--images", d.images), ("--labels", d.labels), ("--keypoints", d.keypoints),
                      ("--keypoint-model", config.keypoints.model), ("--test-images", d.test_images),
                      ("--test-labels", d.test_labels)):
        if uri:
            fs, path = fsspec.core.url_to_fs(uri, **d.storage_options)
            if not fs.exists(path):
                raise MissingInput(f"{flag} {uri} does not exist")
    if need_labels and d.images and not d.labels:
        raise UserError("--images needs --labels (bone age and sex of each image) to train")


def save_config(config: Config) -> None:
    storage.write_bytes(storage.join_uri(config.output, "config.yaml"), config.to_yaml().encode(), config.data.storage_options)


def resolve_data(config: Config) -> Config:
    """With no images given, write the embedded synthetic data set (once) and point the config at it.
    Given images are listed once here, so that a wrong folder fails before Ray starts."""
    if config.data.images:
        if not list_images(config.data.images, storage_options=config.data.storage_options):
            raise UserError(f"no images (.png, .jpg, .jpeg, .dcm, .dicom) found in {config.data.images}")
        return config
    if "://" in config.output:
        raise UserError("the embedded synthetic data set is written locally: give --images, or a local --output")
    folder = Path(config.output) / "synthetic"
    if not (folder / "labels.csv").exists():  # a rerun reuses it: it is deterministic by seed anyway
        print(f"[data] writing {config.data.synthetic_n} synthetic radiographs to {folder}")
        synth.write_dataset(config.data.synthetic_n, folder, seed=config.data.seed,
                            size=tuple(config.data.synthetic_size), workers=1)
    config.data.images = str(folder / "images")
    config.data.labels = str(folder / "labels.csv")
    config.data.keypoints = str(folder / "keypoints.csv")
    return config


# -- the locked test split ------------------------------------------------------------------------


def test_split_uri(config: Config) -> str:
    return storage.join_uri(config.output, "test", "split.csv")


def split_test(config: Config) -> pd.DataFrame:
    """The locked test split, set aside before anything is fit: OUTPUT/test/split.csv (id, uri, male,
    boneage, source). config.data.test_images + test_labels: that test set; else test_fraction of the
    labelled images, stratified by sex and age and fixed by seed (none when 0). A rerun keeps the split
    it finds, so that no image ever moves between test and training."""
    from boneage import cv

    options, uri = config.data.storage_options, test_split_uri(config)
    split = read_test_split(config)
    if split is not None:
        print(f"[test] keeping the locked test split of {len(split)} images in {uri}")
        return split
    if config.data.test_images:
        if not config.data.test_labels:
            raise UserError("--test-images needs --test-labels (the test set's bone ages and sexes)")
        manifest = ingest.build_manifest(config.data.test_images, config.data.test_labels, options)
        split = manifest[manifest.status == STATUS_OK].assign(source="test_images")
        if len(manifest) > len(split):
            print(f"[test] {len(manifest) - len(split)} test items unusable, e.g. "
                  f"{manifest[manifest.status != STATUS_OK].error.iloc[0]}")
    else:
        manifest = ingest.build_manifest(config.data.images, config.data.labels, options)
        manifest = manifest[cv.labelled(manifest)].reset_index(drop=True)
        picks = []
        for male in (False, True):
            rows = np.flatnonzero(manifest["male"].to_numpy(bool) == male)
            picks.append(cv.inner_split(manifest["boneage"].to_numpy(float), rows, config.data.test_fraction,
                                        config.data.seed + 1)[1])
        split = manifest.iloc[np.sort(np.concatenate(picks))].assign(source="test_fraction")
    split = split[["id", "uri", "male", "boneage", "source"]].reset_index(drop=True)
    with storage.open_output(uri, "wb", options) as f:
        split.to_csv(f, index=False)
    print(f"[test] {len(split)} images locked away as the test split ({int((~split.male.astype(bool)).sum())} F, "
          f"{int(split.male.astype(bool).sum())} M; {split.source.iloc[0] if len(split) else 'none'}) → {uri}")
    return split


def read_test_split(config: Config) -> pd.DataFrame | None:
    """OUTPUT/test/split.csv, or None when the run has none."""
    fs, path = fsspec.core.url_to_fs(test_split_uri(config), **config.data.storage_options)
    if not fs.exists(path):
        return None
    with fs.open(path, "rb") as f:
        return pd.read_csv(f, dtype={"id": str})


def read_test_ids(config: Config) -> set[str]:
    """The ids of the locked test split (empty when the run has none)."""
    split = read_test_split(config)
    return set() if split is None else set(split["id"])


def evaluate_test(config: Config, bundle_uri: str, n_boot: int = 2000) -> dict[str, Any] | None:
    """Score the locked test split with the finished bundle through `boneage score`'s code path
    (fold-averaged models, ensemble, QA); OUTPUT/test/predictions.parquet and metrics.json; the
    accuracy also goes into the bundle (training.json and manifest). None without a test split."""
    from boneage import bundle, gate, metrics

    options = config.data.storage_options
    split = read_test_split(config)
    if split is None:
        return None
    if not len(split):
        print("[test] no test split (test_fraction 0 and no --test-images): no locked-test accuracy")
        return None
    subjects = storage.join_uri(config.output, "test", "subjects.csv")
    with storage.open_output(subjects, "wb", options) as f:
        split[["id", "male"]].to_csv(f, index=False)
    table = score(split["uri"].tolist(), bundle_uri, storage.join_uri(config.output, "test", "predictions.parquet"),
                  subjects=subjects, storage_options=options, resume=False)  # the bundle may be new: afresh
    scored = split.merge(table[["id", "status", "error", "boneage_months"]], on="id", how="left")
    ok = scored["status"] == STATUS_OK
    acc = metrics.accuracy_report(scored.loc[ok, "boneage_months"], scored.loc[ok, "boneage"],
                                  scored.loc[ok, "male"].astype(bool), n_boot=n_boot, seed=config.data.seed)
    result = {"images": int(len(split)), "scored": int(ok.sum()), "source": str(split["source"].iloc[0]),
              "bootstrap_resamples": n_boot, "failed": [{"id": r.id, "error": r.error} for r in scored[~ok].itertuples()],
              "accuracy": acc,
              # Label-free: the spread of images no fold model saw sets the gate's fold spread threshold.
              "gate_fold_spread": gate.calibrate_fold_spread(
                  table.loc[table.status == STATUS_OK, "boneage_sd_months"])}
    storage.write_bytes(storage.join_uri(config.output, "test", "metrics.json"), json.dumps(result, indent=2).encode(), options)
    bundle.add_test_accuracy(bundle_uri, result, options)
    print(f"[test] the shipped bundle on the locked test split ({result['scored']}/{result['images']} scored): "
          f"{metrics.describe(acc['all'])}")
    return result


def read_annotations(config: Config) -> dict[str, np.ndarray]:
    if not config.data.keypoints:
        return {}
    annotations, errors = read_keypoints(config.data.keypoints, config.data.storage_options)
    for rid, err in list(errors.items())[:5]:
        print(f"[keypoints] annotation of {rid} not used: {err}")
    return annotations


def split_annotations(annotations: dict[str, np.ndarray], seed: int, holdout: float = 0.2
                      ) -> tuple[set[str], set[str]]:
    """(training ids, held-out ids): the held-out annotated images measure the key point error."""
    ids = sorted(annotations)
    order = np.random.default_rng(seed).permutation(len(ids))
    n_holdout = int(round(len(ids) * holdout)) if len(ids) >= 5 else 0
    held = {ids[i] for i in order[:n_holdout]}
    return set(ids) - held, held


def keypoint_model(config: Config, manifest: pd.DataFrame, annotations: dict[str, np.ndarray]) -> str | None:
    """The key point model to use: the configured one, or one trained now on the annotated images
    (minus a held-out fifth) and confident geometric pseudo-labels; None for geometric key points."""
    from boneage import ray_keypoints, ray_prepare

    kp = config.keypoints
    if kp.source not in ("model", "geometric"):
        raise UserError(f"keypoints.source must be 'model' or 'geometric', not {kp.source!r}")
    if kp.source == "geometric":
        return None
    if kp.model:
        return kp.model
    train_ids, _ = split_annotations(annotations, config.data.seed)
    ok = manifest[(manifest.status == STATUS_OK)]
    annotated = ok[ok.id.isin(train_ids)]
    others = ok[~ok.id.isin(annotations)]
    room = max(0, kp.max_training_images - len(annotated))
    others = others.sample(n=min(room, len(others)), random_state=config.data.seed)
    started = time.time()
    analysed = ray_prepare.analyse_dataset(pd.concat([annotated, others]), config)
    print(f"[keypoints] {len(analysed)} images analysed for the key point model in {time.time() - started:.0f} s")
    inputs, targets, is_annotation = ray_keypoints.training_set(
        analysed, {i: annotations[i] for i in train_ids}, kp.pseudo_label_confidence)
    if len(inputs) < 20:
        print(f"[keypoints] only {len(inputs)} training images (annotations or confident pseudo-labels): "
              "using geometric key points")
        return None
    print(f"[keypoints] training the key point model on {int(is_annotation.sum())} annotated and "
          f"{int((~is_annotation).sum())} pseudo-labelled images (Ray Train)")
    out = storage.join_uri(config.output, "keypoints", "keypoint_model.safetensors")
    started = time.time()
    metrics = ray_keypoints.fit(inputs, targets, config, out)
    # The selection split's error chose the epoch, so it is no estimate; the held-out annotated images'
    # error (preprocess summary) is.
    print(f"[keypoints] trained in {time.time() - started:.0f} s; epoch {metrics.get('epoch')} chosen on its "
          f"selection split ({metrics.get('val_dist_px', float('nan')):.1f} frame px there)")
    return out


def keypoint_errors(table: pd.DataFrame, annotations: dict[str, np.ndarray], ids: set[str]) -> dict[str, Any]:
    """Distance of the chosen key points from annotations, as % of hand length (annotated finger tip
    to capitate), over the held-out annotated images."""
    rows = table[(table.status == STATUS_OK) & table.id.isin(ids)]
    errors = []
    for row in rows.itertuples():
        truth = np.asarray(annotations[row.id], float)
        found = np.array([getattr(row, c) for c in prepare.KEYPOINT_COLUMNS], float).reshape(3, 2)
        length = np.linalg.norm(truth[0] - truth[1])
        errors.append(np.linalg.norm(found - truth, axis=1) / length * 100)
    if not errors:
        return {}
    errors = np.array(errors)
    return {"images": len(errors), **{f"{name}_median_pct": round(float(np.median(errors[:, i])), 2)
                                      for i, name in enumerate(frame.KEYPOINT_NAMES)},
            "max_pct": round(float(errors.max()), 2)}


def preprocess(config: Config) -> pd.DataFrame:
    """Manifest → key point model → Ray Data preparation → registered parquet + QA sheet + summary.
    Returns the registered table without image bytes."""
    from boneage import ray_prepare  # imports ray: only when this stage runs

    started = time.time()
    manifest = ingest.build_manifest(config.data.images, config.data.labels, config.data.storage_options)
    print(f"[preprocess] {len(manifest)} items, {int((manifest.status != STATUS_OK).sum())} already failed at ingest")
    annotations = read_annotations(config)
    model = keypoint_model(config, manifest, annotations)
    out = storage.join_uri(config.output, "registered")
    registering = time.time()
    table = ray_prepare.run_prepare(manifest, out, config, model)
    print(f"[preprocess] {len(table)} images masked, key points found, registered in {time.time() - registering:.0f} s")
    shown = table[table.status == STATUS_OK].id.head(config.preprocess.qa_sheet_size).tolist()
    sheet_rows = ray_prepare.read_registered(out, config.data.storage_options, ids=shown)
    sheet = qa.contact_sheet(sheet_rows, limit=config.preprocess.qa_sheet_size)
    with storage.open_output(storage.join_uri(config.output, "qa", "registered_sheet.png"), "wb", config.data.storage_options) as f:
        sheet.save(f, format="PNG")
    summary = summarise(table, time.time() - started)
    summary["keypoint_model"] = model
    summary["keypoint_error_on_held_out_annotations"] = keypoint_errors(
        table, annotations, split_annotations(annotations, config.data.seed)[1])
    storage.write_bytes(storage.join_uri(config.output, "qa", "preprocess_summary.json"),
                   json.dumps(summary, indent=2).encode(), config.data.storage_options)
    print_summary("preprocess", summary)
    return table


def summarise(table: pd.DataFrame, seconds: float) -> dict[str, Any]:
    ok = table[table.status == STATUS_OK]
    errors = table[table.status != STATUS_OK]
    return {
        "items": int(len(table)),
        "ok": int(len(ok)),
        "errors": int(len(errors)),
        "errors_by_code": {str(k): int(v) for k, v in errors.error.map(error_code).value_counts().items()},
        "registration_doubtful": int(ok.registration_doubtful.fillna(False).astype(bool).sum()),
        "mask_doubtful": int(ok.mask_doubtful.fillna(False).astype(bool).sum()),
        "seconds": round(seconds, 1),
        "failed_items": [{"id": r.id, "uri": r.uri, "error": r.error} for r in errors.itertuples()][:50],
    }


def print_summary(stage: str, summary: dict[str, Any]) -> None:
    print(f"[{stage}] {summary['ok']}/{summary['items']} ok, {summary['errors']} errors "
          f"{summary['errors_by_code'] or ''}, {summary['registration_doubtful']} registrations doubtful, "
          f"{summary['seconds']} s")
    if summary.get("keypoint_error_on_held_out_annotations"):
        print(f"[{stage}] key point error on held-out annotated images: "
              f"{summary['keypoint_error_on_held_out_annotations']}")
    for item in summary["failed_items"][:10]:
        print(f"  {item['id']}: {item['error']}")


def check_registered(config: Config) -> str:
    """The registered table's URI; FileNotFoundError (before Ray starts) when there is none."""
    uri = storage.join_uri(config.output, "registered")
    fs, path = fsspec.core.url_to_fs(uri, **config.data.storage_options)
    if not fs.exists(path) or not fs.glob(path.rstrip("/") + "/*.parquet"):
        raise MissingInput(f"no registered table in {uri}: run `boneage preprocess` (or "
                                "workflows/full_cv.py without --skip-preprocess) on this --output first")
    return uri


def check_folds(config: Config) -> None:
    """A UserError, before Ray starts, when the registered table cannot be dealt into cv.k folds (too few
    labelled images of a sex); an output that already has its folds keeps them (cv.ray_cv checks k)."""
    from boneage import cv, ray_prepare

    fs, path = fsspec.core.url_to_fs(storage.join_uri(config.output, "cv", "folds.parquet"),
                                     **config.data.storage_options)
    if fs.exists(path):
        return
    table = ray_prepare.read_registered(check_registered(config), config.data.storage_options, with_images=False)
    cv.assign_folds(table[~table["id"].isin(read_test_ids(config))], config.cv.k, config.data.seed)


def cross_validate(config: Config) -> dict[str, Any]:
    """k-fold CV of every configured zone model kind and sex on the registered table under
    `config.output` (Ray Tune trials, each a Ray Train run): writes OUTPUT/cv/{folds,oof,trials}.parquet,
    models/<trial>.pt and a summary (OOF MAE per kind and sex against the per-sex median).
    Trials finished by an earlier run of the same output are not trained again."""
    from boneage import cv, ray_cv, ray_prepare  # import ray: only when this stage runs

    started = time.time()
    saved = storage.join_uri(config.output, "cv", "config.yaml")
    fs, path = fsspec.core.url_to_fs(saved, **config.data.storage_options)
    if fs.exists(path):  # a rerun: finished trials are kept as they are, whatever the settings now
        import yaml

        before = (yaml.safe_load(fs.cat_file(path)) or {}).get("cv")
        if before is not None and before != yaml.safe_load(config.to_yaml())["cv"]:
            print(f"[cv] warning: the cv settings differ from {saved}; trials finished with the old ones "
                  "are kept (use a fresh --output to retrain everything)")
    storage.write_bytes(saved, config.to_yaml().encode(), config.data.storage_options)
    registered = check_registered(config)
    table = ray_prepare.read_registered(registered, config.data.storage_options, with_images=False)
    test_ids = read_test_ids(config)
    if test_ids:  # the locked test split takes no part in CV
        print(f"[cv] {len(test_ids)} images of the locked test split left out")
        table = table[~table["id"].isin(test_ids)].reset_index(drop=True)
    oof, trials = ray_cv.run_cv(table, registered, config, exclude=test_ids)
    table = cv.summary(oof, list(config.cv.kinds))
    summary = {
        "images": int(len(oof)), "folds": config.cv.k, "trials": int(len(trials)),
        "seconds": round(time.time() - started, 1),
        "trial_seconds_total": round(float(trials["seconds"].sum()), 1) if len(trials) else 0.0,
        # the trials' time inside the training loop (and the scored fold's prediction): the rest is
        # start-up, reading and decoding the bank, writing the model and part
        "fit_seconds_total": round(float(trials["fit_seconds"].sum()), 1) if "fit_seconds" in trials else None,
        "mae": table.to_dict("records"),
    }
    if config.cv.sex_kind is not None:  # out-of-fold AUC and accuracy of the sex classifier
        from boneage import metrics

        summary["sex_classifier"] = {"kind": config.cv.sex_kind, "unsure_between": [metrics.UNSURE_LOW,
                                                                                     metrics.UNSURE_HIGH],
                                     **metrics.sex_report(oof["p_male"], oof["male"], oof["boneage"])}
    storage.write_bytes(storage.join_uri(config.output, "cv", "summary.json"), json.dumps(summary, indent=2).encode(),
                   config.data.storage_options)
    print_cv_summary(summary)
    return summary


def print_cv_summary(summary: dict[str, Any]) -> None:
    inside = ""
    if summary.get("fit_seconds_total") and summary.get("trial_seconds_total"):
        inside = f" ({summary['fit_seconds_total'] / summary['trial_seconds_total']:.0%} of trial time in training)"
    print(f"[cv] {summary['trials']} trials over {summary['folds']} folds, {summary['images']} images, "
          f"{summary['seconds']} s{inside}; out-of-fold MAE in months:")
    print(f"  {'model':<16}{'F':>8}{'M':>8}{'all':>8}")
    for row in summary["mae"]:
        print(f"  {row['model']:<16}{row['mae_F']:>8.2f}{row['mae_M']:>8.2f}{row['mae_all']:>8.2f}")
    sex = summary.get("sex_classifier")
    if sex and sex["all"].get("n"):
        a = sex["all"]
        print(f"  sex classifier {sex['kind']}, out of fold: ROC AUC {a['auc']:.3f}, accuracy {a['accuracy']:.1%}; "
              f"{a['unsure']:.0%} unsure ({sex['unsure_between'][0]} < P(male) < {sex['unsure_between'][1]}), "
              f"the others {a['accuracy_sure']:.1%} right")


SUMMARY_COLUMNS = ("id", "uri", "status", "error", "sex_source", "registration_doubtful", "boneage_months",
                   "boneage_sd_months")
# what the gate's and the SDS's counts are read from (boneage.clinical.describe)
CLINICAL_SUMMARY_COLUMNS = ("accepted", "reject_reason", "boneage_interpretation", "sds_note", "sex_mismatch")


def scoring_resources(actors: int | None, gpus_per_actor: float | None, cluster_gpus: float) -> tuple[int, float]:
    """(actors, GPUs per actor) of a scoring run: what the user gave, else from the cluster: one actor
    per GPU where there are GPUs, one CPU actor where there are none."""
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster_gpus >= 1 else 0.0
    if actors is None:
        actors = max(1, int(cluster_gpus // gpus_per_actor)) if gpus_per_actor > 0 else 1
    return int(actors), float(gpus_per_actor)


def scoring_config(config: Config, actors: int, gpus_per_actor: float) -> Config:
    """The bundle's preprocessing and key point settings with the scorer's resources: the key point
    model's actors take what the scoring actors take. A bundle trained with GPU actors (configs/rsna.yaml)
    would otherwise ask a CPU-only machine for GPUs that are not there, and wait forever."""
    config.keypoints.actors, config.keypoints.gpus_per_actor = actors, gpus_per_actor
    config.keypoints.use_gpu = gpus_per_actor > 0
    return config


def score(images: str | list[str], bundle_uri: str, out_uri: str, subjects: str | None = None,
          storage_options: dict | None = None, actors: int | None = None, gpus_per_actor: float | None = None,
          batch_size: int | None = None, id_from: str = "path", keep_dicom_uids: bool = False,
          resume: bool = True, cards: str | None = None) -> pd.DataFrame:
    """Score radiographs with a bundle (boneage.ray_score): one row per input file in `out_uri` (a
    .parquet file, or a folder of parts), with sex and chronological age from `subjects` (CSV) or the
    DICOM header. Bad files are rows with status 'error'; the summary is printed. A rerun on the same
    `out_uri` scores only the files without a row (`resume=False`: all of them, afresh). Returns the
    table's SUMMARY_COLUMNS (the driver never holds the whole table). With `cards` (a folder), a PNG
    per image (boneage.cards). `actors` / `gpus_per_actor`: the scoring actors' (and the key point
    model's), never the bundle's training run's; None: from the cluster (scoring_resources). Ray is
    started by the caller."""
    from boneage import bundle as bundle_mod, clinical, gate, metrics, ray_score, score as score_mod
    from boneage.config import load_config

    started = time.time()
    # Local paths against the caller's working directory: Ray's workers run elsewhere.
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
    import ray

    gpus = ray.cluster_resources().get("GPU", 0)
    actors, gpus_per_actor = scoring_resources(actors, gpus_per_actor, gpus)
    config = scoring_config(config, actors, gpus_per_actor)
    print(f"[score] {actors} scoring actor(s), {gpus_per_actor:g} GPU each (the cluster has {gpus:g} GPUs)")
    if batch_size:
        config.preprocess.batch_size = batch_size
    manifest = ingest.build_manifest(images, None, options, id_from=id_from, keep_uids=keep_dicom_uids)
    ages: dict[str, float] = {}
    if subjects:
        table, errors = read_subjects(subjects, options)
        manifest = score_mod.with_subjects(manifest, table, errors)
        ages = {r.id: r.age_months for r in table.itertuples() if np.isfinite(r.age_months)}
        unmatched = sorted(set(table.id) - set(manifest.id))
        if unmatched:
            print(f"[score] {len(unmatched)} ids in {subjects} have no image, e.g. {unmatched[:3]}")
    print(f"[score] {len(manifest)} files; bundle {bundle_uri}: {len(loaded.kinds)} kinds x "
          f"{len(loaded.sexes)} sexes x {loaded.manifest['folds']} folds")
    measured = loaded.manifest.get("accuracy", {})
    if "test_split" in measured:
        print(f"[score] the bundle's measured accuracy on its locked test split: {metrics.describe(measured['test_split'])}")
    elif "out_of_fold" in measured:
        print(f"[score] the bundle's measured accuracy, out of fold: {metrics.describe(measured['out_of_fold'])}")
    manifest = manifest.drop(columns=["age_months"], errors="ignore")
    ray_score.run_score(manifest, bundle_uri, config, out_uri, provenance, actors=actors,
                        gpus_per_actor=gpus_per_actor, ages=ages,
                        uid_columns=ingest.UID_COLUMNS if keep_dicom_uids else (), cards=absolute(cards))
    table = ray_score.read_output(out_uri, SUMMARY_COLUMNS + (*CLINICAL_SUMMARY_COLUMNS, *(("card", "card_error") if cards else ())),
                                  options)
    result = score_mod.summary(table)
    print(f"[score] {result['scored']}/{result['files']} scored, {result['failed']} failed "
          f"{result['failed_by_code'] or ''}; sex from {result['sex_source']}; "
          f"{result['registration_doubtful']} registrations doubtful; {time.time() - started:.0f} s → {out_uri}")
    print(clinical.describe(table, gate.calibration_of(loaded.training)))
    for row in table[table.status != STATUS_OK].head(10).itertuples():
        print(f"  {row.id}: {row.error}")
    return table


KEYPOINT_MODEL = "keypoints/keypoint_model.safetensors"  # in the bundle


def write_bundle(config: Config) -> str:
    """OUTPUT/bundle (boneage.bundle): every fold model, the key point model, the ensemble weights, the
    configuration and a summary of the training data and CV metrics. Refuses a CV with unfinished
    trials: a bundle missing fold models would score differently from what its metrics say."""
    from boneage import bundle, cv, gate, metrics

    options = config.data.storage_options
    cv_uri = storage.join_uri(config.output, "cv")
    folds = pd.read_parquet(storage.join_uri(cv_uri, "folds.parquet"), storage_options=options or None)
    trials = cv.cv_trials(config.cv.kinds, cv.sexes_present(folds, config.cv.sexes), config.cv.k)
    files: dict[str, bytes] = {}
    models = []
    records = pd.read_parquet(storage.join_uri(cv_uri, "trials.parquet"), storage_options=options or None)
    oof_mae = dict(zip(records["trial"], records["oof_mae"])) if len(records) else {}
    # With the sex classifier's fold models (scoring predicts P(male) for images of unknown sex).
    shipped = trials + cv.sex_trials(config.cv.sex_kind, config.cv.k)
    missing = [t.name for t in shipped if t.name not in oof_mae]
    if missing:
        raise RunError(f"no bundle: {len(missing)} CV trials have not finished (e.g. {missing[0]}); rerun")
    for t in shipped:
        # The CV's models are tensors-only .pt files; the bundle, which travels, holds safetensors.
        path = f"models/{t.name}.safetensors"
        state = weights.load_state(storage.read_bytes(storage.join_uri(cv_uri, "models", t.name + ".pt"), options))
        files[path] = weights.to_bytes(state)
        record = {"file": path, "kind": t.kind, "sex": t.sex, "fold": t.fold}
        if not t.is_sex_classifier:  # a sex classifier has no bone age error
            record["oof_mae"] = float(oof_mae[t.name])
        models.append(record)
    preprocess_summary = _read_json(storage.join_uri(config.output, "qa", "preprocess_summary.json"), options)
    keypoint_model = preprocess_summary.get("keypoint_model") or config.keypoints.model
    if config.keypoints.source == "model" and not keypoint_model:
        print("[bundle] warning: no key point model found (no qa/preprocess_summary.json and no "
              "keypoints.model): scoring will register with geometric key points only")
    if keypoint_model:
        files[KEYPOINT_MODEL] = weights.to_bytes(weights.load_state(storage.read_bytes(keypoint_model, options)))
    files["ensemble.json"] = storage.read_bytes(storage.join_uri(cv_uri, "ensemble.json"), options)
    files["config.yaml"] = config.to_yaml().encode()
    cv_summary = _read_json(storage.join_uri(cv_uri, "summary.json"), options)
    ensembles = json.loads(files["ensemble.json"])
    oof = pd.read_parquet(storage.join_uri(cv_uri, "ensemble_oof.parquet"), storage_options=options or None)
    oof_accuracy = {name: metrics.accuracy_report(oof[column], oof["boneage"], oof["male"]) for name, column in
                    [*((k, k) for k in config.cv.kinds), (f"ensemble ({ensembles['use']})", f"ensemble_{ensembles['use']}")]}
    training = {
        "images": int(len(folds)), "female": int((~folds["male"]).sum()), "male": int(folds["male"].sum()),
        "boneage_months": {q: float(folds["boneage"].quantile(v)) for q, v in
                           (("min", 0), ("p05", .05), ("median", .5), ("p95", .95), ("max", 1))},
        "source": {"images": config.data.images, "labels": config.data.labels},
        "preprocess": {k: preprocess_summary.get(k) for k in ("items", "ok", "errors", "errors_by_code",
                                                              "registration_doubtful", "keypoint_model")},
        "cv": cv_summary,
        # Out of fold: every prediction from a model (and ensemble weights) that never saw the image's
        # label; the epoch was chosen on each trial's selection split. The test split's: evaluate_test.
        "oof_accuracy": oof_accuracy,
        "gate": gate.calibrate(oof, config.cv.kinds),  # the rejection gate's thresholds (boneage.gate)
    }
    files["training.json"] = json.dumps(training, indent=2).encode()
    out = storage.join_uri(config.output, "bundle")
    bundle.write_bundle(out, files, models, {
        "kinds": list(config.cv.kinds), "sexes": sorted({t.sex for t in trials}), "folds": config.cv.k,
        "sex_kind": config.cv.sex_kind,  # its fold models are listed with sex "all"; null: none
        "input_scale": config.cv.input_scale, "keypoint_model": KEYPOINT_MODEL if keypoint_model else None,
        "ensemble": "ensemble.json", "config": "config.yaml", "training": "training.json",
        "accuracy": {"out_of_fold": {"model": f"ensemble ({ensembles['use']})",
                                     **oof_accuracy[f"ensemble ({ensembles['use']})"]["all"]}},
    }, options)
    size = sum(len(v) for v in files.values()) / 1e6
    print(f"[bundle] {len(models)} fold models, {len(files)} files, {size:.1f} MB → {out}")
    return out


def _read_json(uri: str, storage_options: dict | None) -> dict[str, Any]:
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    return json.loads(fs.cat_file(path)) if fs.exists(path) else {}


def fit_ensembles(config: Config) -> dict[str, Any]:
    """The ensemble weights per sex over the CV's out-of-fold table, by Ray Tune and by the two direct
    solvers (LAD, NNLS), each with its honest cross-validated MAE. Scoring uses the fit with the lowest
    of those ("use"). Writes OUTPUT/cv/ensemble.json and OUTPUT/cv/ensemble_oof.parquet (the OOF table
    plus each fit's cross-validated prediction). Returns the ensemble.json content."""
    from boneage import ensemble, ray_ensemble

    options = config.data.storage_options
    cv_uri = storage.join_uri(config.output, "cv")
    oof = pd.read_parquet(storage.join_uri(cv_uri, "oof.parquet"), storage_options=options or None)
    kinds = list(config.cv.kinds)
    fits, predictions = {}, {}
    fits["tune"], predictions["tune"] = ray_ensemble.tune_ensemble(
        oof, kinds, storage.join_uri(cv_uri, "ensemble_tune"), options, seed=config.data.seed,
        cpus_per_trial=min(1.0, config.cv.cpus_per_trial))
    for method in ("lad", "nnls"):
        fits[method], predictions[method] = ensemble.fit_ensemble(oof, kinds, method)
    # Which fit scores is fixed beforehand (cv.ensemble), not picked by the cross-validated MAE that is
    # then reported: the other fits are comparisons.
    use = config.cv.ensemble
    if use not in fits:
        raise UserError(f"cv.ensemble must be one of {sorted(fits)}, not {use!r}")
    result = {"use": use, "fits": fits,
              "why": "fixed beforehand by cv.ensemble; every MAE here is cross-validated over the OOF table's "
                     "folds (no row's prediction saw its own label)"}
    storage.write_bytes(storage.join_uri(cv_uri, "ensemble.json"), json.dumps(result, indent=2).encode(), options)
    table = oof.assign(**{f"ensemble_{m}": p for m, p in predictions.items()})
    with storage.open_output(storage.join_uri(cv_uri, "ensemble_oof.parquet"), "wb", options) as f:
        table.to_parquet(f, index=False)
    best_kind = min(kinds, key=lambda k: ensemble.mae(oof[k].to_numpy(float), oof["boneage"].to_numpy(float)))
    print("[ensemble] cross-validated MAE (months): " + ", ".join(
        f"{m} {fits[m]['cv_mae']['all']:.2f}" for m in fits) +
        f"; the lowest single kind {best_kind} {ensemble.mae(oof[best_kind], oof['boneage']):.2f} (picked on these "
        f"labels); scoring uses {use} "
        "(fixed beforehand)")
    return result


def report(config: Config, ensembles: dict[str, Any] | None = None, test: dict[str, Any] | None = None,
           n_worst: int = 12) -> str:
    """OUTPUT/report/report.html and its PNGs (boneage.report) from the CV's tables, the ensemble fits,
    the preprocessing summary and the worst cases' registered images."""
    from boneage import gate, ray_prepare, report as report_mod

    options = config.data.storage_options
    cv_uri = storage.join_uri(config.output, "cv")
    ensembles = ensembles or _read_json(storage.join_uri(cv_uri, "ensemble.json"), options)
    table = pd.read_parquet(storage.join_uri(cv_uri, "ensemble_oof.parquet"), storage_options=options or None)
    kinds = list(config.cv.kinds)
    names = list(ensembles["fits"])
    predictions = {m: table[f"ensemble_{m}"].to_numpy(float) for m in names}
    worst = report_mod.worst_cases(table, predictions[ensembles["use"]], n_worst)["id"].tolist()
    images = ray_prepare.read_registered(storage.join_uri(config.output, "registered"), options, ids=worst)
    trials = pd.read_parquet(storage.join_uri(cv_uri, "trials.parquet"), storage_options=options or None)
    test = test or _read_json(storage.join_uri(config.output, "test", "metrics.json"), options) or None
    test_table = test_gate = None
    if test:
        scored = pd.read_parquet(storage.join_uri(config.output, "test", "predictions.parquet"),
                                 storage_options=options or None)
        split = read_test_split(config)
        test_table = split.merge(scored[scored.status == STATUS_OK][["id", "boneage_months"]], on="id")
        test_table = test_table.rename(columns={"boneage_months": "pred"})
        # The gate again with the shipped thresholds: the split was scored before its own fold spread
        # threshold was added to the bundle.
        training = _read_json(storage.join_uri(config.output, "bundle", "training.json"), options)
        test_gate = split[["id", "boneage"]].merge(scored.drop(columns=["boneage"], errors="ignore"), on="id", how="left")
        test_gate["accepted"], test_gate["reject_reason"] = gate.gate(
            test_gate, [k for k in kinds if k in test_gate], gate.calibration_of(training))
    # The QA flags of every registered image: the gate's effect out of fold.
    flags = ray_prepare.read_registered(storage.join_uri(config.output, "registered"), options, with_images=False)
    uri = report_mod.write_report(
        storage.join_uri(config.output, "report"), table[["id", "male", "boneage", "fold", *kinds]], kinds,
        ensembles["fits"], predictions, trials=trials,
        preprocess_summary=_read_json(storage.join_uri(config.output, "qa", "preprocess_summary.json"), options) or None,
        worst_images=images, primary=ensembles["use"], n_worst=n_worst, storage_options=options,
        test=test, test_table=test_table, gate_flags=flags[["id", "registration_doubtful", "mask_doubtful"]],
        test_gate=test_gate,
        sex_classifier=_read_json(storage.join_uri(cv_uri, "summary.json"), options).get("sex_classifier"))
    print(f"[report] {uri}")
    return uri


class StageTimer:
    """`with timer("title"):` prints the stage's header and records its wall time."""

    def __init__(self):
        self.started, self.seconds = time.time(), {}

    @contextlib.contextmanager
    def __call__(self, title: str):
        progress.stage(title)
        began = time.time()
        try:
            yield
        finally:
            self.seconds[title] = round(time.time() - began, 1)

    @property
    def total(self) -> float:
        return time.time() - self.started


def print_final_summary(config: Config, test: dict[str, Any] | None, timings: StageTimer) -> None:
    """The run's closing table: out-of-fold MAE per kind and of the ensemble, the locked test split's
    accuracy, the time of each stage (also OUTPUT/timings.json), and where each output is."""
    from boneage import metrics

    options = config.data.storage_options
    cv_uri = storage.join_uri(config.output, "cv")
    summary = _read_json(storage.join_uri(cv_uri, "summary.json"), options)
    ensembles = _read_json(storage.join_uri(cv_uri, "ensemble.json"), options)
    storage.write_bytes(storage.join_uri(config.output, "timings.json"), json.dumps(
        {"total_seconds": round(timings.total, 1), "stages": timings.seconds}, indent=2).encode(), options)
    print(f"\n== done in {timings.total / 60:.1f} min ==")
    print("  " + ", ".join(f"{title.split(' ', 1)[1].split(' (')[0]} {fmt_seconds(s)}"
                           for title, s in timings.seconds.items()))
    print(f"  {'out-of-fold MAE, months':<28}{'F':>8}{'M':>8}{'all':>8}")
    for row in summary.get("mae", []):
        print(f"  {row['model']:<28}{row['mae_F']:>8.2f}{row['mae_M']:>8.2f}{row['mae_all']:>8.2f}")
    for name, fit in ensembles.get("fits", {}).items():
        mae = fit["cv_mae"]
        label = f"ensemble {name}" + (" (ships)" if name == ensembles.get("use") else "")
        print(f"  {label:<28}{mae.get('F', float('nan')):>8.2f}{mae.get('M', float('nan')):>8.2f}{mae['all']:>8.2f}")
    if test:
        print(f"  locked test split, shipped bundle: {metrics.describe(test['accuracy']['all'])}")
    for what, where in (("report", storage.join_uri(config.output, "report", "report.html")),
                        ("bundle", storage.join_uri(config.output, "bundle")),
                        ("out-of-fold table", storage.join_uri(cv_uri, "oof.parquet")),
                        ("test predictions", storage.join_uri(config.output, "test", "predictions.parquet"))):
        print(f"  {what:<18} {where}")
