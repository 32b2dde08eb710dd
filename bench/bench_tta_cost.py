"""What test-time augmentation (cv.tta_views) costs at scoring: the zone models' part of scoring one image,
TTA off against on, in one run (and a pooled bundle, cv.sex_models "pooled", beside them).

    python bench/bench_tta_cost.py --config bench/rsna_dev_v2.yaml --n 8 --repeats 3 --views 3 5

A bundle of untrained fold models (random weights: the cost does not depend on them) at the recipe's input
scale, widths and FC size, every kind x both sexes x k folds, written to a temporary folder and loaded by
boneage.score.BundleModels as scoring loads it; then, for each setting, the scoring of one sex (every kind's
k fold models on a bank of `n` registered-size images, and the ensemble) is timed `repeats` times, the
settings interleaved within each repetition (in a rotated order) so that a change of machine load hits
them alike. Torch runs
on `--threads` threads (a scoring actor's one CPU by default). Registration and PNG decoding are not
included (the same with or without TTA; docs/benchmarks.md has their share). Prints JSON: the median
seconds per image of each setting and its ratio to TTA off, both from this run.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from boneage import bundle, score
from boneage.config import Config, load_config
from boneage.model import weights
from boneage.model.networks import model_kind
from boneage.registration.frame import STORE_H, STORE_W
from boneage.validation import cv, ensemble


def write_random_bundle(uri: str, config: Config, pooled: bool) -> None:
    """A loadable bundle of untrained fold models shaped as `config.cv` would train them."""
    cvc, files, models = config.cv, {}, []
    sexes = [cv.POOLED] if pooled else ["F", "M"]
    for kind in cvc.kinds:
        for sex in sexes:
            for fold in range(cvc.k):
                spec = {"kind": kind, "input_scale": cvc.input_scale, "width_mult": cvc.width_mult, "fc": cvc.fc,
                        "dropout": cvc.dropout, **({"sex_input": True} if pooled else {})}
                net = model_kind(kind, cvc.input_scale).build(cvc.width_mult, cvc.fc, cvc.dropout, sex_input=pooled)
                path = f"models/{kind}-{sex}-fold{fold}.safetensors"
                files[path] = weights.to_bytes({"spec": spec, "best": {"model": net.state_dict()}, "fold": fold})
                models.append({"file": path, "kind": kind, "sex": sex, "fold": fold})
    equal = {sex: (0.0, {kind: 1 / len(cvc.kinds) for kind in cvc.kinds}) for sex in ("F", "M")}
    files["ensemble.json"] = json.dumps({"use": "lad", "fits": {"lad": ensemble.make_record("lad", cvc.kinds, equal)}}
                                        ).encode()
    files["config.yaml"] = config.to_yaml().encode()
    files["training.json"] = json.dumps({"images": 0}).encode()
    bundle.write_bundle(uri, files, models, {"kinds": list(cvc.kinds), "sexes": ["F", "M"], "folds": cvc.k,
                                             "keypoint_model": None, "sex_kind": None,
                                             "sex_models": "pooled" if pooled else "per_sex", "tta_views": 1})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="bench/rsna_dev_v2.yaml", help="the recipe whose model sizes to use")
    parser.add_argument("--n", type=int, default=8, help="images per timed scoring")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--views", type=int, nargs="+", default=[3, 5], help="cv.tta_views settings to time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a scoring actor: its one CPU)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = load_config(args.config)
    bank = torch.randint(0, 256, (args.n, 1, STORE_H, STORE_W), generator=torch.Generator().manual_seed(0),
                         dtype=torch.uint8)
    with tempfile.TemporaryDirectory() as folder:
        loaded = {}
        for name, pooled in (("per_sex", False), ("pooled", True)):
            write_random_bundle(f"{folder}/{name}", config, pooled)
            loaded[name] = score.BundleModels(bundle.load_bundle(f"{folder}/{name}"))
        settings = [("tta off", "per_sex", 1), *((f"tta_views {v}", "per_sex", v) for v in args.views),
                    ("pooled, tta off", "pooled", 1)]
        times: dict[str, list[float]] = {name: [] for name, _, _ in settings}
        for name, which, views in settings:  # a warm-up of each: the first call builds caches
            loaded[which].tta_views = views
            loaded[which].score(bank[:1], "F")
        for repeat in range(args.repeats):
            # each repetition starts at another setting: none always runs first or last
            for name, which, views in settings[repeat % len(settings):] + settings[:repeat % len(settings)]:
                models = loaded[which]
                models.tta_views = views  # as a bundle with manifest tta_views = views scores
                started = time.perf_counter()
                models.score(bank, "F")
                times[name].append((time.perf_counter() - started) / args.n)
    median = {name: statistics.median(t) for name, t in times.items()}
    print(json.dumps({
        "config": args.config, "n": args.n, "repeats": args.repeats, "threads": args.threads,
        "fold_models_per_sex": len(config.cv.kinds) * config.cv.k,
        "input_scale": config.cv.input_scale, "width_mult": config.cv.width_mult, "fc": config.cv.fc,
        "seconds_per_image_median": {k: round(v, 4) for k, v in median.items()},
        "ratio_to_tta_off": {k: round(v / median["tta off"], 2) for k, v in median.items()},
        "seconds_per_image_all": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
