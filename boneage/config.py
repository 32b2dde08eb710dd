"""One typed configuration for every stage. Defaults are the embedded CPU run (synthetic data, minutes on a
laptop); YAML presets in configs/ override them (configs/rsna.yaml: the seed's RSNA-scale settings), and
command-line flags override the YAML. The resolved configuration is saved next to every artefact."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from boneage.errors import MissingInput, UserError


@dataclass
class DataConfig:
    images: str | None = None  # folder, s3:// prefix, or .txt list of URIs; None = make synthetic radiographs
    labels: str | None = None  # RSNA-style label CSV (any of the three RSNA variants)
    keypoints: str | None = None  # key point annotations (VIA CSV/JSON or plain CSV), optional
    # The locked test split: set aside before anything is fit, scored once at the end by the shipped
    # bundle through `boneage score`'s code path. A fraction of the labelled images (stratified by sex
    # and age, fixed by seed), or an official test set (test_images + test_labels; then no fraction).
    test_fraction: float = 0.1
    test_images: str | None = None
    test_labels: str | None = None
    storage_options: dict[str, Any] = field(default_factory=dict)  # fsspec options for s3:// (endpoint, keys)
    # The embedded default: enough synthetic hands for every fold of both sexes to see all ages, at a
    # size a CPU registers in well under a second each.
    synthetic_n: int = 240
    synthetic_size: tuple[int, int] = (640, 480)  # (height, width); real scans are ~2044x1514
    seed: int = 0


@dataclass
class PreprocessConfig:
    # CPU work is cut into batches this size: large enough to amortise Ray task overhead, small enough
    # that a batch of full-resolution images (~3 MB each, several copies in flight) stays far below 1 GB.
    batch_size: int = 8
    qa_sheet_size: int = 64  # registered images on the QA contact sheet
    # Ray resources of the preparation: each CPU task (decode, mask, register) and each actor of the
    # key point model and of scoring. Half a CPU for an actor: a request unlike the tasks' keeps Ray
    # Data from fusing the CPU stages into the (few) actors, and on CPU torch uses what tasks leave idle.
    cpus_per_task: float = 1.0
    cpus_per_actor: float = 0.5
    # Each parquet write of a scored (boneage score) or registered (preparation) block. Small, so that a
    # write fits beside the busy stages at once: at Ray Data's default (1 CPU) a 2-CPU node queued every
    # scored block until scoring was over (1,300 rows scored, none written), and a crash lost them all.
    cpus_per_write: float = 0.1


@dataclass
class KeypointConfig:
    # "model": the key point CNN (trained here when no `model` is given), with the geometric estimate
    # from the hand mask as fallback where the model's registration fails QA; "geometric": no CNN.
    source: str = "model"
    model: str | None = None  # a trained key point model (.pt, local or s3://); None = train one
    # Training: the seed's VGG-like net (blocks 64-128-256, 2 FC of 512) on the image reduced to 130x100.
    epochs: int = 25  # on a CPU ~1 min for the embedded set at width 0.25; the geometric estimate backs it up
    batch_size: int = 32
    lr: float = 2e-3
    # A quarter of the seed's widths on a CPU (rsna.yaml: 1.0): on the embedded set it trains 3-4x faster
    # than half (60 vs 200-275 s) with the same held-out key point error (docs/benchmarks.md).
    width_mult: float = 0.25
    patience: int = 10
    val_fraction: float = 0.15
    # Images without annotations join training with their geometric key points as pseudo-labels when
    # the geometric estimate is at least this confident.
    pseudo_label_confidence: float = 0.8
    max_training_images: int = 3000
    use_gpu: bool = False
    # Ray Train's local mode: on CPU the training runs in the driver (no worker to start, no ~100 MB
    # checkpoint per epoch); None: local unless use_gpu (a GPU worker checkpoints and can resume).
    local_train: bool | None = None
    actors: int = 1  # prediction actor pool size
    # CPUs of the training worker (Ray sizes torch's threads by them); None: a node's CPUs on CPU, one
    # with a GPU (the data are on the device).
    cpus_per_worker: float | None = None
    gpus_per_actor: float = 0.0  # >0 on a GPU cluster: the net is tiny, a fraction of a GPU suffices


@dataclass
class CVConfig:
    """k-fold CV of the zone models: one Ray Tune trial per (kind, sex, fold), each a Ray Train run.

    The defaults are the embedded CPU run (240 synthetic images, 2 cores, minutes): small inputs, thin
    nets, few epochs. configs/rsna.yaml holds the seed's settings at RSNA scale on GPUs."""

    # 3 folds: 240 synthetic images leave ~80 per sex to train each model and ~40 to score; fewer
    # trials (36) than k=5 (60), and the Ray Train start-up per trial dominates tiny trainings.
    k: int = 3
    kinds: tuple[str, ...] = ("A-reg", "A-cls", "B-reg", "B-cls", "C-reg", "C-cls")  # zone x head: all 6
    sexes: tuple[str, ...] = ("F", "M")  # a per-sex model per kind: 12 model kinds in all
    # The sex classifier (P(male), for images of unknown sex at scoring): a kind of its own on one zone,
    # trained on both sexes pooled in the same folds and Tune run (k more trials); never in the
    # ensemble. None: no sex classifier (an image of unknown sex gets the mean of both sexes' readings).
    sex_kind: str | None = "A-sex"
    # Inputs at 1/8 of the seed's sizes (zone A 62x47) and a quarter of its widths (8-16-32-32-64-96):
    # on the embedded set, trained for 70 epochs, this beat 1/4 size at the epochs that fit the same
    # time (subset mean 13.7 vs 25 months, docs/benchmarks.md); a CPU epoch of ~77 images is ~0.2 s.
    input_scale: float = 0.125
    width_mult: float = 0.25
    fc: int = 256  # the seed's 2048 would be ~all of the parameters at this size
    # The seed's 0.5 starves a net this thin: on the embedded set, 0.1 reached 17-22 months validation
    # MAE in 20 epochs where 0.5 stayed near the median's ~38 (A-reg, fold 0 of the girls).
    dropout: float = 0.1
    # ~5 steps an epoch: the models underfit at 15-40 epochs (70: 16.0 months on the subset, 40: 20.4,
    # 15: ~29); 70 is what fits the 10-minute embedded run on 2 cores.
    epochs: int = 70
    batch_size: int = 16  # ~5 steps an epoch on ~80 images: BN still sees a fair batch
    lr: float = 3e-3  # the one-cycle peak; 1e-3 had not left the median after 10 epochs, 1e-2 diverged
    weight_decay: float = 1e-4
    schedule: str = "onecycle"  # see train.SCHEDULES
    # The 240-class heads' loss (train.TrainConfig). The seed's "mae" (MAE of the expected age) left
    # them 6-10 months behind the regression heads on real images; cross-entropy against a Gaussian of
    # 12 months around the label put them ahead on the embedded set (A/B/C-cls 19.0/13.3/17.2 → 9.8/
    # 11.1/9.7 months) and on rsna-dev (docs/benchmarks.md, "Classification heads").
    cls_loss: str = "ce"
    cls_sigma: float = 12.0
    cls_ce_weight: float = 0.05
    # What chooses the epoch. The scored fold never does: it is only predicted, once, by the model
    # chosen. inner_val_fraction > 0: that share of the training folds (stratified by age) is held out
    # as a selection split that picks the best epoch and drives early stopping (`patience`, counted
    # after the one-cycle warm-up) and plateau steps; 0: a fixed schedule, all training folds train and
    # the last epoch is the model. docs/benchmarks.md compares the two.
    # Measured on the embedded set: the fixed schedule won (16.0 vs 24.6 months at 70 epochs, 27.6 vs
    # 29.3 at 15): an ~11-image selection split is noise, and early stopping on it ended training while
    # the one-cycle LR was still high. configs/rsna.yaml keeps a selection split: with thousands of
    # images it is large, and it saves GPU time by stopping early.
    inner_val_fraction: float = 0.0
    patience: int = 10
    # A diagnostic for benchmarks: also record the scored fold's MAE at every epoch (`watch_mae`), to
    # measure how optimistic choosing the epoch on it would be. It chooses nothing.
    watch_scored_fold: bool = False
    bf16: bool = True  # bf16 autocast, channels_last and compile take effect on CUDA only
    channels_last: bool = True
    compile: bool = False  # 33 s of compilation per trial would outweigh a few-second training
    # Resources of one trial (its Ray Train worker; the Tune trial driver takes a sliver of a CPU):
    # one CPU per trial on CPU, so a 2-core machine runs 2 trials at once, each torch on one thread.
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0  # > 0: train on GPUs; a fraction packs several trials on one GPU
    # None: Tune starts every trial the cluster can hold now and queues the rest, so that an autoscaler
    # sees their resource requests and adds nodes; a number caps it.
    max_concurrent_trials: int | None = None
    max_failures: int = 2  # retries of a failed trial (a Train worker resumes from its last checkpoint)
    # What one Tune trial's own process asks for when it only waits on its Train worker (GPU trials,
    # local_train false). On a cluster, name a custom resource that only the head (or on-demand nodes)
    # declares, e.g. {CPU: 0, trial_driver: 0.01} with cluster.yaml's head `resources: {trial_driver:
    # 1000}`: a spot node that goes away then takes Train workers (which resume from their checkpoint
    # elsewhere), never the trial drivers. None: 0.01 CPU anywhere.
    driver_resources: dict[str, float] | None = None
    # The ensemble fit that scores, fixed beforehand (choosing it by the cross-validated MAE it then
    # reports would be optimistic): "tune" (Ray Tune), "lad" or "nnls"; the others are comparisons.
    ensemble: str = "tune"
    # Ray Train's local mode (ScalingConfig(num_workers=0)): the training function runs inside the Tune
    # trial's own process, without Train's controller and worker actors, whose start-up was most of a
    # small CPU trial's time. None: local for CPU trials (gpus_per_trial == 0), a Train worker for GPU
    # trials. A local trial keeps no mid-trial checkpoints: a failed one is retrained from the start
    # (Tune retries it max_failures times; a rerun trains whatever has no part).
    local_train: bool | None = None

    @property
    def train_in_trial_process(self) -> bool:
        return self.gpus_per_trial == 0 if self.local_train is None else bool(self.local_train)


