"""Single-thread per-epoch timing of one zone model's training on the embedded bank (bench only).

For each (input_scale, width_mult, kind): the pooled bank is built once (as boneage.model.augment now does
per trial: its seconds are reported apart), then `--epochs` epochs of training steps (~72 images of one
sex, batch 16, full batches only, as a CV trial's fit split) are timed; the per-epoch median is reported,
plus predicting one scored fold (~36 images). Each is measured as wall seconds and as the process's CPU
seconds (time.process_time, one thread): on a loaded machine the CPU seconds estimate a quiet machine's
wall seconds (they miss only cache and memory-bandwidth contention), the wall seconds do not.

    .venv/bin/python bench/epoch_timing.py --registered /tmp/emb_ref/registered \
        --split /tmp/emb_ref/test/split.csv --folds /tmp/emb_ref/folds.parquet --json out.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import time

import numpy as np
import pandas as pd
import torch


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--registered", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--folds", required=True)
    p.add_argument("--scales", default="0.125,0.25")
    p.add_argument("--widths", default="0.125,0.25")
    p.add_argument("--kinds", default="A-reg,B-reg,C-reg")
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from boneage.model import augment
    from boneage.validation import cv
    from boneage.model.networks import model_kind, to_scaled
    from boneage.model.train import predict

    folds = pd.read_parquet(a.folds)
    test = set(pd.read_csv(a.split)["id"].astype(str))
    folds = folds[~folds["id"].astype(str).isin(test)]
    t0, c0 = time.perf_counter(), time.process_time()
    rows = cv.read_trial_rows(a.registered, folds, False)
    bank, ages, _ = cv.load_bank(rows)
    decode_s, decode_cpu = time.perf_counter() - t0, time.process_time() - c0
    fold = rows["fold"].to_numpy()
    tr = torch.as_tensor(np.flatnonzero(fold != 0))
    va = torch.as_tensor(np.flatnonzero(fold == 0))
    y = torch.as_tensor(ages)
    out = []
    print(f"bank {tuple(bank.shape)} decode {decode_s:.2f}s cpu {decode_cpu:.2f}s; train {len(tr)} val {len(va)}; load {os.getloadavg()}")
    for scale, wm, kname in itertools.product(map(float, a.scales.split(",")), map(float, a.widths.split(",")),
                                              a.kinds.split(",")):
        kind = model_kind(kname, scale)
        sampler = augment.ZoneSampler(kind.box, kind.input_size, augment.Augment())
        augment._POOLED.clear()
        t, c = time.perf_counter(), time.process_time()
        k = sampler._pool_factor(*bank.shape[-2:])
        if augment._cache_pooling(bank, k):
            augment.pooled_bank(bank, k)
        pool_s, pool_cpu = time.perf_counter() - t, time.process_time() - c
        torch.manual_seed(0)
        model = kind.build(wm, 256, 0.1)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
        gen = torch.Generator().manual_seed(0)
        bs, steps = 16, len(tr) // 16
        ep_s, crop_s, ep_cpu = [], [], []
        for e in range(a.epochs):
            model.train()
            t, c0 = time.perf_counter(), time.process_time()
            perm = tr[torch.randperm(len(tr), generator=gen)]
            c = 0.0
            for s in range(steps):
                tc = time.perf_counter()
                x = sampler(bank, perm[s * bs:(s + 1) * bs], gen, train=True)
                c += time.perf_counter() - tc
                loss = (model(x) - to_scaled(y[perm[s * bs:(s + 1) * bs]])).abs().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
            ep_s.append(time.perf_counter() - t)
            ep_cpu.append(time.process_time() - c0)
            crop_s.append(c)
        t, c = time.perf_counter(), time.process_time()
        predict(model, bank, va, kind, 256, "cpu", True, True)
        pred_s, pred_cpu = time.perf_counter() - t, time.process_time() - c
        r = {"scale": scale, "width_mult": wm, "kind": kname, "input": list(kind.input_size), "pool_k": k,
             "pool_s": pool_s, "epoch_s": float(np.median(ep_s[1:])), "crop_s": float(np.median(crop_s[1:])),
             "predict_s": pred_s,
             "pool_cpu": pool_cpu, "epoch_cpu": float(np.median(ep_cpu[1:])), "predict_cpu": pred_cpu, "params": sum(q.numel() for q in model.parameters())}
        out.append(r)
        print(f"s{scale:<6} wm{wm:<6} {kname:6} in {kind.input_size} k{k} pool {pool_s:.2f}s  "
              f"epoch {r['epoch_s']:.3f}s cpu {r['epoch_cpu']:.3f}s (crops {r['crop_s']:.3f})  "
              f"pool cpu {pool_cpu:.2f}s  predict {pred_s:.3f}s cpu {pred_cpu:.3f}s  params {r['params']}",
              flush=True)
    print(f"load {os.getloadavg()}")
    if a.json:
        json.dump({"decode_s": decode_s, "decode_cpu": decode_cpu, "rows": out, "load_end": os.getloadavg()}, open(a.json, "w"), indent=1)


if __name__ == "__main__":
    main()
