"""Training and inference with torch alone: the data stay on the device, crops are cut there.

`fit_zone_model` / `fit_keypoint_model` train one model and call `report(epoch, metrics, state)`
after every epoch; `state` holds everything needed to resume (pass it back as `resume_state`) and
to score (`model_from_state`). The Ray wrapper turns each report into a ray.train.report with a
checkpoint; it must save `state` before it returns, since the tensors are live.
"""

from __future__ import annotations

import functools
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from boneage.model.choices import CLS_LOSSES, SCHEDULES
from boneage.model.augment import Augment, ZoneSampler, keypoint_sampler, points_to_output, tta_views
from boneage.registration.frame import FRAME_H, FRAME_W
from boneage.model.networks import KeypointNet, ModelKind, build_from_spec, expected_age, to_months, to_scaled


@dataclass
class TrainConfig:
    epochs: int = 50
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "onecycle"  # one of SCHEDULES; plateau watches the validation metric
    patience: int = 10  # stop after this many epochs without improvement; 0 = never
    width_mult: float = 1.0
    fc: int | None = None  # None: the seed's (2048 zones, 512 key points)
    dropout: float = 0.5
    augment: Augment | None = None  # None: the default for the model (zones / key points)
    # The 240-class heads' loss: "mae" (the seed's: MAE of the expected age), "ce" (cross-entropy
    # against a Gaussian around the label, `cls_sigma` months wide: a target that says which
    # neighbouring months are nearly right, so the softmax never collapses onto one wrong class where
    # the expectation's gradient vanishes) or "mae+ce" (both, the CE weighted by `cls_ce_weight`).
    # Regression heads ignore these. docs/benchmarks.md compares them.
    cls_loss: str = "ce"
    cls_sigma: float = 12.0
    cls_ce_weight: float = 0.05
    eval_batch_size: int = 256
    bf16: bool = True  # bf16 and compile only take effect on CUDA
    channels_last: bool = True  # on CPU and CUDA (see CHANNELS_LAST)
    compile: bool = False
    seed: int = 0


@dataclass
class FitResult:
    model: torch.nn.Module  # best epoch's weights, eval mode
    val_idx: np.ndarray
    val_pred: np.ndarray  # out-of-fold predictions at the best epoch (months, or key points)
    metrics: dict  # the best epoch's
    history: list[dict]
    metric: str  # the name of the monitored metric (lower is better)
    state: dict  # the last epoch's resume state


# -- device helpers -------------------------------------------------------------------------------


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"


# CHANNELS_LAST: the nets run in the channels_last (NHWC) memory format on CPU as on CUDA. On CPU its
# convolutions and max pooling are vectorised where NCHW's max pooling is not: on rsna-dev a training
# epoch of the zone nets is 1.2-1.4x faster and a prediction 1.7-2.9x, one thread on an idle machine
# (bench/channels_last.py, docs/benchmarks.md). bf16 and compile stay CUDA-only: on CPU both are slower here.


def _autocast(device, cfg_bf16: bool):
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg_bf16 and _cuda(device))


def _as_index(idx, device) -> torch.Tensor:
    if isinstance(idx, torch.Tensor):
        return idx.to(device=device, dtype=torch.long)
    return torch.as_tensor(np.asarray(idx), dtype=torch.long, device=device)


def _prepare(model, cfg: TrainConfig, device):
    """Model on the device; returns (model, the callable the step runs: compiled or not)."""
    model = model.to(device)
    if _cuda(device):
        torch.backends.cudnn.benchmark = True  # fixed shapes: let cuDNN pick the fastest convs
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    # dynamic=False: every kind has fixed shapes; without it a second model in the same process
    # (same forward code, new shapes) recompiles with symbolic shapes: slower to build and run.
    run = torch.compile(model, dynamic=False) if (_cuda(device) and cfg.compile) else model
    return model, run


def _to_input(x, device, cfg_channels_last: bool):
    x = x.to(device, non_blocking=True)
    if cfg_channels_last and x.dim() == 4:  # images; the format has no meaning for other inputs
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def _batches(idx: torch.Tensor, batch_size: int):
    """Fixed-size chunks (the last padded by repeats, so a compiled model sees one shape)."""
    n = idx.numel()
    for s in range(0, n, batch_size):
        chunk = idx[s : s + batch_size]
        if n > batch_size and chunk.numel() < batch_size:
            chunk = torch.cat([chunk, chunk[-1:].expand(batch_size - chunk.numel())])
        yield chunk, min(batch_size, n - s)


