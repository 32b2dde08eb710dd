#!/usr/bin/env python
"""A finished rsna-dev run's own recipe on a real GPU, at the seed's input size: its zone models trained
on the run's registered images, folds and locked test split through the project's own
`train.fit_zone_model` (bf16, channels_last, torch.compile), then the shipped models on the test split.

Ray does not travel to the GPU machine: `run` needs torch, numpy, pandas, pyarrow and Pillow only.
Three steps:

  # here: pack the run (registered images as JPEG, quality 90, to fit the device's 64 MiB; its folds,
  # locked test split, cv settings and CPU results) into one file
  python bench/bench_gpu_rsna.py pack --run runs/rsna-dev-k5-refit-tta3-cl --out .gpu_pack/rsna_dev.parquet

  # on the GPU (device tool: carry .gpu_pack); stops starting fits after --budget-s
  python bench/bench_gpu_rsna.py run --pack .gpu_pack/rsna_dev.parquet --out $OUT/gpu_rsna.json \
      --predictions $OUT/gpu_rsna_predictions.parquet

  # here again: the ensemble of the kinds that finished, out of fold (cross-fitted) and on the test split
  python bench/bench_gpu_rsna.py ensemble --result gpu_rsna.json --predictions gpu_rsna_predictions.parquet

  # smoke test anywhere (tiny sizes, 4 images per sex and fold, 2 epochs, CPU)
  python bench/bench_gpu_rsna.py run --pack .gpu_pack/rsna_dev.parquet --smoke --out /tmp/gpu_rsna_smoke.json \
      --predictions /tmp/gpu_rsna_smoke.parquet

`run` trains what the packed run's cv settings say (per-sex or pooled with a sex input, k folds, epochs,
widths, FC, dropout, batch, LR, the 240-class loss, test-time views, folds or a refit shipped) with one
change: the input size (`--input-scale`, default 1.0, the seed's; `--width` changes the widths too). For
each kind, every fold model is trained on the other CV folds and predicts its own fold (out of fold), then
the shipped models (the fold models, or one refit on every CV image) predict the locked test split with
each image's sex. It reports per kind:
- training img/s (training images x epochs / fit time, compile and evaluation included) against the pure
  step rate of the same model (random input already on the GPU, same batch, compiled);
- the out-of-fold and test-split MAE, beside the same kind's in the packed CPU run;
- the shipped models' scoring rate on the test split (views included).
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import emit, shipped_fit  # noqa: E402  (this folder: python bench/bench_gpu_rsna.py; no Ray, no pydantic)
from bench_gpu_train import timed_rate  # noqa: E402
from boneage.model import train  # noqa: E402
from boneage.model.networks import model_kind  # noqa: E402

TEST_FOLD = -1  # the locked test split's rows in the pack
META = b"boneage_gpu_pack"
# The cv settings that say how a zone model is trained and shipped: what travels in the pack.
RECIPE_KEYS = ("k", "kinds", "sex_models", "ship", "input_scale", "width_mult", "fc", "dropout", "epochs",
               "batch_size", "lr", "weight_decay", "schedule", "cls_loss", "cls_sigma", "cls_ce_weight",
               "tta_views")


# -- pack (here) ----------------------------------------------------------------------------------


def pack(run: Path, out: Path, quality: int) -> None:
    import yaml

    from boneage.registration import prepare

    missing = [name for name in ("config.yaml", "cv/folds.parquet", "cv/oof.parquet", "cv/ensemble.json",
                                 "test/split.csv", "test/metrics.json", "registered") if not (run / name).exists()]
    if missing:
        raise SystemExit(f"{run} is not a finished full_cv.py run: it has no {', '.join(missing)}")
    folds = pd.read_parquet(run / "cv" / "folds.parquet")[["id", "male", "boneage", "fold"]]
    test = pd.read_csv(run / "test" / "split.csv", dtype={"id": str})[["id", "male", "boneage"]].assign(fold=TEST_FOLD)
    rows = pd.concat([folds, test], ignore_index=True)
    images = pq.read_table(run / "registered", columns=["id", "registered_png", "status"]).to_pandas()
    rows = rows.merge(images[images.status == "ok"][["id", "registered_png"]], on="id", how="inner")
    jpegs = []
    for png in rows.pop("registered_png"):
        buffer = io.BytesIO()
        Image.fromarray(prepare.decode_png(png)).save(buffer, "JPEG", quality=quality)
        jpegs.append(buffer.getvalue())
    rows["registered_jpeg"] = jpegs
    cv_settings = yaml.safe_load((run / "config.yaml").read_text())["cv"]
    recipe = {key: cv_settings[key] for key in RECIPE_KEYS}
    table = pa.Table.from_pandas(rows, preserve_index=False)
    table = table.replace_schema_metadata({META: json.dumps({"run": str(run), "jpeg_quality": quality,
                                                             "recipe": recipe,
                                                             "cpu_reference": _cpu_reference(run, recipe["kinds"])}).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    print(f"packed {len(rows)} images ({(rows.fold == TEST_FOLD).sum()} locked test) and the recipe "
          f"{recipe} into {out}: {out.stat().st_size / 2**20:.1f} MiB")


def _cpu_reference(run: Path, kinds: list[str]) -> dict:
    """The packed CPU run's MAE per kind out of fold, its shipped ensemble's out of fold and on the test split."""
    oof = pd.read_parquet(run / "cv" / "oof.parquet")
    _, shipped = shipped_fit(run)
    test = json.loads((run / "test" / "metrics.json").read_text())["accuracy"]
    return {"oof_mae_by_kind": {k: round(float((oof[k] - oof["boneage"]).abs().mean()), 2) for k in kinds},
            "oof_ensemble_mae": round(shipped["cv_mae"]["all"], 2),
            "test_mae": round(test["all"]["mae"], 2) if "all" in test else None}


def read_pack(path: Path) -> tuple[pd.DataFrame, torch.Tensor, dict]:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[META])
    if "recipe" not in meta:
        raise SystemExit(f"{path} was packed before the recipe travelled with the pack: pack the run again")
    rows = table.to_pandas()
    first = np.asarray(Image.open(io.BytesIO(rows.registered_jpeg[0])))
    bank = torch.empty((len(rows), 1, *first.shape), dtype=torch.uint8)
    for i, data in enumerate(rows.pop("registered_jpeg")):
        bank[i, 0] = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("L")).copy())
    return rows, bank, meta


# -- run (on the GPU) -----------------------------------------------------------------------------


def train_config(recipe: dict, args) -> train.TrainConfig:
    """The recipe's training settings (as validation.cv.train_config makes them; one seed for all fits),
    with --width, and the tiny sizes of --smoke."""
    cuda = torch.device(args.device).type == "cuda"
    return train.TrainConfig(
        epochs=2 if args.smoke else recipe["epochs"], batch_size=8 if args.smoke else recipe["batch_size"],
        lr=recipe["lr"], weight_decay=recipe["weight_decay"], schedule=recipe["schedule"], patience=0,
        width_mult=0.0625 if args.smoke else (args.width or recipe["width_mult"]),
        fc=32 if args.smoke else recipe["fc"], dropout=recipe["dropout"], cls_loss=recipe["cls_loss"],
        cls_sigma=recipe["cls_sigma"], cls_ce_weight=recipe["cls_ce_weight"], bf16=True, channels_last=True,
        compile=cuda and not args.no_compile, seed=0)


def pure_step_rate(kind, cfg: train.TrainConfig, device, pooled: bool, windows=5, steps=8, warmup=5) -> float:
    """img/s of the bare compiled train step of `kind`'s model: random input on the device, same batch."""
    cuda = device.type == "cuda"
    model = kind.build(cfg.width_mult, cfg.fc or 2048, cfg.dropout, sex_input=pooled)
    model = model.to(device, memory_format=torch.channels_last)
    run = torch.compile(model, dynamic=False) if cfg.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x = torch.randn(cfg.batch_size, 1, *kind.input_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.rand(cfg.batch_size, device=device)
    kwargs = {"male": torch.rand(cfg.batch_size, device=device) > 0.5} if pooled else {}

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and cfg.bf16):
            out = run(x, **kwargs)
        loss = (out.float().reshape(len(y), -1)[:, 0] - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timing = SimpleNamespace(warmup=warmup, windows=windows, steps=steps)
    return timed_rate(step, cfg.batch_size, timing, sync)  # the same timing as bench_gpu_train's numbers


def run(args) -> tuple[dict, pd.DataFrame]:
    device = torch.device(args.device)
    rows, bank, meta = read_pack(args.pack)
    recipe = meta["recipe"]
    if args.smoke:
        keep = np.array(rows.groupby(["male", "fold"], group_keys=False).head(4).index)
        rows, bank = rows.loc[keep].reset_index(drop=True), bank[keep]
    scale = 0.1 if args.smoke else args.input_scale
    cfg = train_config(recipe, args)
    pooled, views, refit = recipe["sex_models"] == "pooled", recipe["tta_views"], recipe["ship"] == "refit"
    bank = bank.to(device)
    ages = rows.boneage.to_numpy(np.float32)
    male, fold = np.array(rows.male, dtype=bool), rows.fold.to_numpy()  # a copy: torch wants it writable
    test_idx = np.flatnonzero(fold == TEST_FOLD)
    # pooled: one model per kind for both sexes, told each image's sex; per sex: a model per kind and sex
    groups = {"all": np.ones(len(rows), bool)} if pooled else {"F": ~male, "M": male}
    sex_input = male if pooled else None
    predictions = rows[["id", "male", "boneage", "fold"]].copy()
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "pack": meta, "images": len(rows), "test_images": len(test_idx),
              "train_config": {k: v for k, v in vars(cfg).items() if k != "augment"}, "input_scale": scale,
              "tta_views": views, "ship": recipe["ship"], "kinds": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    deadline = time.time() + args.budget_s
    shipped: dict[str, list[tuple[np.ndarray, list]]] = {}
    for name in args.kinds or recipe["kinds"]:
        if time.time() > deadline:  # not even its pure step rate (a compile of its own)
            result["kinds"][name] = {"skipped": "the budget ran out before it started"}
            continue
        kind = model_kind(name, scale)
        record = {"input_hw": list(kind.input_size), "fits": [],
                  "pure_step_img_s": round(pure_step_rate(kind, cfg, device, pooled), 1)}
        column = np.full(len(rows), np.nan)
        complete, parts = True, []
        for group, of_group in groups.items():
            members = of_group & (fold != TEST_FOLD)
            fits = [(f, np.flatnonzero(members & (fold != f)), np.flatnonzero(members & (fold == f)))
                    for f in sorted(set(fold[members]))]
            if refit:
                fits.append((None, np.flatnonzero(members), np.array([], int)))
            models = []
            for f, train_idx, scored in fits:
                if time.time() > deadline:
                    record.setdefault("skipped", []).append(f"{group}-{'refit' if f is None else f'fold{f}'}")
                    complete = False
                    continue
                started = time.perf_counter()
                fit = train.fit_zone_model(bank, ages, train_idx, np.array([], int), kind, cfg, device, male=sex_input)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                models.append(fit.model)
                entry = {"group": group, "fold": "refit" if f is None else int(f), "train_images": len(train_idx),
                         "fit_s": round(seconds, 1), "train_img_s": round(len(train_idx) * cfg.epochs / seconds, 1)}
                if len(scored):
                    column[scored] = _predict(fit.model, bank, scored, kind, device, views, sex_input)
                    entry["oof_mae"] = round(float(np.abs(column[scored] - ages[scored]).mean()), 2)
                record["fits"].append(entry)
                print(f"{name} {entry}", flush=True)
            ship = models[-1:] if refit else models
            group_test = np.flatnonzero(of_group & (fold == TEST_FOLD))
            if complete and len(group_test):
                column[group_test] = np.mean([_predict(m, bank, group_test, kind, device, views, sex_input)
                                              for m in ship], axis=0)
                parts.append((group_test, ship))
        cv_rows = fold != TEST_FOLD
        if complete:  # a kind with a fit left out has no full out-of-fold column: not in the ensemble
            shipped[name] = parts
            predictions[name] = column
            record["oof_mae"] = round(float(np.abs(column[cv_rows] - ages[cv_rows]).mean()), 2)
            record["test_mae"] = round(float(np.abs(column[test_idx] - ages[test_idx]).mean()), 2)
        rates = [f["train_img_s"] for f in record["fits"]]
        if rates:
            record["train_img_s_median"] = statistics.median(rates)
            record["train_over_pure"] = round(record["train_img_s_median"] / record["pure_step_img_s"], 3)
        record["cpu_oof_mae"] = meta["cpu_reference"]["oof_mae_by_kind"].get(name)
        result["kinds"][name] = record
    result["scoring"] = score_rate(shipped, bank, len(test_idx), scale, device, views, sex_input)
    return result, predictions


def _predict(model, bank, idx, kind, device, views, male) -> np.ndarray:
    return train.predict(model, bank, idx, kind, device=device, views=views, male=male).float().cpu().numpy()


def score_rate(shipped, bank, n_test, scale, device, views, male) -> dict:
    """The shipped models of every finished kind on the locked test split, as a bundle scores an image of
    known sex: img/s over the whole set, median of 3 after a warm-up."""
    if not shipped or not n_test:
        return {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def once():
        for name, parts in shipped.items():
            kind = model_kind(name, scale)
            for idx, models in parts:
                for model in models:
                    _predict(model, bank, idx, kind, device, views, male)

    once()  # warm-up (cuDNN autotuning, allocator)
    times = []
    for _ in range(3):
        sync()
        started = time.perf_counter()
        once()
        sync()
        times.append(time.perf_counter() - started)
    return {"kinds": sorted(shipped), "models": sum(len(m) for parts in shipped.values() for _, m in parts),
            "views": views, "images": n_test, "seconds_median": round(statistics.median(times), 3),
            "bundle_img_s": round(n_test / statistics.median(times), 1)}


# -- ensemble (here) ------------------------------------------------------------------------------


def ensemble(result_path: Path, predictions_path: Path) -> dict:
    """The kinds that finished on the GPU combined per sex by LAD: out of fold cross-fitted over the CV
    folds (no row's weights saw its label), and on the test split with the weights fit on every CV row."""
    from boneage.validation import ensemble as blend
    from boneage.validation import metrics

    result = json.loads(result_path.read_text())
    table = pd.read_parquet(predictions_path)
    kinds = [k for k in result["kinds"] if k in table.columns]
    if not kinds:
        raise SystemExit(f"no kind finished every fit in {result_path}: nothing to combine")
    cv_rows, test_rows = table[table.fold != TEST_FOLD].reset_index(drop=True), table[table.fold == TEST_FOLD]
    record, oof = blend.fit_ensemble(cv_rows, kinds, "lad")
    test = blend.predict(record, test_rows[kinds], test_rows["male"].to_numpy(bool))
    cpu = result["pack"]["cpu_reference"]
    truth = test_rows["boneage"].to_numpy(float)
    out = {"kinds": kinds, "input_scale": result["input_scale"], "device": result["device"],
           "oof_ensemble_mae": round(blend.mae(oof, cv_rows["boneage"].to_numpy(float)), 2),
           "test": metrics.accuracy(test, truth, n_boot=2000),
           "cpu_run": {"oof_mae_by_kind": {k: cpu["oof_mae_by_kind"].get(k) for k in kinds},
                       "oof_ensemble_mae_all_kinds": cpu["oof_ensemble_mae"], "test_mae": cpu["test_mae"]},
           "gpu_oof_mae_by_kind": {k: result["kinds"][k]["oof_mae"] for k in kinds}}
    out["test_line"] = metrics.describe(out["test"])
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: pack a finished rsna-dev run's registered images and recipe for the GPU")
    p.add_argument("--run", type=Path, required=True, help="a finished full_cv.py output folder")
    p.add_argument("--out", type=Path, default=Path(".gpu_pack/rsna_dev.parquet"))
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the packed images")
    r = sub.add_parser("run", help="on the GPU: train the packed recipe at --input-scale, time and score")
    r.add_argument("--pack", type=Path, default=Path(".gpu_pack/rsna_dev.parquet"))
    r.add_argument("--out", type=Path, required=True, help="the JSON result")
    r.add_argument("--predictions", type=Path, help="a parquet of every finished kind's out-of-fold and test predictions")
    r.add_argument("--kinds", help="comma list of zone kinds, in order (default: the recipe's); the budget "
                                   "cuts the last ones")
    r.add_argument("--input-scale", type=float, default=1.0, help="zone input size against the seed's (1.0: the seed's)")
    r.add_argument("--width", type=float, help="width multiplier (default: the recipe's)")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--no-compile", action="store_true")
    r.add_argument("--budget-s", type=float, default=420, help="stop starting new fits after this long")
    r.add_argument("--smoke", action="store_true", help="tiny sizes, 4 images per sex and fold, 2 epochs")
    e = sub.add_parser("ensemble", help="here: combine the kinds a GPU run finished, out of fold and on the test split")
    e.add_argument("--result", type=Path, required=True)
    e.add_argument("--predictions", type=Path, required=True)
    e.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        return pack(args.run, args.out, args.quality)
    if args.command == "ensemble":
        return emit(ensemble(args.result, args.predictions), args.json)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()] if args.kinds else None
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (use --smoke on a CPU)")
    result, predictions = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    if args.predictions:
        args.predictions.parent.mkdir(parents=True, exist_ok=True)
        predictions.to_parquet(args.predictions, index=False)
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "fits"} for k, v in result["kinds"].items()}, indent=1))
    print(json.dumps(result["scoring"], indent=1))


if __name__ == "__main__":
    main()
