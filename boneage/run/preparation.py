"""The preparation stage of a run: the manifest, the key point model (given, or trained on annotations
and confident pseudo-labels), registration of every image on Ray Data, the QA sheet and summary."""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pandas as pd

from boneage.config import Config
from boneage.data import ingest, storage
from boneage.data.labels import read_keypoints
from boneage.errors import STATUS_OK, UserError, error_code
from boneage.registration import frame, prepare, qa


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


def keypoint_annotation_split(annotations: dict[str, np.ndarray], test_ids: set[str], seed: int
                              ) -> tuple[set[str], set[str]]:
    """(annotation ids the key point model trains on, held-out ids that measure its error): the
    annotations outside the locked test split, split as split_annotations does (so which test images
    are annotated cannot move the split); the test split's annotated images are held out too (the model
    never sees them; they only measure its error)."""
    train, held = split_annotations({i: a for i, a in annotations.items() if i not in test_ids}, seed)
    return train, held | (set(annotations) & set(test_ids))


def keypoint_training_rows(manifest: pd.DataFrame, annotations: dict[str, np.ndarray], test_ids: set[str],
                           max_training_images: int, seed: int) -> tuple[pd.DataFrame, set[str]]:
    """(manifest rows the key point model may learn from, annotation ids it trains on): the annotated
    images outside the held-out fifth, then others (pseudo-label candidates) up to max_training_images.
    The locked test split's images are never among them, annotated or not: the model registers those
    images later, and must not have learnt them. (The held-out annotated images, which only measure the
    key point error, include the test split's annotated images: nothing is fitted on them.)"""
    train_ids = keypoint_annotation_split(annotations, test_ids, seed)[0]
    ok = manifest[(manifest.status == STATUS_OK) & ~manifest.id.isin(test_ids)]
    annotated = ok[ok.id.isin(train_ids)]
    others = ok[~ok.id.isin(annotations)]
    room = max(0, max_training_images - len(annotated))
    others = others.sample(n=min(room, len(others)), random_state=seed)
    return pd.concat([annotated, others]), train_ids


def keypoint_model(config: Config, manifest: pd.DataFrame, annotations: dict[str, np.ndarray]) -> str | None:
    """The key point model to use: the configured one, or one trained now on the annotated images
    (minus a held-out fifth) and confident geometric pseudo-labels, never on the locked test split's
    images (keypoint_training_rows); None for geometric key points."""
    from boneage.distributed import ray_keypoints, ray_prepare
    from boneage.run.holdout import read_test_ids

    kp = config.keypoints
    if kp.source not in ("model", "geometric"):
        raise UserError(f"keypoints.source must be 'model' or 'geometric', not {kp.source!r}")
    if kp.source == "geometric":
        return None
    if kp.model:
        return kp.model
    test_ids = read_test_ids(config)  # split_test ran before preprocessing (workflows/full_cv.py)
    rows, train_ids = keypoint_training_rows(manifest, annotations, test_ids, kp.max_training_images,
                                             config.data.seed)
    if test_ids:
        print(f"[keypoints] the {len(test_ids)} images of the locked test split are left out of its training set")
    started = time.time()
    analysed = ray_prepare.analyse_dataset(rows, config)
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
    from boneage.distributed import ray_prepare  # imports ray: only when this stage runs
    from boneage.run.holdout import read_test_ids

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
        table, annotations, keypoint_annotation_split(annotations, read_test_ids(config), config.data.seed)[1])
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