@dataclass
class RayConfig:
    address: str | None = None  # None = start a local Ray (or join RAY_ADDRESS when set)
    num_cpus: int | None = None  # for a local Ray; None = all cores
    verbose: bool = False  # Ray's INFO lines, workers' output and per-operator progress bars on the console


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    keypoints: KeypointConfig = field(default_factory=KeypointConfig)
    cv: CVConfig = field(default_factory=CVConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output: str = "runs/embedded"  # local folder or s3:// URI for everything the run writes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The resolved configuration as saved next to every artefact, credentials redacted."""
        plain = _plain(self.to_dict())
        plain["data"]["storage_options"] = _redact(plain["data"]["storage_options"])
        return yaml.safe_dump(plain, sort_keys=False)


_SECRET_WORDS = ("secret", "key", "token", "password")


def _redact(value: Any) -> Any:
    """Storage options with every credential-like value replaced (an endpoint URL stays)."""
    if isinstance(value, dict):
        return {k: "<redacted>" if any(w in k.lower() for w in _SECRET_WORDS) and not isinstance(v, dict)
                else _redact(v) for k, v in value.items()}
    return value


def _plain(value: Any) -> Any:
    """Tuples as lists, so YAML stays readable and round-trips."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _update(obj: Any, overrides: dict[str, Any], where: str = "") -> None:
    known = {f.name: f for f in dataclasses.fields(obj)}
    for key, value in overrides.items():
        if key not in known:
            raise UserError(f"unknown config key {where}{key!r}; known: {', '.join(known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise UserError(f"config key {where}{key!r} must be a mapping")
            _update(current, value, f"{where}{key}.")
        else:
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(obj, key, value)


def absolute(uri: str | None) -> str | None:
    """A local path made absolute against the caller's working directory (`~` expanded); a URI
    (s3://, file://) or None as it is. Ray runs Tune trials and Data tasks in working directories of
    their own, so every local path is resolved like this on the driver before any Ray work starts."""
    if uri is None:
        return None
    uri = str(uri)
    return uri if "://" in uri else os.path.abspath(os.path.expanduser(uri))


def resolve_paths(config: Config) -> Config:
    """Every local path of `config` (images, labels, key points, key point model, output) absolute."""
    for section, key in (("data", "images"), ("data", "labels"), ("data", "keypoints"),
                         ("data", "test_images"), ("data", "test_labels"), ("keypoints", "model")):
        obj = getattr(config, section)
        setattr(obj, key, absolute(getattr(obj, key)))
    config.output = absolute(config.output)
    return config


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `overrides` (nested dicts, e.g. from flags); local
    paths are then made absolute against the working directory (see `absolute`)."""
    config = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise MissingInput(f"config file {path} not found (presets: configs/embedded.yaml, "
                                    "configs/rsna.yaml)")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise UserError(f"{path}: a config file must be a YAML mapping")
        _update(config, loaded)
    if overrides:
        _update(config, overrides)
    return resolve_paths(config)
