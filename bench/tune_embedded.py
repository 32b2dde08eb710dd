"""Tune the zone models' CV settings of the embedded default run (synthetic radiographs, CPU).

Runs CV trials exactly as boneage.distributed.ray_cv's training loop does, without Ray: for one (kind, sex, fold),
read that sex's registered images, train on the other folds (with the epoch chosen on
cv.inner_split's selection split, or on a fixed schedule when inner_val_fraction is 0), predict the
scored fold once. The scored fold never chooses anything. Each trial runs on one torch thread, two
(or --workers) trials at a time, as the embedded run does on a 2-core machine.

Every setting is a set of CVConfig overrides (plus, bench only, Augment overrides: CVConfig has no
augmentation field). The "default" setting (today's CVConfig) runs in every invocation, so the
per-trial seconds of a setting are also reported as a ratio to the default measured under the same
machine load.

    .venv/bin/python bench/tune_embedded.py --registered /tmp/emb_ref/registered \
        --split /tmp/emb_ref/test/split.csv --folds /tmp/emb_ref/folds.parquet \
        --settings default,final --trials full --json bench/results/tune_embedded_full.json

--trials: "subset" (A-reg, B-reg, B-cls, C-reg x F, M x fold 0: 8 trials), "subset2" (the same
kinds on folds 0 and 1: 16 trials), "cls" (the three classification kinds x F, M x folds 0, 1: 12
trials) or "full" (all 36). On "full" the table adds the per-sex median
baseline and the honest LAD / NNLS ensembles (boneage.validation.ensemble: per sex, weights fit on two folds'
out-of-fold predictions, scored on the third, rotated).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

# Settings: CVConfig overrides; "augment" (bench only) overrides boneage.model.augment.Augment's fields;
# (Rounds 1-2 ran before boneage.model.augment pooled each bank once: every batch pooled its full images.)
# Round 3 (after the pooling fix): every trial clears boneage.model.augment's pooled-bank cache first, so its
# seconds include pooling its bank once, as a pipeline trial (which decodes its own bank) pays it.
_R3 = {"input_scale": 0.125, "inner_val_fraction": 0.0}
SETTINGS: dict[str, dict] = {
    "default": {},
    # -- selection: inner split (default) vs a fixed schedule on all training rows, last epoch
    "fixed": {"inner_val_fraction": 0.0},
    # -- one change at a time
    "ep25": {"epochs": 25},
    "ep30": {"epochs": 30},
    "bs8": {"batch_size": 8},
    "lr1e-2": {"lr": 1e-2},
    "lr6e-3": {"lr": 6e-3},
    "lr1.5e-3": {"lr": 1.5e-3},
    "cosine": {"schedule": "cosine"},
    "wd1e-2": {"weight_decay": 1e-2},
    "drop0": {"dropout": 0.0},
    "drop0.3": {"dropout": 0.3},
    "fc64": {"fc": 64},
    "fc512": {"fc": 512},
    "wm0.25": {"width_mult": 0.25},
    "s0.125": {"input_scale": 0.125},
    "s0.1875": {"input_scale": 0.1875},
    "aug_half": {"augment": {"rotate_deg": 5.0, "shift": 0.025, "zoom": 0.05, "brightness": 0.05,
                             "contrast": 0.10}},
    "aug_none": {"augment": {"rotate_deg": 0.0, "shift": 0.0, "zoom": 0.0, "brightness": 0.0,
                             "contrast": 0.0}},
    # -- round 3: input_scale 0.125 + fixed schedule, then one change at a time
    "r3e40": {**_R3, "epochs": 40},
    "r3e70": {**_R3, "epochs": 70},
    "r3e100": {**_R3, "epochs": 100},
    "r3e70lr5": {**_R3, "epochs": 70, "lr": 5e-3},
    "r3e70wm25": {**_R3, "epochs": 70, "width_mult": 0.25},
    "r3s25e25": {**_R3, "epochs": 25, "input_scale": 0.25},
    "r3e70drop0": {**_R3, "epochs": 70, "dropout": 0.0},
    "r3e70wd1e-3": {**_R3, "epochs": 70, "weight_decay": 1e-3},
    "r3e70inner15": {**_R3, "epochs": 70, "inner_val_fraction": 0.15},
    "r3e70wm25lr5": {**_R3, "epochs": 70, "width_mult": 0.25, "lr": 5e-3},
    # -- the 240-class heads' loss (issue #13), on today's defaults; "default" is cls_ce12 since then
    "cls_mae": {"cls_loss": "mae"},
    "cls_ce6": {"cls_loss": "ce", "cls_sigma": 6.0},
    "cls_ce12": {"cls_loss": "ce", "cls_sigma": 12.0},
    "cls_mae+ce0.05": {"cls_loss": "mae+ce", "cls_sigma": 6.0, "cls_ce_weight": 0.05},
    "cls_mae+ce0.2": {"cls_loss": "mae+ce", "cls_sigma": 6.0, "cls_ce_weight": 0.2},
}

SUBSET_KINDS = ("A-reg", "B-reg", "B-cls", "C-reg")
ALL_KINDS = ("A-reg", "A-cls", "B-reg", "B-cls", "C-reg", "C-cls")


def parse_setting(text: str) -> tuple[str, dict]:
    """A SETTINGS name, or name=JSON overrides (e.g. 'x={"epochs": 40, "batch_size": 8}')."""
    if "=" in text:
        name, spec = text.split("=", 1)
        return name, json.loads(spec)
    if text not in SETTINGS:
        raise SystemExit(f"unknown setting {text!r}; known: {', '.join(SETTINGS)} (or name=JSON)")
    return text, SETTINGS[text]


def trial_list(which: str):
    from boneage.validation import cv

    if which == "subset":
        return [cv.Trial(k, s, 0) for k in SUBSET_KINDS for s in ("F", "M")]
    if which == "subset2":
        return [cv.Trial(k, s, f) for f in (0, 1) for k in SUBSET_KINDS for s in ("F", "M")]
    if which == "cls":
        return [cv.Trial(k, s, f) for k in ("A-cls", "B-cls", "C-cls") for s in ("F", "M") for f in (0, 1)]
    if which == "full":
        return cv.cv_trials(ALL_KINDS, ("F", "M"), 3)
    return [cv.parse_trial(t) for t in which.split(",")]


# -- the worker (one torch thread) ------------------------------------------------------------------

_CACHE: dict = {}


def _init(registered: str, folds_path: str, split_path: str, threads: int):
    import torch

    torch.set_num_threads(threads)
    _CACHE.update(registered=registered, folds_path=folds_path, split_path=split_path)


def _sex_data(male: bool):
    """(rows, bank, ages, fold, decode seconds) of one sex: decoded once per worker; the decode time
    is added to every trial's seconds (the pipeline decodes per trial)."""
    from boneage.validation import cv

    if male not in _CACHE:
        folds = pd.read_parquet(_CACHE["folds_path"])
        test_ids = set(pd.read_csv(_CACHE["split_path"])["id"].astype(str))
        folds = folds[~folds["id"].astype(str).isin(test_ids)]  # never touch the locked test split
        t0 = time.perf_counter()
        rows = cv.read_trial_rows(_CACHE["registered"], folds, male)
        bank, ages, _ = cv.load_bank(rows)
        _CACHE[male] = (rows, bank, ages, rows["fold"].to_numpy(), time.perf_counter() - t0)
    return _CACHE[male]