# -- inference ------------------------------------------------------------------------------------


def _per_image(male, n_images: int, device) -> torch.Tensor | None:
    """`male` (None, one bool for every image, or one per image of the bank) as a (n_images,) tensor on
    `device`, or None."""
    if male is None:
        return None
    if isinstance(male, (bool, np.bool_)):
        return torch.full((n_images,), bool(male), device=device)
    male = torch.as_tensor(np.asarray(male, dtype=bool) if not isinstance(male, torch.Tensor) else male,
                           device=device)
    if male.shape != (n_images,):
        raise ValueError(f"male must be one bool or one per image ({n_images}), got shape {tuple(male.shape)}")
    return male


@torch.no_grad()
def _outputs(model, sampler, images, idx, batch_size, device, bf16, channels_last, shape=(), views=1,
             male=None) -> torch.Tensor:
    """The network's output (B, *shape) for sampler(images, idx), in eval mode and in fixed-size batches;
    inputs are cut where `images` live. views: test-time augmentation, the mean output over the first
    `views` fixed jitters of the crop (augment.TTA_VIEWS; 1: the plain crop, as without TTA). male: the
    images' sex for a pooled model (one bool, or one per image of `images`); None for any other."""
    device = torch.device(device or next(model.parameters()).device)
    idx = _as_index(idx, images.device)
    male = _per_image(male, len(images), images.device)
    jitters = tta_views(views)
    model.eval()
    out = []
    for chunk, n in _batches(idx, batch_size):
        kwargs = {} if male is None else {"male": male[chunk].to(device)}
        if views == 1:  # the plain crop, exactly as without test-time augmentation
            x = _to_input(sampler(images, chunk), device, channels_last)
            with _autocast(device, bf16):
                out.append(model(x, **kwargs).float()[:n])
            continue
        total = None
        for view in jitters:
            x = _to_input(sampler(images, chunk, view=view), device, channels_last)
            with _autocast(device, bf16):
                y = model(x, **kwargs).float()[:n]
            total = y if total is None else total + y
        out.append(total / len(jitters))
    return torch.cat(out) if out else torch.zeros(0, *shape, device=device)


def _zone_outputs(model, bank, idx, kind: ModelKind, batch_size, device, bf16, channels_last, views=1,
                  male=None) -> torch.Tensor:
    """The network's output (B,) for bank[idx]; crops are cut where the bank lives."""
    return _outputs(model, ZoneSampler(kind.box, kind.input_size), bank, idx, batch_size, device, bf16,
                    channels_last, views=views, male=male)


def predict(model, bank, idx, kind: ModelKind, batch_size=256, device=None, bf16=True,
            channels_last=True, views=1, male=None) -> torch.Tensor:
    """Bone age in months for bank[idx]; crops are cut where the bank lives. views: test-time
    augmentation (mean over that many fixed jitters of the crop; 1: none). male: the sex input of a
    pooled model (one bool, or one per image of the bank); None for a per-sex model. A classification
    head's views are averaged as expected ages (linear in months), not as logits."""
    return to_months(_zone_outputs(model, bank, idx, kind, batch_size, device, bf16, channels_last, views, male))


def predict_p_male(model, bank, idx, kind: ModelKind, batch_size=256, device=None, bf16=True,
                   channels_last=True, views=1) -> torch.Tensor:
    """P(male) for bank[idx] from a sex classifier (a "sex" head); with views > 1 the sigmoid of the
    views' mean logit."""
    return torch.sigmoid(_zone_outputs(model, bank, idx, kind, batch_size, device, bf16, channels_last, views))


def predict_keypoints(model, images, idx, batch_size=256, device=None, bf16=True,
                      channels_last=True) -> torch.Tensor:
    """(n, 3, 2) key points, (x, y) in [0, 1] of the image."""
    return _outputs(model, keypoint_sampler(out_size=model.input_size), images, idx, batch_size, device, bf16,
                    channels_last, shape=(3, 2))


