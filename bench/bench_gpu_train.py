#!/usr/bin/env python
"""Training throughput on one GPU: the compiled step alone vs fed by on-device augmented crops.

For zones A, B, C (seed input sizes 500x375, 375x375, 467x200) and the key point net (130x100):
  pure      random input already on the GPU, train step (bf16 autocast, channels_last, batch 128)
  full      a GPU-resident bank of N synthetic registered uint8 images (1040x800), ZoneSampler
            crops with augmentation, then the same step
  crop      the sampler alone
each eager and compiled (torch.compile), plus eager inference; img/s is the median of several
timed windows after warmup. Needs torch only (imports boneage from this checkout, no install).

  python bench/bench_gpu_train.py --out bench.json            # on the GPU, ~4-5 min
  python bench/bench_gpu_train.py --quick --device cpu --out /tmp/b.json   # smoke test
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("bench_gpu_train: needs torch (pip install torch)")
try:
    from boneage.model.augment import Augment, ZoneSampler, keypoint_sampler
    from boneage.registration.frame import FRAME_H, FRAME_W
    from boneage.model.networks import KeypointNet, model_kind
except ImportError as e:  # boneage/{frame,models,augment}.py import torch and nothing else
    sys.exit(f"bench_gpu_train: cannot import boneage from {Path(__file__).resolve().parents[1]}: {e}")

MODELS = ("A", "B", "C", "KP")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="bench_gpu_train.json", help="JSON results path")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--models", default=",".join(MODELS), help="comma list of A,B,C,KP")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--bank", type=int, default=2000, help="images in the synthetic bank")
    p.add_argument("--windows", type=int, default=5, help="timed windows (median reported)")
    p.add_argument("--steps", type=int, default=8, help="steps per timed window")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps before timing")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile numbers")
    p.add_argument("--compile", action="store_true", help="compile also in --quick on CPU (slow)")
    p.add_argument("--budget-s", type=float, default=330.0,
                   help="skip what is left once this much wall time has passed (results so far are kept)")
    p.add_argument("--quick", action="store_true",
                   help="CPU smoke test: tiny inputs, tiny models, tiny bank, few steps, no compile")
    a = p.parse_args(argv)
    a.models = [m.strip().upper() for m in a.models.split(",") if m.strip()]
    if bad := [m for m in a.models if m not in MODELS]:
        p.error(f"unknown models {bad}; choose from {MODELS}")
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False (use --device cpu --quick)")
    if a.quick:
        a.batch, a.bank, a.windows, a.steps, a.warmup = min(a.batch, 8), min(a.bank, 32), 3, 2, 1
        a.no_compile = a.no_compile or (a.device == "cpu" and not a.compile)
    return a


# -- setup ----------------------------------------------------------------------------------------


def synthetic_bank(n, size, device, gen):
    """n smooth-noise uint8 images (n, 1, H, W) made on the device in chunks (no big float copy)."""
    h, w = size
    bank = torch.empty(n, 1, h, w, dtype=torch.uint8, device=device)
    for s in range(0, n, 128):
        k = min(128, n - s)
        coarse = torch.rand(k, 1, max(2, h // 16), max(2, w // 16), generator=gen, device=device)
        fine = F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False)
        bank[s : s + k] = (fine * 255).to(torch.uint8)
    return bank


def build(name, quick):
    """(model, sampler, input_size, loss_fn, target_shape) for one benchmark model."""
    if name == "KP":
        size = (FRAME_H // 16, FRAME_W // 16) if not quick else (26, 20)
        model = KeypointNet(size, width_mult=0.125 if quick else 1.0, fc=32 if quick else 512)
        return model, keypoint_sampler(out_size=size), size, F.mse_loss, (3, 2)
    kind = model_kind(f"{name}-reg", 0.1 if quick else 1.0)
    model = kind.build(width_mult=0.125, fc=64) if quick else kind.build()
    mae = lambda p, y: (p - y).abs().mean()  # noqa: E731
    return model, ZoneSampler(kind.box, kind.input_size, Augment()), kind.input_size, mae, ()


def timed_rate(fn, batch, args, sync):
    """Median img/s over args.windows windows of args.steps calls, after args.warmup calls."""
    for _ in range(args.warmup):
        fn()
    sync()
    rates = []
    for _ in range(args.windows):
        t = time.perf_counter()
        for _ in range(args.steps):
            fn()
        sync()
        rates.append(batch * args.steps / (time.perf_counter() - t))
    return statistics.median(rates)


# -- one model ------------------------------------------------------------------------------------


def bench_model(name, args, device, bank, kp_bank, gen, deadline, log):
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    torch.manual_seed(0)
    model, sampler, size, loss_fn, tshape = build(name, args.quick)
    model = model.to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    src = kp_bank if name == "KP" else bank
    B = args.batch
    x_pure = torch.randn(B, 1, *size, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.rand(B, *tshape, device=device)
    r = {"model": name, "input_hw": list(size), "batch": B,
         "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 2)}

    def crops():
        idx = torch.randint(0, src.shape[0], (B,), generator=gen, device=device)
        return sampler(src, idx, gen, train=True).contiguous(memory_format=torch.channels_last)

    def step(run, x):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            pred = run(x)
        loss = loss_fn(pred.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer():
        with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda):
            model(x_pure)

    def measure(key, fn, batch=B):
        if time.perf_counter() > deadline:
            r.setdefault("skipped", []).append(key)
            return
        try:
            r[key] = round(timed_rate(fn, batch, args, sync), 1)
            log(f"  {name} {key:<14} {r[key]:>10,.1f} img/s")
        except Exception as e:  # keep going: one failing variant must not lose the others
            r.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"
            log(f"  {name} {key} FAILED: {type(e).__name__}: {e}")
            if cuda:
                torch.cuda.empty_cache()

    measure("crop_only", lambda: crops())
    model.train()
    measure("eager_pure", lambda: step(model, x_pure))
    measure("eager_full", lambda: step(model, crops()))
    model.eval()
    measure("eager_infer", infer)
    model.train()
    if not args.no_compile and time.perf_counter() < deadline:
        try:
            torch._dynamo.reset()  # each model compiles from scratch, static shapes (as in training)
            compiled = torch.compile(model, dynamic=False)
            t = time.perf_counter()
            step(compiled, x_pure)  # the first call compiles forward and backward
            sync()
            r["compile_s"] = round(time.perf_counter() - t, 1)
            log(f"  {name} compile_s      {r['compile_s']:>10.1f} s")
            measure("compiled_pure", lambda: step(compiled, x_pure))
            measure("compiled_full", lambda: step(compiled, crops()))
        except Exception as e:
            r.setdefault("errors", {})["compile"] = f"{type(e).__name__}: {e}"
            log(f"  {name} torch.compile FAILED: {type(e).__name__}: {e}")
    for kind in ("eager", "compiled"):
        if f"{kind}_full" in r and f"{kind}_pure" in r:
            r[f"{kind}_ratio"] = round(r[f"{kind}_full"] / r[f"{kind}_pure"], 3)
    if cuda:
        r["peak_mem_GB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        torch.cuda.reset_peak_memory_stats(device)
    return r


# -- main -----------------------------------------------------------------------------------------


def table(results):
    cols = ["model", "input_hw", "params_M", "eager_pure", "eager_full", "eager_ratio", "compiled_pure",
            "compiled_full", "compiled_ratio", "eager_infer", "crop_only", "compile_s"]
    fmt = lambda v: "-" if v is None else ("x".join(map(str, v)) if isinstance(v, list) else (f"{v:,.3f}" if isinstance(v, float) and v < 10 else (f"{v:,.0f}" if isinstance(v, float) else str(v))))  # noqa: E731
    rows = [cols] + [[fmt(r.get(c)) for c in cols] for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in rows)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    deadline = t0 + args.budget_s
    device = torch.device(args.device)
    log = lambda s: print(s, flush=True)  # noqa: E731
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "quick": args.quick}
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
        env["gpu"] = torch.cuda.get_device_name(device)
    log(f"bench_gpu_train: {env}")
    gen = torch.Generator(device=device).manual_seed(0)
    res = (FRAME_H // 20, FRAME_W // 20) if args.quick else (FRAME_H // 2, FRAME_W // 2)
    kp_res = (26, 20) if args.quick else (FRAME_H // 16, FRAME_W // 16)
    try:
        bank = synthetic_bank(args.bank, res, device, gen)
        kp_bank = synthetic_bank(args.bank, kp_res, device, gen)
    except torch.OutOfMemoryError as e:
        sys.exit(f"bench_gpu_train: the bank of {args.bank} images {res} does not fit: {e} (try --bank 500)")
    log(f"bank {tuple(bank.shape)} uint8 = {bank.numel() / 2**30:.2f} GiB on {device}")
    results = []
    for name in args.models:
        try:
            results.append(bench_model(name, args, device, bank, kp_bank, gen, deadline, log))
        except Exception as e:
            traceback.print_exc()
            results.append({"model": name, "errors": {"setup": f"{type(e).__name__}: {e}"}})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"env": env, "args": {k: v for k, v in vars(args).items()}, "results": results,
           "wall_s": round(time.perf_counter() - t0, 1)}
    print("\ntrain img/s (median of windows); ratio = full / pure; crop_only = sampler alone")
    print(table(results))
    print(f"wall {out['wall_s']} s")
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.out}")
    return 0 if all("errors" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