def run_trial(job: tuple) -> dict:
    from boneage.validation import cv
    from boneage.model.augment import Augment
    from boneage.config import CVConfig
    from boneage.model.networks import model_kind
    from boneage.model.train import fit_zone_model, predict

    setting, overrides, trial_name, seed, watch = job
    trial = cv.parse_trial(trial_name)
    overrides = dict(overrides)
    augment = overrides.pop("augment", None)
    overrides.pop("pooled_cache", None)  # rounds 1-2's bench-only switch: boneage pools once now
    cvc = CVConfig(**{**CVConfig().model_dump(), **overrides})
    rows, bank, ages, fold, decode_s = _sex_data(trial.male)
    from boneage.model import augment as _augment
    _augment._POOLED.clear()  # each trial pools its own bank once, as in the pipeline
    t0 = time.perf_counter()
    cfg = cv.train_config(cvc, trial, seed)
    if augment is not None:
        cfg.augment = Augment(**augment)
    fit_idx, select_idx = cv.inner_split(ages, np.flatnonzero(fold != trial.fold), cvc.inner_val_fraction, cfg.seed)
    scored_idx = np.flatnonzero(fold == trial.fold)
    kind = model_kind(trial.kind, cvc.input_scale)
    res = fit_zone_model(bank, ages, fit_idx, select_idx, kind, cfg, "cpu",
                         watch_idx=scored_idx if watch else None)
    pred = predict(res.model, bank, scored_idx, kind, cfg.eval_batch_size, "cpu", cfg.bf16,
                   cfg.channels_last).numpy()
    seconds = time.perf_counter() - t0
    best = res.state["best"]
    hist = res.history
    out = {
        "setting": setting, "trial": trial.name, "kind": trial.kind, "sex": trial.sex, "fold": trial.fold,
        "oof_mae": float(np.abs(pred - ages[scored_idx]).mean()),
        "best_epoch": int(best["epoch"]), "epochs_run": len(hist), "select_mae": float(best["value"]),
        "train_loss_last": float(hist[-1]["train_loss"]),
        "fit_s": seconds, "decode_s": decode_s, "seconds": seconds + decode_s,
        "n_train": len(fit_idx), "n_select": len(select_idx), "n_val": len(scored_idx),
        "ids": rows["id"].iloc[scored_idx].astype(str).tolist(), "pred": pred.tolist(),
    }
    if watch:  # diagnostic only: what the scored fold's MAE was at every epoch (chose nothing)
        out["watch_mae"] = [float(h["watch_mae"]) for h in hist]
    return out


