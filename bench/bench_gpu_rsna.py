#!/usr/bin/env python
"""The torch path on a real GPU, on real images: zone models trained on rsna-dev at the seed's full
input sizes and widths through the project's own `train.fit_zone_model` (bf16, channels_last,
torch.compile), then a whole bundle's worth of fold models scoring the locked test split.

Ray does not travel to the GPU machine: this needs torch, numpy, pandas, pyarrow and Pillow only.
Two steps:

  # here, where the rsna-dev run is (runs/rsna-dev-v2: its registered images, CV folds, locked test
  # split and out-of-fold MAE at 1/4 input size on CPU): pack what the GPU needs into one file that
  # fits the device's 64 MiB (registered images as JPEG, quality 90: PNG would be 146 MB)
  python bench/bench_gpu_rsna.py pack --run runs/rsna-dev-v2 --out .gpu_pack/rsna_dev.parquet

  # on the GPU (device tool: carry .gpu_pack), ~6-9 min for two kinds
  python bench/bench_gpu_rsna.py run --pack .gpu_pack/rsna_dev.parquet --kinds A-reg,C-cls --out $OUT/gpu_rsna.json

  # smoke test anywhere (tiny sizes, 2 epochs, CPU)
  python bench/bench_gpu_rsna.py run --pack .gpu_pack/rsna_dev.parquet --smoke --out /tmp/gpu_rsna_smoke.json

For each kind, sex and CV fold it trains one model on the other folds with rsna_dev_v2.yaml's recipe
(fixed schedule, 50 epochs, 240-class heads on cross-entropy σ 12) and reports:
- training img/s (training images x epochs / fit time, compile and per-epoch evaluation included)
  against the pure step rate of the same model (random input already on the GPU, same batch, compiled);
- the out-of-fold MAE per kind, beside the same kind's at 1/4 input size on CPU (from the packed run);
- scoring: every trained fold model (all kinds, both sexes) on the locked test split, img/s of the
  whole bundle and the test MAE of each kind's fold mean with the true sex.
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

from bench_gpu_train import timed_rate  # noqa: E402  (this folder: python bench/bench_gpu_rsna.py)
from boneage.model import train  # noqa: E402
from boneage.model.networks import model_kind  # noqa: E402

TEST_FOLD = -1  # the locked test split's rows in the pack
META = b"boneage_gpu_pack"


# -- pack (here) ----------------------------------------------------------------------------------


def pack(run: Path, out: Path, quality: int) -> None:
    from boneage.registration import prepare

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
    trials = pd.read_parquet(run / "cv" / "trials.parquet")
    import yaml

    cpu = {"input_scale": yaml.safe_load((run / "config.yaml").read_text())["cv"]["input_scale"],
           "oof_mae_by_kind": {k: round(v, 2) for k, v in _oof_mae(run, trials).items()}}
    table = pa.Table.from_pandas(rows, preserve_index=False)
    table = table.replace_schema_metadata({META: json.dumps({"run": str(run), "jpeg_quality": quality,
                                                             "cpu_reference": cpu}).encode()})
    out.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, out)
    print(f"packed {len(rows)} images ({(rows.fold == TEST_FOLD).sum()} locked test) into {out}: "
          f"{out.stat().st_size / 2**20:.1f} MiB")


def _oof_mae(run: Path, trials: pd.DataFrame) -> dict[str, float]:
    """Out-of-fold MAE per kind of the packed (CPU) run, from its OOF table."""
    oof = pd.read_parquet(run / "cv" / "oof.parquet")
    kinds = sorted(set(trials["kind"]) & set(oof.columns))
    return {k: float((oof[k] - oof["boneage"]).abs().mean()) for k in kinds}


def read_pack(path: Path) -> tuple[pd.DataFrame, torch.Tensor, dict]:
    table = pq.read_table(path)
    meta = json.loads(table.schema.metadata[META])
    rows = table.to_pandas()
    first = np.asarray(Image.open(io.BytesIO(rows.registered_jpeg[0])))
    bank = torch.empty((len(rows), 1, *first.shape), dtype=torch.uint8)
    for i, data in enumerate(rows.pop("registered_jpeg")):
        bank[i, 0] = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("L")).copy())
    return rows, bank, meta


# -- run (on the GPU) -----------------------------------------------------------------------------


def pure_step_rate(kind, cfg: train.TrainConfig, device, windows=5, steps=8, warmup=5) -> float:
    """img/s of the bare compiled train step of `kind`'s model: random input on the device, same batch."""
    cuda = device.type == "cuda"
    model = kind.build(cfg.width_mult, cfg.fc or 2048, cfg.dropout).to(device, memory_format=torch.channels_last)
    run = torch.compile(model, dynamic=False) if cfg.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr)
    x = torch.randn(cfg.batch_size, 1, *kind.input_size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.rand(cfg.batch_size, device=device)

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda and cfg.bf16):
            out = run(x)
        loss = (out.float().reshape(len(y), -1)[:, 0] - y).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timing = SimpleNamespace(warmup=warmup, windows=windows, steps=steps)
    return timed_rate(step, cfg.batch_size, timing, sync)  # the same timing as bench_gpu_train's numbers


