"""What `--cards` costs: the same images scored by `boneage score` with and without cards, interleaved,
in one process and one local Ray, plus the card's own parts timed without Ray.

    PYTHONPATH=. python bench/bench_cards.py --bundle runs/rsna-dev-v2/bundle \
        --split runs/rsna-dev-v2/test/split.csv --n 4 --runs 3 --json bench/results/cards_rsna_dev.json

1. `run.score` (what `boneage score` runs after starting Ray) on the N images, `--runs` times without and
   with `--cards`, alternating; medians. Card cost per image = (median with - median without) / N; the
   ratio is median with / median without (both include the actors' start and the bundle's loading).
2. Without Ray, on the first `--parts-images` registered images (from the run's registered table): per
   image, the fold models and ensemble (`BundleModels.score`), the occlusion heatmap as cards draw it
   (`cards.ensemble_occlusion`), the same heatmap masking every tile for every model
   (`cards.occlusion_map`, the code before; with `--brute`), and drawing the PNG.

The images are the bundle's run's locked test split (`--split`): images it never trained on. The
machine's load (/proc/loadavg) is recorded before and after: on a shared machine it moves the times.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from boneage.clinical import cards
from boneage.validation import cv
from boneage.registration import prepare
from boneage.distributed import ray_env, ray_prepare
from boneage import run, score
from boneage.bundle import load_bundle
from boneage.config import RayConfig

from _common import emit  # bench/_common.py


def loadavg() -> list[float]:
    return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]


def timed(fn, *args, **kwargs):
    started = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - started


def pipeline(paths: list[str], subjects: str, bundle: str, runs: int, folder: Path) -> dict:
    """`boneage score` without and with --cards, alternating, `runs` times each."""
    seconds: dict[str, list[float]] = {"plain": [], "cards": []}
    for r in range(runs):
        for variant in ("plain", "cards") if r % 2 == 0 else ("cards", "plain"):  # neither always goes first
            out = folder / f"{variant}{r}.parquet"
            card_dir = str(folder / f"cards{r}") if variant == "cards" else None
            table, s = timed(run.score, paths, bundle, str(out), subjects=subjects, resume=False, cards=card_dir)
            if (table["status"] != "ok").any():
                raise RuntimeError(f"an image failed: {table[table.status != 'ok'].to_dict('records')}")
            if card_dir and len(list(Path(card_dir).glob("*.png"))) != len(paths):
                raise RuntimeError(f"expected {len(paths)} cards in {card_dir}")
            seconds[variant].append(s)
            print(f"[bench] run {r} {variant}: {s:.1f} s (load {loadavg()[0]:.1f})", flush=True)
    plain, with_cards = statistics.median(seconds["plain"]), statistics.median(seconds["cards"])
    return {"seconds": seconds, "median_plain_s": plain, "median_cards_s": with_cards,
            "card_ms_per_image": 1000 * (with_cards - plain) / len(paths),
            "plain_ms_per_image": 1000 * plain / len(paths), "ratio_cards_to_plain": with_cards / plain}


def parts(registered: str, ids: list[str], sexes: dict[str, str], bundle: str, brute: bool) -> dict:
    """Seconds per image of the card's parts, one process, no Ray."""
    models = score.BundleModels(load_bundle(bundle))
    rows = ray_prepare.read_registered(registered, ids=ids)
    out: dict[str, list[float]] = {"score": [], "heatmap": [], "draw": [], "heatmap_every_tile_every_model": []}
    for rid, png in zip(rows["id"], rows["registered_png"]):
        image, sex = prepare.decode_png(png), sexes[rid]
        bank = cv.decode_bank([png], [rid])
        (_, age, _), s = timed(models.score, bank, sex)
        out["score"].append(s)
        heat, s = timed(cards.ensemble_occlusion, models, sex, image)
        out["heatmap"].append(s)
        if brute:
            slow, s = timed(cards.occlusion_map, cards.ensemble_predictor(models, sex), image)
            out["heatmap_every_tile_every_model"].append(s)
            np.testing.assert_allclose(heat, slow, atol=1e-3)  # the same heatmap
        row = {"id": rid, "sex": sex, "sex_source": "csv", "boneage_months": float(age[0]), "accepted": True}
        _, s = timed(cards.card_png, image, row, heat)
        out["draw"].append(s)
        print(f"[bench] {rid}: score {out['score'][-1]:.2f} s, heatmap {out['heatmap'][-1]:.1f} s"
              + (f", every tile every model {out['heatmap_every_tile_every_model'][-1]:.1f} s" if brute else "")
              + f" (load {loadavg()[0]:.1f})", flush=True)
    result = {k: {"median_ms": 1000 * statistics.median(v), "ms": [round(1000 * x, 1) for x in v]}
              for k, v in out.items() if v}
    zones = {kind: int(cards.reach(next(z for _, z in models.models[(kind, "F")]), (1040, 800)).sum())
             for kind in models.kinds}
    result["tiles_in_reach_of_each_kind"] = zones
    result["fold_models_per_sex"] = sum(len(models.models[(k, "F")]) for k in models.kinds)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", required=True, help="a bundle, e.g. runs/rsna-dev-v2/bundle (docs/benchmarks.md)")
    parser.add_argument("--split", required=True,
                        help="the bundle's run's test/split.csv (id, uri, male): the images, e.g. "
                             "runs/rsna-dev-v2/test/split.csv")
    parser.add_argument("--n", type=int, default=4, help="images per scoring run")
    parser.add_argument("--runs", type=int, default=3, help="runs of each variant")
    parser.add_argument("--parts-images", type=int, default=2, help="images for the timing without Ray (0: none)")
    parser.add_argument("--brute", action="store_true", help="also time the heatmap masking every tile for every model")
    parser.add_argument("--num-cpus", type=int, help="CPUs for the local Ray (default: all)")
    parser.add_argument("--threads", type=int, help="torch threads for the timing without Ray (default: torch's)")
    parser.add_argument("--json", help="write the result here too")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    split = pd.read_csv(args.split, dtype={"id": str}).sort_values("id").head(args.n)
    sexes = {r.id: "M" if r.male else "F" for r in split.itertuples()}
    result = {"command": "PYTHONPATH=. python bench/bench_cards.py " + " ".join(
                  f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and not isinstance(v, bool))
                  + (" --brute" if args.brute else ""),
              "bundle": args.bundle, "ids": split["id"].tolist(), "cpus": os.cpu_count(),
              "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                       text=True).stdout.strip(),
              "loadavg_before": loadavg(), "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        subjects = folder / "subjects.csv"
        split[["id", "male"]].to_csv(subjects, index=False)
        if args.parts_images:
            registered = str(Path(args.bundle).parent / "registered")
            result["parts_no_ray"] = parts(registered, split["id"].head(args.parts_images).tolist(), sexes,
                                           args.bundle, args.brute)
            result["loadavg_after_parts"] = loadavg()
        if args.runs:
            for attempt in range(3):  # a shared machine's load can time the raylet's start out
                try:
                    ray_env.init_ray(RayConfig(num_cpus=args.num_cpus))
                    break
                except Exception as err:  # noqa: BLE001 - Ray raises a bare Exception for it
                    print(f"[bench] Ray did not start ({err}); again", flush=True)
                    time.sleep(30)
            else:
                raise SystemExit("Ray did not start three times")
            result["pipeline"] = pipeline(split["uri"].tolist(), str(subjects), args.bundle, args.runs, folder)
    result["loadavg_after"] = loadavg()
    emit(result, args.json)


if __name__ == "__main__":
    main()
