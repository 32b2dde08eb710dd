"""The training stages of a run: k-fold CV of the zone models (and the sex classifier) on Ray Tune and
Train, then the ensemble weights per sex over the out-of-fold table."""

from __future__ import annotations

import json
import time
from typing import Any

import fsspec
import pandas as pd

from boneage.config import Config
from boneage.data import storage
from boneage.errors import UserError
from boneage.run.checks import check_registered
from boneage.run.holdout import read_test_ids


def cross_validate(config: Config) -> dict[str, Any]:
    """k-fold CV of every configured zone model kind and sex on the registered table under
    `config.output` (Ray Tune trials, each a Ray Train run): writes OUTPUT/cv/{folds,oof,trials}.parquet,
    models/<trial>.pt and a summary (OOF MAE per kind and sex against the per-sex median).
    Trials finished by an earlier run of the same output are not trained again."""
    from boneage.validation import cv  # import ray: only when this stage runs
    from boneage.distributed import ray_cv, ray_prepare

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
        # folds by patient (a patient column or DICOM PatientID), or one image per child assumed
        "grouping": cv.grouping_record(ray_cv.cv_folds(storage.join_uri(config.output, "cv", "folds.parquet"),
                                                       config.data.storage_options)),
    }
    if config.cv.sex_kind is not None:  # out-of-fold AUC and accuracy of the sex classifier
        from boneage.validation import metrics

        summary["sex_classifier"] = {"kind": config.cv.sex_kind, "views": config.cv.sex_views,
                                     "unsure_between": [metrics.UNSURE_LOW, metrics.UNSURE_HIGH],
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
    grouping = summary.get("grouping") or {}
    if grouping:
        print(f"  folds by patient: {grouping['patients']} patients" if grouping["by_patient"]
              else "  folds per image (no patient column: one image per child assumed)")
    sex = summary.get("sex_classifier")
    if sex and sex["all"].get("n"):
        a = sex["all"]
        print(f"  sex classifier {sex['kind']}, out of fold: ROC AUC {a['auc']:.3f}, accuracy {a['accuracy']:.1%}; "
              f"{a['unsure']:.0%} unsure ({sex['unsure_between'][0]} < P(male) < {sex['unsure_between'][1]}), "
              f"the others {a['accuracy_sure']:.1%} right")


def fit_ensembles(config: Config) -> dict[str, Any]:
    """The ensemble weights per sex over the CV's out-of-fold table, by Ray Tune and by the two direct
    solvers (LAD, NNLS), each with its honest cross-validated MAE. Scoring uses the fit fixed beforehand
    by cv.ensemble ("use"), never the one whose MAE turns out lowest: the others are comparisons. Writes OUTPUT/cv/ensemble.json and OUTPUT/cv/ensemble_oof.parquet (the OOF table
    plus each fit's cross-validated prediction). Returns the ensemble.json content."""
    from boneage.validation import ensemble
    from boneage.distributed import ray_ensemble

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
