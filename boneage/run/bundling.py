"""The bundle stage of a run: every fold model, the key point model, the ensemble weights, the
configuration and what the models were trained on, written as one hashed bundle (boneage.bundle)."""

from __future__ import annotations

import json
from typing import Any

import pandas as pd

from boneage.config import Config, CVConfig
from boneage.data import storage
from boneage.errors import RunError
from boneage.model import weights


KEYPOINT_MODEL = "keypoints/keypoint_model.safetensors"  # in the bundle
# Training images whose PNG marks are read to tell synthetic from real data (evenly spread over them):
# enough to see a real set, a few small reads even on s3://.
DATA_KIND_SAMPLE = 64


def training_data(config: Config, ids: set[str]) -> dict[str, Any]:
    """What the bundle was trained on, for training.json and the manifest: `kind` "synthetic" (written by
    `boneage synth`: the embedded default, or `boneage synth` output given as --images), "real", "mixed"
    (boneage.data.images.data_kind, from up to DATA_KIND_SAMPLE of the images), the number of training
    images (outside the locked test split) and the names of the image folder and label file. Names,
    not paths: a bundle travels, and /home/<someone>/... would tell where it was made."""
    from boneage.data.images import count_synthetic, data_kind, list_inputs

    options = config.data.storage_options
    uris = [f.uri for f in list_inputs(config.data.images, storage_options=options) if f.id in ids]
    counts = count_synthetic(uris, options, limit=DATA_KIND_SAMPLE)
    return {"kind": data_kind(counts), "images": len(ids), "checked": counts["checked"],
            "checked_synthetic": counts["synthetic"], "images_from": storage.base_name(config.data.images),
            "labels_from": storage.base_name(config.data.labels)}