# -- tables ---------------------------------------------------------------------------------------


def oof_frame(folds: pd.DataFrame, results: list[dict], kinds) -> pd.DataFrame:
    out = folds[["id", "male", "boneage", "fold"]].copy()
    out["id"] = out["id"].astype(str)
    out = out.sort_values("id").reset_index(drop=True)
    pos = pd.Series(np.arange(len(out)), index=out["id"])
    for k in kinds:
        out[k] = np.nan
    for r in results:
        out.loc[pos.reindex(r["ids"]).to_numpy(), r["kind"]] = r["pred"]
    return out


def gd_candidates(n: int = 12, seed: int = 0) -> list[dict]:
    """The Ray Tune ensemble's first (default) config plus n-1 draws from its search space, without Ray
    (the same distributions as boneage.distributed.ray_ensemble.search_space)."""
    from boneage.distributed.ray_ensemble import DEFAULT_CONFIG

    rng = np.random.default_rng(seed)
    out = [dict(DEFAULT_CONFIG)]
    for _ in range(n - 1):
        out.append({"lr": float(np.exp(rng.uniform(np.log(5e-3), np.log(2e-1)))),
                    "steps": int(rng.choice([200, 500, 1000])), "loss": str(rng.choice(["l1", "huber"])),
                    "huber_delta": float(rng.uniform(1.0, 12.0)),
                    "shrink": float(np.exp(rng.uniform(np.log(1e-5), np.log(1.0)))),
                    "init": str(rng.choice(["equal", "best"]))})
    return out


def gd_ensembles(oof: pd.DataFrame, kinds, extra: dict, setting: str) -> dict:
    """The gradient fit the Tune ensemble ships: its default config cross-validated (ens_gd), and a
    12-config random search chosen per outer fold by inner CV (ens_gd_nested: what ray_ensemble's
    nested cv_mae computes), both honest (boneage.validation.ensemble.cross_validated / nested_cross_validated)."""
    from boneage.validation import ensemble
    from boneage.distributed.ray_ensemble import gd_fit

    oof = oof.reset_index(drop=True)
    y = oof["boneage"].to_numpy(float)
    cands = gd_candidates()
    fits = [gd_fit(c) for c in cands]
    pred = ensemble.cross_validated(oof, kinds, fits[0])
    nested, chosen = ensemble.nested_cross_validated(oof, kinds, fits)
    plain = [ensemble.mae(ensemble.cross_validated(oof, kinds, f), y) for f in fits]
    extra[(setting, "gd")] = {"default_config": cands[0], "cv_mae": ensemble.mae_by_sex(oof, pred),
                              "nested_cv_mae": ensemble.mae_by_sex(oof, nested),
                              "chosen_per_fold": {f: cands[i] for f, i in chosen.items()},
                              "best_plain_cv_mae (optimistic)": float(np.min(plain))}
    return {"ens_gd": ensemble.mae(pred, y), "ens_gd_nested": ensemble.mae(nested, y)}


