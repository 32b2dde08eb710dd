"""A small but real bundle for the scoring tests: untrained fold models of two kinds, both sexes, two
folds, at 1/8 of the seed's input size, with known ensemble weights. (The workflow test scores with
a bundle that full_cv trained.)"""

from __future__ import annotations

import json
import zlib

import torch
import yaml

from boneage import bundle
from boneage.validation import ensemble
from boneage.model import weights
from boneage.config import Config
from boneage.model.networks import model_kind

KINDS = ("A-reg", "B-cls")
FOLDS = 2
WEIGHTS = {"F": (6.0, {"A-reg": 0.25, "B-cls": 0.75}), "M": (-3.0, {"A-reg": 0.5, "B-cls": 0.6})}


def fold_state(kind: str, sex: str, fold: int) -> dict:
    torch.manual_seed(zlib.crc32(f"{kind}{sex}{fold}".encode()))
    spec = {"kind": kind, "input_scale": 0.125, "width_mult": 0.0625, "fc": 16, "dropout": 0.0}
    net = model_kind(kind, 0.125).build(spec["width_mult"], spec["fc"], spec["dropout"])
    return {"spec": spec, "best": {"model": net.state_dict()}, "metrics": {}, "trial": f"{kind}-{sex}-fold{fold}",
            "sex": sex, "fold": fold}


def keypoint_state() -> dict:
    """An untrained key point model, small: its points are noise, but they take the model's whole path."""
    from boneage.model import train
    from boneage.registration.frame import FRAME_H, FRAME_W

    torch.manual_seed(7)
    spec = {"kind": "keypoints", "input_size": (FRAME_H // 16, FRAME_W // 16), "width_mult": 0.0625, "fc": 16}
    return {"spec": spec, "best": {"model": train.build_from_spec(spec).state_dict()}, "metrics": {}}


def write_tiny_bundle(uri: str, storage_options: dict | None = None, sex_kind: str | None = None,
                      training: dict | None = None, sex_prediction: dict | None = None,
                      keypoint_model: bool = False) -> dict:
    """sex_kind (e.g. "A-sex"): also a sex classifier's fold models. training: training.json's content
    (default {"images": 0}: no gate or interval calibration, as an older bundle); sex_prediction: its
    record of when a predicted sex may be used (boneage.validation.sex_calls; None: an older bundle);
    keypoint_model: also an (untrained) key point model."""
    files, models = {}, []
    if keypoint_model:
        files["keypoints.safetensors"] = weights.to_bytes(keypoint_state())
    for fold in range(FOLDS) if sex_kind else ():
        path = f"models/{sex_kind}-all-fold{fold}.safetensors"
        files[path] = weights.to_bytes(fold_state(sex_kind, "all", fold))
        models.append({"file": path, "kind": sex_kind, "sex": "all", "fold": fold})
    for kind in KINDS:
        for sex in ("F", "M"):
            for fold in range(FOLDS):
                path = f"models/{kind}-{sex}-fold{fold}.safetensors"
                files[path] = weights.to_bytes(fold_state(kind, sex, fold))
                models.append({"file": path, "kind": kind, "sex": sex, "fold": fold, "oof_mae": 20.0})
    record = ensemble.make_record("lad", KINDS, WEIGHTS)
    files["ensemble.json"] = json.dumps({"use": "lad", "fits": {"lad": record}}).encode()
    config = yaml.safe_load(Config().to_yaml())
    config["keypoints"]["source"] = "geometric"
    files["config.yaml"] = yaml.safe_dump(config).encode()
    training = dict(training or {"images": 0})
    if sex_prediction:
        training["sex_prediction"] = sex_prediction
    files["training.json"] = json.dumps(training).encode()
    return bundle.write_bundle(uri, files, models, {"kinds": list(KINDS), "sexes": ["F", "M"], "folds": FOLDS,
                                                    "keypoint_model": "keypoints.safetensors" if keypoint_model else None,
                                                    "sex_kind": sex_kind}, storage_options)