def model_from_state(state: dict, which="best") -> torch.nn.Module:
    """The network a training state describes, with its best (or last) weights, on the CPU, in the
    channels_last memory format that predict() feeds it by default (see CHANNELS_LAST)."""
    model = build_from_spec(state["spec"])
    model.load_state_dict(state["best"]["model"] if which == "best" else state["model"])
    return model.to(memory_format=torch.channels_last).eval()


# -- the training loop ----------------------------------------------------------------------------


def _scheduler(opt, cfg: TrainConfig, steps_per_epoch: int):
    total = cfg.epochs * steps_per_epoch
    if cfg.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.5, patience=max(1, cfg.patience // 3))
    if cfg.schedule == "constant":
        return None
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")


def _rng_state(device) -> dict:
    s = {"cpu": torch.get_rng_state()}
    if _cuda(device):
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict, device):
    torch.set_rng_state(s["cpu"])
    if "cuda" in s and _cuda(device):
        torch.cuda.set_rng_state(s["cuda"], device)


def _clone(sd: dict) -> dict:
    return {k: v.detach().clone() for k, v in sd.items()}


def _fit(model, spec, cfg, device, train_idx, make_batch, loss_fn, evaluate, metric, train_scale,
         report, resume_state, forward_kwargs=None, batch_inputs=None) -> FitResult:
    """The loop both model families share.

    make_batch(idx, gen) -> (x, y); loss_fn(pred, y) -> scalar; evaluate(run) -> (metrics, preds);
    `metric` (lower is better) picks the best epoch and drives plateau and early stopping. When the
    evaluation has no `metric` (no selection split: a fixed schedule), nothing is chosen: the last
    epoch is the result, and neither early stopping nor plateau steps apply.
    `train_scale` turns the mean training loss into the reported `train_loss`; `forward_kwargs` go
    to the model's forward in training steps only (e.g. logits=True for a classification head);
    `batch_inputs(idx)` -> more of them for that batch's images (a pooled model's `male`).
    """
    model, run = _prepare(model, cfg, device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bs = min(cfg.batch_size, train_idx.numel())
    steps = max(1, train_idx.numel() // bs)  # full batches only: one shape for compile and BN
    sched = _scheduler(opt, cfg, steps)
    per_step = sched is not None and cfg.schedule != "plateau"
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    epoch0, history, bad = 0, [], 0
    # One-cycle warms the LR up for its first 30% (torch's pct_start): the validation MAE often gets
    # worse on the way up, so epochs before the peak do not count towards early stopping (else a
    # model is stopped before the LR ever comes down; seen on real radiographs, docs/benchmarks.md).
    warmup_epochs = math.ceil(0.3 * cfg.epochs) if cfg.schedule == "onecycle" else 0
    best = {"value": float("inf"), "epoch": -1, "model": _clone(model.state_dict()), "pred": None, "metrics": {}}
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        opt.load_state_dict(resume_state["optimizer"])
        if sched is not None:
            sched.load_state_dict(resume_state["scheduler"])
        gen.set_state(resume_state["generator"].cpu())
        _set_rng_state(resume_state["rng"], device)
        epoch0, bad = resume_state["epoch"] + 1, resume_state["bad_epochs"]
        history = list(resume_state["history"])
        b = resume_state["best"]
        best = {"value": b["value"], "epoch": b["epoch"], "model": _clone(b["model"]), "pred": b["pred"],
                "metrics": b["metrics"]}
    state = resume_state

    for epoch in range(epoch0, cfg.epochs):
        if cfg.patience and bad >= cfg.patience:
            break
        t0 = time.perf_counter()
        model.train()
        perm = train_idx[torch.randperm(train_idx.numel(), generator=gen, device=device)]
        loss_sum = torch.zeros((), device=device)  # summed on the device: no sync per step
        for s in range(steps):
            batch = perm[s * bs : (s + 1) * bs]
            x, y = make_batch(batch, gen)
            kwargs = {**(forward_kwargs or {}), **(batch_inputs(batch) if batch_inputs else {})}
            with _autocast(device, cfg.bf16):
                pred = run(_to_input(x, device, cfg.channels_last), **kwargs)
            loss = loss_fn(pred.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if per_step:
                sched.step()
            loss_sum += loss.detach()
        train_loss = loss_sum.item() / steps * train_scale
        train_s = time.perf_counter() - t0
        metrics, preds = evaluate(run)
        selecting = metric in metrics
        if cfg.schedule == "plateau":
            if not selecting:
                raise ValueError("the plateau schedule needs a selection split (it steps on its metric)")
            sched.step(metrics[metric])
        metrics = {"epoch": epoch, "train_loss": train_loss, **metrics, "lr": opt.param_groups[0]["lr"],
                   "train_img_per_s": steps * bs / train_s, "epoch_s": time.perf_counter() - t0}
        if not selecting or metrics[metric] < best["value"]:  # a fixed schedule keeps the last epoch
            best = {"value": metrics.get(metric, float("nan")), "epoch": epoch,
                    "model": _clone(model.state_dict()),
                    "pred": None if preds is None else preds.detach().cpu(), "metrics": metrics}
            bad = 0
        elif epoch >= warmup_epochs:
            bad += 1
        history.append(metrics)
        state = {
            "spec": spec, "config": asdict(cfg), "epoch": epoch, "model": model.state_dict(),
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched else None,
            "generator": gen.get_state(), "rng": _rng_state(device), "bad_epochs": bad,
            "history": history, "best": best,
        }
        if report is not None:
            report(epoch, metrics, state)

    model.load_state_dict(best["model"])
    model.eval()
    pred = best["pred"].numpy() if best["pred"] is not None else np.zeros(0)
    return FitResult(model, np.zeros(0), pred, best["metrics"], history, metric, state)


def _seeded(cfg: TrainConfig, device):
    """Seed the global RNGs (init, dropout) without leaking that into the caller."""
    devices = [torch.device(device).index or 0] if _cuda(device) else []
    return torch.random.fork_rng(devices=devices)


def fit_zone_model(bank, ages, train_idx, val_idx, kind: ModelKind, cfg: TrainConfig, device="cpu",
                   report: Callable | None = None, resume_state: dict | None = None,
                   watch_idx=None, male=None) -> FitResult:
    """Train one zone model on bank[train_idx] (uint8 (N, 1, H, W), moved to `device` once).

    ages: (N,) months. val_idx: the selection split, whose MAE picks the best epoch and drives early
    stopping; empty for a fixed schedule (the last epoch is the model). Returns the chosen model and
    its predictions for val_idx (months). watch_idx (a diagnostic, e.g. the scored fold): its MAE is
    recorded every epoch as `watch_mae` and never chooses anything. male: (N,) bool, each image's sex:
    a pooled model (cv.sex_models "pooled"), one network for both sexes with the sex as an input;
    None: the images are one sex's and the model takes no sex.
    """
    device = torch.device(device)
    bank = bank.to(device)
    ages = torch.as_tensor(np.asarray(ages), dtype=torch.float32, device=device)
    train_idx, val_idx = _as_index(train_idx, device), _as_index(val_idx, device)
    watch_idx = None if watch_idx is None else _as_index(watch_idx, device)
    sex = _per_image(male, len(bank), device)
    fc = cfg.fc or 2048
    spec = {"kind": kind.name, "input_scale": kind.input_scale, "width_mult": cfg.width_mult,
            "fc": fc, "dropout": cfg.dropout}
    if sex is not None:
        spec["sex_input"] = True  # per-sex specs stay as they were (older bundles read alike)
    sampler = ZoneSampler(kind.box, kind.input_size, cfg.augment or Augment())

    def make_batch(idx, gen):
        return sampler(bank, idx, gen, train=True), to_scaled(ages[idx])

    def mae(pred, y):
        return (pred - y).abs().mean()

    def evaluate(run):
        metrics, pred = {}, None
        if val_idx.numel():
            pred = predict(run, bank, val_idx, kind, cfg.eval_batch_size, device, cfg.bf16, cfg.channels_last,
                           male=sex)
            metrics["val_mae"] = (pred - ages[val_idx]).abs().mean().item()
        if watch_idx is not None and watch_idx.numel():
            watched = predict(run, bank, watch_idx, kind, cfg.eval_batch_size, device, cfg.bf16,
                              cfg.channels_last, male=sex)
            metrics["watch_mae"] = (watched - ages[watch_idx]).abs().mean().item()
        return metrics, pred

    with _seeded(cfg, device):
        torch.manual_seed(cfg.seed)
        model = kind.build(cfg.width_mult, fc, cfg.dropout, sex_input=sex is not None)
        loss_fn, kwargs = mae, None
        if kind.head == "cls" and cfg.cls_loss != "mae":
            loss_fn, kwargs = class_loss(model, cfg), {"logits": True}
        res = _fit(model, spec, cfg, device, train_idx, make_batch, loss_fn, evaluate, "val_mae", 120.0,
                   report, resume_state, kwargs, None if sex is None else (lambda idx: {"male": sex[idx]}))
    res.val_idx = val_idx.cpu().numpy()
    return res


def fit_sex_model(bank, male, train_idx, val_idx, kind: ModelKind, cfg: TrainConfig, device="cpu",
                  report: Callable | None = None, resume_state: dict | None = None) -> FitResult:
    """Train a sex classifier (a kind with the "sex" head) on bank[train_idx]; male: (N,) bool.

    Binary cross-entropy on the logit of P(male); the selection split's cross-entropy (`val_bce`)
    picks the epoch (empty val_idx: a fixed schedule). Returns the chosen model and P(male) for val_idx.
    Same zone crops and augmentation as the bone age models of that zone.
    """
    if kind.head != "sex":
        raise ValueError(f"fit_sex_model trains a sex classifier (e.g. 'A-sex'), not {kind.name!r}")
    device = torch.device(device)
    bank = bank.to(device)
    target = torch.as_tensor(np.asarray(male, dtype=np.float32), device=device)
    train_idx, val_idx = _as_index(train_idx, device), _as_index(val_idx, device)
    fc = cfg.fc or 2048
    spec = {"kind": kind.name, "input_scale": kind.input_scale, "width_mult": cfg.width_mult,
            "fc": fc, "dropout": cfg.dropout}
    sampler = ZoneSampler(kind.box, kind.input_size, cfg.augment or Augment())

    def make_batch(idx, gen):
        return sampler(bank, idx, gen, train=True), target[idx]

    def evaluate(run):
        if not val_idx.numel():
            return {}, None
        p = predict_p_male(run, bank, val_idx, kind, cfg.eval_batch_size, device, cfg.bf16, cfg.channels_last)
        y = target[val_idx]
        bce = F.binary_cross_entropy(p.clamp(1e-6, 1 - 1e-6), y).item()
        return {"val_bce": bce, "val_accuracy": ((p > 0.5).float() == y).float().mean().item()}, p

    with _seeded(cfg, device):
        torch.manual_seed(cfg.seed)
        model = kind.build(cfg.width_mult, fc, cfg.dropout)
        res = _fit(model, spec, cfg, device, train_idx, make_batch, F.binary_cross_entropy_with_logits,
                   evaluate, "val_bce", 1.0, report, resume_state)
    res.val_idx = val_idx.cpu().numpy()
    return res


def class_loss(model, cfg: TrainConfig) -> Callable:
    """loss(logits, scaled ages) of a 240-class head (cfg.cls_loss; see TrainConfig)."""
    if cfg.cls_loss not in CLS_LOSSES:
        raise ValueError(f"cls_loss must be one of {CLS_LOSSES}, got {cfg.cls_loss!r}")
    n_classes = model.out.out_features

    def loss(logits, y):
        with torch.autocast(logits.device.type, enabled=False):  # the loss in fp32 under any autocast
            logp = F.log_softmax(logits.float(), dim=1)
            ce = -(class_target(to_months(y.float()), cfg.cls_sigma, n_classes) * logp).sum(1).mean()
            if cfg.cls_loss == "ce":
                return ce
            expected = expected_age(logits, model.class_ages)
            return (expected - y).abs().mean() + cfg.cls_ce_weight * ce

    return loss


# The label grid of the target centres' table (months): centres in between are interpolated linearly.
_CENTRE_STEP = 0.125


@functools.lru_cache(maxsize=8)
def _target_centres(sigma: float, n_classes: int) -> np.ndarray:
    """Centre c of the discrete Gaussian exp(-(k - c)^2 / 2 sigma^2) on k = 0..n_classes-1 whose mean is
    the label, for labels 0, _CENTRE_STEP, ..., n_classes - 1 (bisection, float64).

    Cut at 0 and n_classes-1 and renormalised, a Gaussian centred on the label has its mean pulled towards
    the middle (+6 months at a label of 6, -4 at 228 with sigma 12): the CE loss, minimised when the
    softmax equals the target, would then teach the heads a biased expectation at the ends. Moving the
    centre outwards until the renormalised mean is the label keeps the Gaussian's shape (a label at the
    very end gets a one-sided, steeper target). The mean is increasing in c (an exponential family in c),
    so bisection finds it; c far outside the support puts nearly all the mass on the end class."""
    labels = np.arange(0.0, n_classes - 1 + _CENTRE_STEP / 2, _CENTRE_STEP)
    k = np.arange(n_classes, dtype=np.float64)
    reach = 20.0 * sigma**2 + 1.0  # at c = -reach the mass on class 1 is ~exp(-20) of class 0's
    lo, hi = np.full(len(labels), -reach), np.full(len(labels), n_classes - 1 + reach)
    for _ in range(80):
        mid = (lo + hi) / 2
        logits = -(k[None, :] - mid[:, None]) ** 2 / (2 * sigma**2)
        p = np.exp(logits - logits.max(1, keepdims=True))
        mean = (p @ k) / p.sum(1)
        below = mean < labels
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return (lo + hi) / 2


def class_target(months: torch.Tensor, sigma: float, n_classes: int) -> torch.Tensor:
    """(B, n_classes) target distribution of the 'ce' loss for labels in months: a Gaussian `sigma` wide
    on the classes, renormalised on them, with its centre moved so that its mean is the label (see
    _target_centres). Labels beyond the last class (up to 240 months) get the last class's target."""
    centres = torch.as_tensor(_target_centres(float(sigma), int(n_classes)), dtype=torch.float32,
                              device=months.device)
    at = months.float().clamp(0, n_classes - 1) / _CENTRE_STEP
    below = at.floor().long().clamp(max=len(centres) - 2)
    centre = torch.lerp(centres[below], centres[below + 1], at - below)
    k = torch.arange(n_classes, dtype=torch.float32, device=months.device)
    return F.softmax(-(k[None, :] - centre[:, None]) ** 2 / (2 * sigma**2), dim=1)


def fit_keypoint_model(images, keypoints, train_idx, val_idx, cfg: TrainConfig, device="cpu",
                       report: Callable | None = None, resume_state: dict | None = None) -> FitResult:
    """Train the key point net. images: uint8 (N, 1, H, W) with the frame's aspect (130x100 or a
    1040x800 bank); keypoints: (N, 3, 2) (x, y) in [0, 1]. Augmentation moves image and points
    by the same affine. Metric: mean point distance in frame pixels (1600x2080)."""
    device = torch.device(device)
    images = images.to(device)
    points = torch.as_tensor(np.asarray(keypoints), dtype=torch.float32, device=device)
    train_idx, val_idx = _as_index(train_idx, device), _as_index(val_idx, device)
    if val_idx.numel() == 0:
        raise ValueError("val_idx is empty: the loop selects epochs on validation error")
    fc = cfg.fc or 512
    input_size = (FRAME_H // 16, FRAME_W // 16)
    spec = {"kind": "keypoints", "input_size": input_size, "width_mult": cfg.width_mult, "fc": fc}
    sampler = keypoint_sampler(cfg.augment, input_size)
    frame_px = torch.tensor([FRAME_W, FRAME_H], dtype=torch.float32, device=device)

    def make_batch(idx, gen):
        x, theta = sampler.sample(images, idx, gen, train=True)
        return x, points_to_output(theta, points[idx])

    def evaluate(run):
        pred = predict_keypoints(run, images, val_idx, cfg.eval_batch_size, device, cfg.bf16,
                                 cfg.channels_last)
        err = pred - points[val_idx]
        dist = (err * frame_px).norm(dim=-1).mean().item()
        return {"val_mse": err.pow(2).mean().item(), "val_dist_px": dist}, pred

    with _seeded(cfg, device):
        torch.manual_seed(cfg.seed)
        model = KeypointNet(input_size, cfg.width_mult, fc)
        res = _fit(model, spec, cfg, device, train_idx, make_batch, F.mse_loss, evaluate,
                   "val_dist_px", 1.0, report, resume_state)
    res.val_idx = val_idx.cpu().numpy()
    return res