def summarise(folds, results: list[dict], settings: list[str], full: bool, ref: str = "default"
              ) -> tuple[pd.DataFrame, dict]:
    from boneage.validation import cv, ensemble

    df = pd.DataFrame([{k: v for k, v in r.items() if k not in ("ids", "pred", "watch_mae")} for r in results])
    base = df[df.setting == ref].set_index("trial")["seconds"]
    df["time_ratio"] = df["seconds"] / df["trial"].map(base) if len(base) else np.nan
    lines, extra = [], {}
    kinds = [k for k in ALL_KINDS if k in set(df.kind)]
    for s in settings:
        d = df[df.setting == s]
        row = {"setting": s}
        # MAE per kind over all scored images (image-weighted, as cv.summary), both sexes
        res_s = [r for r in results if r["setting"] == s]
        oof = oof_frame(folds, res_s, kinds)
        scored = oof[kinds].notna().any(axis=1)
        for k in kinds:
            m = oof[k].notna()
            row[k] = float((oof.loc[m, k] - oof.loc[m, "boneage"]).abs().mean()) if m.any() else np.nan
        row["mean_kind"] = float(np.nanmean([row[k] for k in kinds]))
        row["trial_s_med"] = float(d["seconds"].median())
        row["trial_s_max"] = float(d["seconds"].max())
        row["time_ratio"] = float(d["time_ratio"].median())
        row["best_ep_med"] = float(d["best_epoch"].median())
        row["train_loss"] = float(d["train_loss_last"].median())
        if full:
            med = cv.median_baseline(oof)
            row["median_base"] = float(np.abs(med - oof["boneage"]).mean())
            for method in ("lad", "nnls"):
                rec, _ = ensemble.fit_ensemble(oof[scored], kinds, method)
                row[f"ens_{method}"] = rec["cv_mae"]["all"]
                extra[(s, method)] = rec
            row.update(gd_ensembles(oof[scored], kinds, extra, s))
        lines.append(row)
    return pd.DataFrame(lines), extra


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--registered", required=True)
    p.add_argument("--split", required=True, help="locked test split CSV (its ids are excluded)")
    p.add_argument("--folds", required=True)
    p.add_argument("--settings", default="default,fixed", help="comma list of names or ;-separated name=JSON")
    p.add_argument("--trials", default="subset")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0, help="the run's seed (DataConfig.seed)")
    p.add_argument("--watch", action="store_true", help="diagnostic: record the scored fold's MAE per epoch")
    p.add_argument("--no-default", action="store_true",
                   help="do not add the default setting (no time ratio then; e.g. a long full run)")
    p.add_argument("--json", default=None, help="write results (per trial and the table) here")
    p.add_argument("--ref", default="default", help="the setting the time ratio is relative to")
    p.add_argument("--reuse", default=None,
                   help="a results JSON of an earlier run: its trials of these settings are taken, not rerun "
                        "(the same code and seed give the same predictions)")
    p.add_argument("--skip", default="", help="comma list of setting/trial pairs not to run (done elsewhere)")
    args = p.parse_args(argv)

    specs = args.settings.split(";") if "=" in args.settings else args.settings.split(",")
    settings = dict(parse_setting(s.strip()) for s in specs if s.strip())
    if args.ref not in settings and not args.no_default:
        settings = {args.ref: SETTINGS[args.ref], **settings}
    trials = trial_list(args.trials)
    folds = pd.read_parquet(args.folds)
    test_ids = set(pd.read_csv(args.split)["id"].astype(str))
    folds = folds[~folds["id"].astype(str).isin(test_ids)].reset_index(drop=True)
    # Interleave settings trial by trial, so every setting sees the same machine load.
    skip = {x.strip() for x in args.skip.split(",") if x.strip()}
    reused = []
    if args.reuse:
        names = {t.name for t in trials}
        reused = [r for r in json.loads(Path(args.reuse).read_text())["results"]
                  if r["setting"] in settings and r["trial"] in names]
        for r in reused:
            r["reused_from"] = args.reuse
        skip |= {f"{r['setting']}/{r['trial']}" for r in reused}
    jobs = [(s, o, t.name, args.seed, args.watch) for t in trials for s, o in settings.items()
            if f"{s}/{t.name}" not in skip]
    print(f"{len(jobs)} trials ({len(trials)} x {len(settings)} settings) on {args.workers} workers", flush=True)
    t0 = time.time()
    ctx = mp.get_context("spawn")
    results = list(reused)
    with ctx.Pool(args.workers, _init, (args.registered, args.folds, args.split, args.threads)) as pool:
        for i, r in enumerate(pool.imap_unordered(run_trial, jobs), 1):
            results.append(r)
            print(f"[{i}/{len(jobs)} {time.time() - t0:5.0f}s] {r['setting']:>12} {r['trial']:<15} "
                  f"oof {r['oof_mae']:5.1f}  best ep {r['best_epoch']:2d}/{r['epochs_run']:2d}  "
                  f"{r['seconds']:5.1f}s", flush=True)
    table, extra = summarise(folds, results, list(settings), args.trials == "full", args.ref)
    pd.set_option("display.width", 250)
    print(table.round(2).to_string(index=False))
    print(f"wall {time.time() - t0:.0f} s; load {os.getloadavg()}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "settings": settings, "trials": args.trials, "workers": args.workers, "threads": args.threads,
            "seed": args.seed, "host": platform.node(), "cpus": os.cpu_count(),
            "wall_s": time.time() - t0, "table": table.to_dict(orient="records"),
            "ensembles": {f"{s}/{m}": rec for (s, m), rec in extra.items()},
            "results": results,
        }, indent=1, default=float))


if __name__ == "__main__":
    sys.exit(main())
