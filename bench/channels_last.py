"""NCHW against channels_last (NHWC) for the zone nets on CPU: a CV trial's training and a bundle's predictions,
one thread (one CV trial's or one scoring actor's CPU), in one process, alternating, on a run's registered images.

    python bench/channels_last.py runs/rsna-dev-k5-refit-tta3 --json bench/results/channels_last_cpu_rsna_dev.json

For each kind, after one warm-up fit in each format: `--epochs` epochs of boneage.model.train.fit_zone_model
(fit_sex_model for B-sex) on the first --n CV images, pooled models with the sex input as the pooled recipes
train them, a fixed schedule, the same seed in both formats; then train.predict of the next --n-predict images
over --views test-time views. Seconds per epoch and per predicted image are medians over --repeats, NCHW and
channels_last alternating; "speedup" is NCHW's time over channels_last's. "max_prediction_difference": the
NCHW-trained net's predictions (months; P(male) for B-sex) in channels_last against NCHW, the same weights:
the two formats compute the same function (float rounding aside). Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from boneage.model import train
from boneage.model.networks import model_kind

from _common import cv_bank, emit  # bench/_common.py


def fit(bank, ages, male, fit_idx, kind, cfg):
    started = time.perf_counter()
    if kind.name.endswith("-sex"):
        result = train.fit_sex_model(bank, male, fit_idx, np.array([], int), kind, cfg)
    else:
        result = train.fit_zone_model(bank, ages, fit_idx, np.array([], int), kind, cfg, male=male)
    return result.model, (time.perf_counter() - started) / cfg.epochs


def predict(model, bank, idx, kind, channels_last, views, male):
    started = time.perf_counter()
    if kind.name.endswith("-sex"):
        out = train.predict_p_male(model, bank, idx, kind, channels_last=channels_last, views=views)
    else:
        out = train.predict(model, bank, idx, kind, channels_last=channels_last, views=views, male=male)
    return out.numpy(), (time.perf_counter() - started) / len(idx)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a full_cv.py output folder (its registered/ and cv/folds.parquet)")
    parser.add_argument("--kinds", default="A-reg,A-cls,B-reg,B-cls,C-reg,C-cls,B-sex")
    parser.add_argument("--scale", type=float, default=0.25, help="cv.input_scale")
    parser.add_argument("--width", type=float, default=0.25, help="cv.width_mult")
    parser.add_argument("--n", type=int, default=320, help="training images")
    parser.add_argument("--n-predict", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--views", type=int, default=3, help="test-time views of the predictions")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    bank, ages, male = cv_bank(args.run, args.n + args.n_predict)
    fit_idx, held_idx = np.arange(args.n), np.arange(args.n, len(bank))
    result = {"images": args.n, "predicted": len(held_idx), "epochs": args.epochs, "views": args.views,
              "input_scale": args.scale, "width_mult": args.width, "torch": torch.__version__, "torch_threads": 1,
              "repeats": args.repeats, "kinds": {}}
    for name in args.kinds.split(","):
        kind = model_kind(name, args.scale)
        times = {fmt: {"train_s_per_epoch": [], "predict_s_per_image": []} for fmt in ("nchw", "channels_last")}
        difference = []
        def config(epochs, on):
            return train.TrainConfig(epochs=epochs, batch_size=16, width_mult=args.width, channels_last=on,
                                     patience=0, seed=1)

        for on in (False, True):  # warm-up: oneDNN builds its kernels for each shape and format once
            fit(bank, ages, male, fit_idx[:32], kind, config(1, on))
        for _ in range(args.repeats):
            for fmt in ("nchw", "channels_last"):
                on = fmt == "channels_last"
                model, per_epoch = fit(bank, ages, male, fit_idx, kind, config(args.epochs, on))
                pred, per_image = predict(model, bank, held_idx, kind, on, args.views, male)
                times[fmt]["train_s_per_epoch"].append(per_epoch)
                times[fmt]["predict_s_per_image"].append(per_image)
                if not on:  # the same weights in the other format
                    same, _ = predict(model.to(memory_format=torch.channels_last), bank, held_idx, kind, True,
                                      args.views, male)
                    difference.append(float(np.abs(same - pred).max()))
        median = {fmt: {k: statistics.median(v) for k, v in parts.items()} for fmt, parts in times.items()}
        result["kinds"][name] = {
            **{fmt: {k: round(v, 4) for k, v in parts.items()} for fmt, parts in median.items()},
            "speedup_train": round(median["nchw"]["train_s_per_epoch"] / median["channels_last"]["train_s_per_epoch"], 2),
            "speedup_predict": round(median["nchw"]["predict_s_per_image"] / median["channels_last"]["predict_s_per_image"], 2),
            "max_prediction_difference": float(f"{max(difference):.2g}")}
        print(name, json.dumps(result["kinds"][name]), flush=True)
    emit(result, args.json)


if __name__ == "__main__":
    main()