def write_bundle(config: Config) -> str:
    """OUTPUT/bundle (boneage.bundle): every fold model, the key point model, the ensemble weights, the
    configuration and a summary of the training data and CV metrics. Refuses a CV with unfinished
    trials: a bundle missing fold models would score differently from what its metrics say."""
    from boneage import bundle
    from boneage.validation import cv, metrics, sex_calls
    from boneage.clinical import gate

    options = config.data.storage_options
    cv_uri = storage.join_uri(config.output, "cv")
    folds = pd.read_parquet(storage.join_uri(cv_uri, "folds.parquet"), storage_options=options or None)
    sexes = cv.sexes_present(folds, config.cv.sexes)  # the sexes scoring serves
    files: dict[str, bytes] = {}
    models = []
    records = pd.read_parquet(storage.join_uri(cv_uri, "trials.parquet"), storage_options=options or None)
    oof_mae = dict(zip(records["trial"], records["oof_mae"])) if len(records) else {}
    # The bone age models (fold models, or the refits: cv.ship) with the sex classifier's fold models
    # (scoring predicts P(male) for images of unknown sex).
    shipped = cv.shipped_trials(config.cv, sexes)
    missing = [t.name for t in shipped if t.name not in oof_mae]
    if missing:
        raise RunError(f"no bundle: {len(missing)} CV trials have not finished (e.g. {missing[0]}); rerun")
    for t in shipped:
        # The CV's models are tensors-only .pt files; the bundle, which travels, holds safetensors.
        path = f"models/{t.name}.safetensors"
        state = weights.load_state(storage.read_bytes(storage.join_uri(cv_uri, "models", t.name + ".pt"), options))
        files[path] = weights.to_bytes(state)
        record = {"file": path, "kind": t.kind, "sex": t.sex, "fold": t.fold}
        if t.has_sex_input:  # a pooled model: scoring passes it the sex (manifest sex_models "pooled")
            record["sex_input"] = True
        if t.is_refit:  # trained on every CV image: no error of its own (the test split measures it)
            record["refit"] = True
        elif not t.is_sex_classifier:  # a sex classifier has no bone age error
            record["oof_mae"] = float(oof_mae[t.name])
        models.append(record)
    preprocess_summary = storage.read_json(storage.join_uri(config.output, "qa", "preprocess_summary.json"), options)
    keypoint_model = preprocess_summary.get("keypoint_model") or config.keypoints.model
    if config.keypoints.source == "model" and not keypoint_model:
        print("[bundle] warning: no key point model found (no qa/preprocess_summary.json and no "
              "keypoints.model): scoring will register with geometric key points only")
    if keypoint_model:
        files[KEYPOINT_MODEL] = weights.to_bytes(weights.load_state(storage.read_bytes(keypoint_model, options)))
    files["ensemble.json"] = storage.read_bytes(storage.join_uri(cv_uri, "ensemble.json"), options)
    files["config.yaml"] = config.to_yaml().encode()
    cv_summary = storage.read_json(storage.join_uri(cv_uri, "summary.json"), options)
    ensembles = json.loads(files["ensemble.json"])
    oof = pd.read_parquet(storage.join_uri(cv_uri, "ensemble_oof.parquet"), storage_options=options or None)
    ensemble_column = f"ensemble_{ensembles['use']}"
    # The bias at the extreme ages corrected per sex (fitted out of fold); the interval is calibrated on
    # the corrected predictions, cross-fitted, so it measures the bone age that scoring writes.
    age_calibration, oof[f"{ensemble_column}_corrected"] = age_correction(oof, ensemble_column, config.cv)
    shipped_name = f"ensemble ({ensembles['use']})" + (", age-corrected" if age_calibration["applied"] else "")
    oof_accuracy = {name: metrics.accuracy_report(oof[column], oof["boneage"], oof["male"]) for name, column in
                    [*((k, k) for k in config.cv.kinds), (f"ensemble ({ensembles['use']})", ensemble_column)]}
    if age_calibration["applied"]:
        oof_accuracy[shipped_name] = metrics.accuracy_report(oof[f"{ensemble_column}_corrected"], oof["boneage"],
                                                             oof["male"])
    data = training_data(config, set(folds["id"]))
    interval = interval_calibration(oof, f"{ensemble_column}_corrected", config.cv.interval_level)
    training = {
        "data": data,  # synthetic or real, how many, from which label file (names only)
        "images": int(len(folds)), "female": int((~folds["male"]).sum()), "male": int(folds["male"].sum()),
        "boneage_months": {q: float(folds["boneage"].quantile(v)) for q, v in
                           (("min", 0), ("p05", .05), ("median", .5), ("p95", .95), ("max", 1))},
        "preprocess": {k: preprocess_summary.get(k) for k in ("items", "ok", "errors", "errors_by_code",
                                                              "registration_doubtful", "keypoint_model")},
        "cv": cv_summary,
        # Out of fold: every prediction from a model (and ensemble weights) that never saw the image's
        # label; the epoch was chosen on each trial's selection split. The test split's: evaluate_test.
        "oof_accuracy": oof_accuracy,
        "age_calibration": age_calibration,  # the per-sex correction of the bias at the extremes
        "gate": gate.calibrate(oof, config.cv.kinds),  # the rejection gate's thresholds (boneage.clinical.gate)
        # The bone age's prediction interval, fit on these OOF residuals (boneage.validation.intervals)
        "interval": interval,
    }
    if config.cv.sex_kind is not None:  # when scoring may use a predicted sex, measured out of fold
        training["sex_prediction"] = sex_calls.calibrate(oof, config.cv.sex_max_error_rate,
                                                         config.cv.sex_min_confident_calls)
    files["training.json"] = json.dumps(training, indent=2).encode()
    out = storage.join_uri(config.output, "bundle")
    bundle.write_bundle(out, files, models, {
        "kinds": list(config.cv.kinds), "sexes": sorted(sexes), "folds": config.cv.k,
        # "pooled": each kind's fold models are listed with sex "all" and take the sex as an input;
        # tta_views: scoring averages each fold model over that many crop jitters, as the OOF table did
        "sex_models": config.cv.sex_models, "tta_views": config.cv.tta_views,
        # "refit": one bone age model per kind (and sex), refit on every CV image; "folds": the k fold models
        "ship": config.cv.ship,
        "sex_kind": config.cv.sex_kind,  # its fold models are listed with sex "all"; null: none
        "sex_tta_views": config.cv.sex_views if config.cv.sex_kind else None,  # its P(male)'s views
        "input_scale": config.cv.input_scale,
        "sex_input_scale": config.cv.input_scale_of(config.cv.sex_kind) if config.cv.sex_kind else None,
        "keypoint_model": KEYPOINT_MODEL if keypoint_model else None,
        "ensemble": "ensemble.json", "config": "config.yaml", "training": "training.json", "data": data,
        "accuracy": {"out_of_fold": {"model": shipped_name, **oof_accuracy[shipped_name]["all"]}},
        "interval": interval_summary(interval),
    }, options)
    size = sum(len(v) for v in files.values()) / 1e6
    what = "models (bone age: refit on every CV image)" if config.cv.ship == "refit" else "fold models"
    print(f"[bundle] {len(models)} {what}, {len(files)} files, {size:.1f} MB, trained on {data['images']} "
          f"{data['kind']} radiographs ({data['labels_from']}) → {out}")
    return out