def run(args) -> dict:
    device = torch.device(args.device)
    rows, bank, meta = read_pack(args.pack)
    if args.smoke:
        keep = rows.groupby(["male", "fold"], group_keys=False).head(4).index.to_numpy()
        rows, bank = rows.loc[keep].reset_index(drop=True), bank[keep]
    scale, width, fc = (0.1, 0.0625, 32) if args.smoke else (1.0, 1.0, None)
    cfg = train.TrainConfig(epochs=2 if args.smoke else args.epochs, batch_size=8 if args.smoke else args.batch,
                            lr=args.lr, schedule="onecycle", patience=0, width_mult=width, fc=fc,
                            cls_loss="ce", cls_sigma=12.0, bf16=True, channels_last=True,
                            compile=device.type == "cuda" and not args.no_compile, seed=0)
    bank = bank.to(device)
    ages = rows.boneage.to_numpy(np.float32)
    test_idx = np.flatnonzero(rows.fold.to_numpy() == TEST_FOLD)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
              "torch": torch.__version__, "pack": meta, "images": len(rows), "test_images": len(test_idx),
              "train_config": {k: v for k, v in vars(cfg).items() if k != "augment"}, "input_scale": scale,
              "kinds": {}, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    deadline = time.time() + args.budget_s
    models: dict[tuple[str, str], list] = {}
    for name in args.kinds:
        kind = model_kind(name, scale)
        record = {"input_hw": list(kind.input_size), "fits": []}
        record["pure_step_img_s"] = round(pure_step_rate(kind, cfg, device), 1)
        oof_error = []
        for male in (False, True):
            sex = "M" if male else "F"
            mine = rows.male.to_numpy() == male
            for fold in sorted(set(rows.fold[mine]) - {TEST_FOLD}):
                if time.time() > deadline:
                    record.setdefault("skipped", []).append(f"{sex}-fold{fold}")
                    continue
                train_idx = np.flatnonzero(mine & (rows.fold.to_numpy() != fold) & (rows.fold.to_numpy() != TEST_FOLD))
                scored = np.flatnonzero(mine & (rows.fold.to_numpy() == fold))
                started = time.perf_counter()
                fit = train.fit_zone_model(bank, ages, train_idx, np.array([], int), kind, cfg, device)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - started
                pred = train.predict(fit.model, bank, scored, kind, device=device).float().cpu().numpy()
                oof_error.append(np.abs(pred - ages[scored]))
                models.setdefault((name, sex), []).append(fit.model)
                record["fits"].append({"sex": sex, "fold": int(fold), "train_images": len(train_idx),
                                       "fit_s": round(seconds, 1),
                                       "train_img_s": round(len(train_idx) * cfg.epochs / seconds, 1),
                                       "oof_mae": round(float(np.abs(pred - ages[scored]).mean()), 2)})
                print(f"{name} {sex} fold {fold}: {record['fits'][-1]}", flush=True)
        if oof_error:
            record["oof_mae"] = round(float(np.concatenate(oof_error).mean()), 2)
            rates = [f["train_img_s"] for f in record["fits"]]
            record["train_img_s_median"] = statistics.median(rates)
            record["train_over_pure"] = round(record["train_img_s_median"] / record["pure_step_img_s"], 3)
        record["cpu_quarter_size_oof_mae"] = meta["cpu_reference"]["oof_mae_by_kind"].get(name)
        result["kinds"][name] = record
    result["scoring"] = score_bundle(models, bank, ages, rows, test_idx, scale, device)
    return result


def score_bundle(models, bank, ages, rows, test_idx, scale, device) -> dict:
    """Every trained fold model on the locked test split, as BundleModels.fold_predictions runs them."""
    if not models or not len(test_idx):
        return {}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    male = rows.male.to_numpy()[test_idx]

    def once():
        preds = {}
        for (name, sex), fold_models in models.items():
            kind = model_kind(name, scale)
            preds[(name, sex)] = np.mean([train.predict(m, bank, test_idx, kind, device=device).float().cpu().numpy()
                                          for m in fold_models], axis=0)
        return preds

    once()  # warm-up (cuDNN autotuning, allocator)
    times = []
    for _ in range(3):
        sync()
        started = time.perf_counter()
        preds = once()
        sync()
        times.append(time.perf_counter() - started)
    kinds = sorted({name for name, _ in models})
    mae = {}
    for name in kinds:
        if (name, "F") in preds and (name, "M") in preds:
            own = np.where(male, preds[(name, "M")], preds[(name, "F")])
            mae[name] = round(float(np.abs(own - ages[test_idx]).mean()), 2)
    n_models = sum(len(v) for v in models.values())
    return {"fold_models": n_models, "images": len(test_idx), "seconds_median": round(statistics.median(times), 3),
            # each image goes through every model of both sexes here, as an image of unknown sex would
            "bundle_img_s": round(len(test_idx) / statistics.median(times), 1), "test_mae_by_kind": mae}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="here: pack a finished rsna-dev run's registered images for the GPU machine")
    p.add_argument("--run", type=Path, default=Path("runs/rsna-dev-v2"))
    p.add_argument("--out", type=Path, default=Path(".gpu_pack/rsna_dev.parquet"))
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the packed images")
    r = sub.add_parser("run", help="on the GPU: train, time and score")
    r.add_argument("--pack", type=Path, default=Path(".gpu_pack/rsna_dev.parquet"))
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--kinds", default="A-reg,C-cls", help="comma list of zone kinds (each: 2 sexes x k folds)")
    r.add_argument("--epochs", type=int, default=50)
    r.add_argument("--batch", type=int, default=64)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--no-compile", action="store_true")
    r.add_argument("--budget-s", type=float, default=420, help="stop starting new fits after this long")
    r.add_argument("--smoke", action="store_true", help="tiny sizes, 4 images per sex and fold, 2 epochs")
    args = parser.parse_args(argv)
    if args.command == "pack":
        return pack(args.run, args.out, args.quality)
    args.kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("--device cuda but torch sees no CUDA device (use --smoke on a CPU)")
    result = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: {kk: vv for kk, vv in v.items() if kk != "fits"} for k, v in result["kinds"].items()}, indent=1))
    print(json.dumps(result["scoring"], indent=1))


if __name__ == "__main__":
    main()