def age_correction(oof: pd.DataFrame, prediction: str, cv: CVConfig) -> tuple[dict[str, Any], Any]:
    """boneage.validation.age_calibration.calibrate on the ensemble's OOF prediction, printed by age band
    (bias before and after, cross-fitted): (training.json's record, the cross-fitted corrected column)."""
    from boneage.validation import age_calibration

    fitted, corrected = age_calibration.calibrate(oof, prediction, cv.age_calibration, cv.age_bias_target,
                                                  cv.age_correction_max_mae_increase)
    before, after = fitted["before"], fitted["after"]
    print(f"[bundle] {age_calibration.describe(fitted)}; out of fold (cross-fitted, if applied) MAE "
          f"{before['all']['mae']:.2f} → {after['all']['mae']:.2f}, bias by age band " + ", ".join(
              f"{band} {cell['bias']:+.1f} → {after['by_age_band'][band]['bias']:+.1f}"
              for band, cell in before["by_age_band"].items()))
    return fitted, corrected


def interval_calibration(oof: pd.DataFrame, prediction: str, level: float) -> dict[str, Any]:
    """boneage.validation.intervals.calibrate on the ensemble's cross-validated OOF prediction, or
    {"error": why} when it cannot be fitted (too few rows for the level): scoring then gives null bounds
    and says why."""
    from boneage.validation import intervals

    try:
        interval = intervals.calibrate(oof, level, prediction)
    except ValueError as err:
        print(f"[bundle] warning: no prediction interval: {err}")
        return {"error": str(err), "level": level}
    cross = interval["cross_fitted"]["all"]
    print(f"[bundle] {level:.0%} bone age interval: {interval['method']} (half-width "
          f"{interval['half_width']['all']:.1f} mo overall); cross-fitted out of fold it covered {cross['coverage']:.1%}"
          f", mean width {cross['mean_width']:.1f} mo; compared: " + ", ".join(
              f"{m} {c['all']['coverage']:.1%} / {c['all']['mean_width']:.1f} mo"
              for m, c in interval["comparison"].items()))
    return interval


def interval_summary(interval: dict[str, Any]) -> dict[str, Any]:
    """The manifest's line about the interval: level, method, out-of-fold coverage and width."""
    if "error" in interval:
        return {"level": interval.get("level"), "error": interval["error"]}
    return {"level": interval["level"], "method": interval["method"],
            "out_of_fold": {k: interval["cross_fitted"]["all"][k] for k in ("n", "coverage", "mean_width")}}
