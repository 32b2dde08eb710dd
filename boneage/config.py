"""One typed configuration for every stage. Defaults are the embedded CPU run (synthetic data, minutes on a
laptop); YAML presets in configs/ override them (configs/rsna.yaml: the seed's RSNA-scale settings), and
command-line flags override the YAML. The resolved configuration is saved next to every artefact.

Each setting is declared once, below: its type, default, allowed values and help text. The YAML check,
the command-line flags (boneage.cli), `boneage config --markdown` (docs/settings.md) and the error
messages all read them from here. A bad value is a UserError with one line per problem, naming the
setting, the value and what is allowed."""

from __future__ import annotations

import difflib
import os
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import annotated_types
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydantic.fields import FieldInfo

from boneage.errors import MissingInput, UserError
from boneage.model.choices import CLS_LOSSES, MODEL_KIND_NAMES, SCHEDULES, SEX_KIND_NAMES, SEX_MODELS, SHIPPED_MODELS

# The choices, from torch-free boneage.model.choices (boneage.model.networks and .train build on them).
ModelKindName = Literal[MODEL_KIND_NAMES]
SexKindName = Literal[SEX_KIND_NAMES]
Schedule = Literal[SCHEDULES]
ClsLoss = Literal[CLS_LOSSES]
SexModels = Literal[SEX_MODELS]
ShippedModels = Literal[SHIPPED_MODELS]
Sex = Literal["F", "M"]
PositiveInt = Annotated[int, Field(gt=0)]
Amount = Annotated[float, Field(ge=0)]


class _Section(BaseModel):
    # Unknown keys are errors (a typo must not silently keep the default). Assignment after construction
    # is not validated (stages fill in paths); check_config validates the whole configuration again.
    model_config = ConfigDict(extra="forbid")


class DataConfig(_Section):
    images: str | None = Field(
        None, description="folder, s3:// prefix or .txt list of radiographs (PNG, JPEG, DICOM); null: make "
                          "synthetic radiographs")
    labels: str | None = Field(
        None, description="label CSV: id,boneage,male (any of the three RSNA variants)")
    keypoints: str | None = Field(
        None, description="key point annotations (VIA CSV/JSON or id,finger_tip_x,...), optional")
    # The locked test split: set aside before anything is fit, scored once at the end by the shipped
    # bundle through `boneage score`'s code path. A fraction of the labelled images (stratified by sex
    # and age, fixed by seed), or an official test set (test_images + test_labels; then no fraction).
    test_fraction: float = Field(
        0.1, ge=0, lt=0.5,
        description="share of the labelled images set aside as the locked test split before anything is "
                    "fit, stratified by sex and age, fixed by the seed; 0: none")
    test_images: str | None = Field(
        None, description="an official test set instead of test_fraction (folder, s3:// prefix or .txt list)")
    test_labels: str | None = Field(None, description="the official test set's labels (with test_images)")
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec options for s3:// (endpoint, keys): a mapping in YAML, JSON as a flag, e.g. "
                    "'{\"client_kwargs\": {\"endpoint_url\": \"http://127.0.0.1:9000\"}}'; credentials are "
                    "redacted in every saved config")
    # The embedded default: enough synthetic hands for every fold of both sexes to see all ages, at a
    # size a CPU registers in well under a second each.
    synthetic_n: int = Field(240, ge=1, description="how many synthetic radiographs when no images are given")
    # Real scans are ~2044x1514.
    synthetic_size: tuple[PositiveInt, PositiveInt] = Field(
        (640, 480), description="(height, width) of the synthetic radiographs")
    seed: int = Field(0, ge=0, description="seed of the synthetic data, the test split, the folds and training")


class PreprocessConfig(_Section):
    # CPU work is cut into batches this size: large enough to amortise Ray task overhead, small enough
    # that a batch of full-resolution images (~3 MB each, several copies in flight) stays far below 1 GB.
    batch_size: int = Field(8, ge=1, description="images per CPU task of the preparation")
    qa_sheet_size: int = Field(64, ge=0, description="registered images on the QA contact sheet")
    # Ray resources of the preparation: each CPU task (decode, mask, register) and each actor of the
    # key point model and of scoring. Half a CPU for an actor: a request unlike the tasks' keeps Ray
    # Data from fusing the CPU stages into the (few) actors, and on CPU torch uses what tasks leave idle.
    cpus_per_task: float = Field(1.0, gt=0, description="CPUs of each CPU task (decode, mask, register)")
    cpus_per_actor: float = Field(0.5, gt=0, description="CPUs of each key point model and scoring actor")
    # Each parquet write of a scored (boneage score) or registered (preparation) block. Small, so that a
    # write fits beside the busy stages at once: at Ray Data's default (1 CPU) a 2-CPU node queued every
    # scored block until scoring was over (1,300 rows scored, none written), and a crash lost them all.
    cpus_per_write: float = Field(0.1, gt=0, description="CPUs of each parquet write of a registered or "
                                                         "scored block")


class KeypointConfig(_Section):
    # "model": the key point CNN (trained here when no `model` is given), with the geometric estimate
    # from the hand mask as fallback where the model's registration fails QA; "geometric": no CNN.
    source: Literal["model", "geometric"] = Field(
        "model", description="'model': the key point CNN (trained on the key point annotations and confident "
                             "geometric pseudo-labels unless keypoints.model is given), falling back to the "
                             "geometric estimate where its registration fails QA; 'geometric': from the hand "
                             "mask only")
    model: str | None = Field(
        None, description="a trained key point model (safetensors, e.g. a bundle's keypoints/"
                          "keypoint_model.safetensors; local or s3://); null: train one")
    # Training: the seed's VGG-like net (blocks 64-128-256, 2 FC of 512) on the image reduced to 130x100.
    # On a CPU ~1 min for the embedded set at width 0.25; the geometric estimate backs it up.
    epochs: int = Field(25, ge=1, description="epochs of the key point model's training")
    batch_size: int = Field(32, ge=1, description="batch size of the key point model's training")
    lr: float = Field(2e-3, gt=0, description="learning rate of the key point model")
    # A quarter of the seed's widths on a CPU (rsna.yaml: 1.0): on the embedded set it trains 3-4x faster
    # than half (60 vs 200-275 s) with the same held-out key point error (docs/benchmarks.md).
    width_mult: float = Field(0.25, gt=0, description="the key point net's widths, times the seed's (64-128-256)")
    patience: int = Field(10, ge=0, description="stop after this many epochs without improvement; 0: never")
    val_fraction: float = Field(0.15, ge=0, lt=1, description="share of the training images held out to choose "
                                                              "the key point model's epoch")
    # Images without annotations join training with their geometric key points as pseudo-labels when
    # the geometric estimate is at least this confident.
    pseudo_label_confidence: float = Field(
        0.8, ge=0, le=1, description="geometric key points at least this confident are pseudo-labels")
    max_training_images: int = Field(3000, ge=1, description="at most this many images train the key point model")
    use_gpu: bool = Field(False, description="train the key point model on a GPU")
    # Ray Train's local mode: on CPU the training runs in the driver (no worker to start, no ~100 MB
    # checkpoint per epoch); None: local unless use_gpu (a GPU worker checkpoints and can resume).
    local_train: bool | None = Field(
        None, description="train in the driver (Ray Train's local mode); null: local unless use_gpu")
    actors: int = Field(1, ge=1, description="key point prediction actors")
    # CPUs of the training worker (Ray sizes torch's threads by them); None: a node's CPUs on CPU, one
    # with a GPU (the data are on the device).
    cpus_per_worker: float | None = Field(
        None, gt=0, description="CPUs of the key point training worker; null: a node's CPUs on CPU, 1 with a GPU")
    # >0 on a GPU cluster: the net is tiny, a fraction of a GPU suffices.
    gpus_per_actor: float = Field(0.0, ge=0, description="GPU per key point prediction actor (0: CPU)")


class CVConfig(_Section):
    """k-fold CV of the zone models: one Ray Tune trial per (kind, sex, fold), each a Ray Train run.

    The defaults are the embedded CPU run (240 synthetic images, 2 cores, minutes): small inputs, thin
    nets, few epochs. configs/rsna.yaml holds the seed's settings at RSNA scale on GPUs."""

    # 3 folds: 240 synthetic images leave ~80 per sex to train each model and ~40 to score; fewer
    # trials (36) than k=5 (60), and the Ray Train start-up per trial dominates tiny trainings.
    k: int = Field(3, ge=2, description="k of k-fold CV")
    # zone x head: all 6
    kinds: tuple[ModelKindName, ...] = Field(
        MODEL_KIND_NAMES, min_length=1, description="the model kinds (zone x head) cross-validated")
    # A per-sex model per kind: 12 model kinds in all.
    sexes: tuple[Sex, ...] = Field(("F", "M"), min_length=1, description="a model per kind for each of these sexes")
    # "per_sex" (the seed's): a model per kind and sex, each trained on half the images. "pooled": one
    # model per kind for both sexes, trained on all the training folds' images, with the sex fed in
    # beside the image features (into the first FC layer, as Deeplasia and the MGH model do): half the
    # trials and fold models, and twice the images per model: on rsna-dev's 713 images it beat per-sex by
    # a month (docs/benchmarks.md). Scoring calls a pooled model with each sex it scores under.
    sex_models: SexModels = Field(
        "per_sex", description="'per_sex': a model per kind and sex; 'pooled': one model per kind for both sexes "
                               "with the sex as an input")
    # What the bundle scores with. "folds": the mean of each kind's k fold models (k forwards per kind
    # and image). "refit": after the CV, one more model per kind (and sex) trained the same way on every
    # CV image, the only bone age model of its kind in the bundle: 1/k of the scoring cost, trained on
    # k/(k-1) times the images of a fold model, without the averaging. The ensemble weights, age
    # correction, interval and gate still come from the fold models' out-of-fold predictions (a refit has
    # none), and the sex classifier ships its fold models either way (its thresholds are the folds').
    ship: ShippedModels = Field(
        "folds", description="the bone age models the bundle scores with: 'folds' (the mean of the k fold models) "
                             "or 'refit' (one model per kind trained on every CV image after the CV)")
    # The sex classifier (P(male), for images of unknown sex at scoring): a kind of its own on one zone,
    # trained on both sexes pooled in the same folds and Tune run (k more trials); never in the
    # ensemble. None: no sex classifier (an image of unknown sex gets the mean of both sexes' readings).
    sex_kind: SexKindName | None = Field(
        "A-sex", description="the sex classifier's zone (P(male) for images of unknown sex); null: none")
    # On rsna-dev the wrist classifier was still learning at 50 epochs (bench/sex_sweep.py: AUC 0.76 at
    # 50, 0.82 at 80; docs/benchmarks.md).
    sex_epochs: int | None = Field(
        None, ge=1, description="epochs of the sex classifier's trials; null: cv.epochs")
    # Test-time augmentation of the sex classifier alone (the sigmoid of its views' mean logit), out of
    # fold and at scoring: one small model kind, so much cheaper than the zone models' tta_views. On
    # rsna-dev 5 views took the wrist classifier's out-of-fold AUC from 0.798 to 0.819 (docs/benchmarks.md).
    sex_tta_views: int | None = Field(
        None, ge=1, le=9, description="test-time augmentation of the sex classifier alone (odd: 1 off, 3, 5, 7 "
                                      "or 9); null: cv.tta_views")
    # A predicted sex stands in for an unknown one only where the classifier has earned it: the loosest
    # P(male) threshold whose out-of-fold confident calls are wrong at most this often, on at least
    # sex_min_confident_calls of them, also when cross-fitted over the folds (boneage.validation.sex_calls);
    # else scoring never uses a predicted sex. A wrong sex moves the bone age by up to ~15 months.
    sex_max_error_rate: float = Field(
        0.02, ge=0, lt=0.5, description="largest out-of-fold share of wrong confident sex calls at which a predicted "
                                        "sex may replace an unknown one (cross-fitted over the folds too)")
    # 30 calls: at 0 wrong, the 95% upper bound of the true rate is ~10% (rule of three); fewer say nothing.
    sex_min_confident_calls: int = Field(
        30, ge=1, description="fewest out-of-fold confident sex calls the error rate must be measured on, or "
                              "predicted sex stays off")
    # Inputs at 1/8 of the seed's sizes (zone A 62x47) and a quarter of its widths (8-16-32-32-64-96):
    # on the embedded set, trained for 70 epochs, this beat 1/4 size at the epochs that fit the same
    # time (subset mean 13.7 vs 25 months, docs/benchmarks.md); a CPU epoch of ~77 images is ~0.2 s.
    input_scale: float = Field(0.125, gt=0, description="zone inputs, times the seed's sizes (A 500x375)")
    # The sex classifier's own input size, so that the bone age models' can change alone: on rsna-dev the
    # wrist classifier at 1/3 did not beat 1/4 (AUC 0.803 vs 0.816, docs/benchmarks.md) and costs 1.8x.
    sex_input_scale: float | None = Field(
        None, gt=0, description="the sex classifier's input size, times the seed's; null: cv.input_scale")
    width_mult: float = Field(0.25, gt=0, description="zone nets' widths, times the seed's (32-64-128-128-256-384)")
    # The seed's 2048 would be ~all of the parameters at this size.
    fc: int = Field(256, ge=1, description="width of the two fully connected layers")
    # The seed's 0.5 starves a net this thin: on the embedded set, 0.1 reached 17-22 months validation
    # MAE in 20 epochs where 0.5 stayed near the median's ~38 (A-reg, fold 0 of the girls).
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout before the fully connected layers")
    # ~5 steps an epoch: the models underfit at 15-40 epochs (70: 16.0 months on the subset, 40: 20.4,
    # 15: ~29); 70 is what fits the 10-minute embedded run on 2 cores.
    epochs: int = Field(70, ge=1, description="epochs per CV trial")
    # ~5 steps an epoch on ~80 images: BN still sees a fair batch.
    batch_size: int = Field(16, ge=1, description="batch size of a CV trial")
    # The one-cycle peak; 1e-3 had not left the median after 10 epochs, 1e-2 diverged.
    lr: float = Field(3e-3, gt=0, description="learning rate (the one-cycle peak)")
    weight_decay: float = Field(1e-4, ge=0, description="AdamW weight decay")
    schedule: Schedule = Field("onecycle", description="learning rate schedule; plateau needs a selection "
                                                       "split (inner_val_fraction > 0)")
    # The 240-class heads' loss (train.TrainConfig). The seed's "mae" (MAE of the expected age) left
    # them 6-10 months behind the regression heads on real images; cross-entropy against a Gaussian of
    # 12 months around the label put them ahead on the embedded set (A/B/C-cls 19.0/13.3/17.2 → 9.8/
    # 11.1/9.7 months) and on rsna-dev (docs/benchmarks.md, "Classification heads").
    cls_loss: ClsLoss = Field(
        "ce", description="the 240-class heads' loss: 'ce' (cross-entropy against a Gaussian around the label), "
                          "'mae' (the seed's MAE of the expected age) or both")
    cls_sigma: float = Field(12.0, gt=0, description="width in months of the 'ce' loss's Gaussian")
    cls_ce_weight: float = Field(0.05, ge=0, description="weight of the cross-entropy in 'mae+ce'")
    # What chooses the epoch. The scored fold never does: it is only predicted, once, by the model
    # chosen. inner_val_fraction > 0: that share of the training folds (stratified by age) is held out
    # as a selection split that picks the best epoch and drives early stopping (`patience`, counted
    # after the one-cycle warm-up) and plateau steps; 0: a fixed schedule, all training folds train and
    # the last epoch is the model. docs/benchmarks.md compares the two.
    # Measured on the embedded set: the fixed schedule won (16.0 vs 24.6 months at 70 epochs, 27.6 vs
    # 29.3 at 15): an ~11-image selection split is noise, and early stopping on it ended training while
    # the one-cycle LR was still high. configs/rsna.yaml keeps a selection split: with thousands of
    # images it is large, and it saves GPU time by stopping early.
    inner_val_fraction: float = Field(
        0.0, ge=0, lt=0.5,
        description="share of each trial's training folds held out to choose its epoch; 0: a fixed schedule, "
                    "the last epoch. The scored fold never chooses anything")
    patience: int = Field(10, ge=0, description="early stopping on the selection split after this many epochs "
                                                "without improvement; 0: never")
    # A diagnostic for benchmarks: also record the scored fold's MAE at every epoch (`watch_mae`), to
    # measure how optimistic choosing the epoch on it would be. It chooses nothing.
    watch_scored_fold: bool = Field(False, description="also record the scored fold's MAE every epoch "
                                                       "(a diagnostic; it chooses nothing)")
    # bf16 autocast and compile take effect on CUDA only; channels_last on CPU too (faster there as well).
    bf16: bool = Field(True, description="bf16 autocast (CUDA only)")
    channels_last: bool = Field(True, description="channels_last memory format of the nets (CPU and CUDA)")
    # 33 s of compilation per trial would outweigh a few-second training.
    compile: bool = Field(False, description="torch.compile the zone nets (CUDA only)")
    # Resources of one trial (its Ray Train worker; the Tune trial driver takes a sliver of a CPU):
    # one CPU per trial on CPU, so a 2-core machine runs 2 trials at once, each torch on one thread.
    cpus_per_trial: float = Field(1.0, gt=0, description="CPUs per CV trial")
    gpus_per_trial: float = Field(0.0, ge=0, description="GPUs per CV trial; a fraction packs trials on a GPU; "
                                                         "0: CPU")
    # None: Tune starts every trial the cluster can hold now and queues the rest, so that an autoscaler
    # sees their resource requests and adds nodes; a number caps it.
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="at most this many trials at once; null: as many as the cluster holds")
    # Retries of a failed trial (a Train worker resumes from its last checkpoint).
    max_failures: int = Field(2, ge=0, description="retries of a failed trial")
    # What one Tune trial's own process asks for when it only waits on its Train worker (GPU trials,
    # local_train false). On a cluster, name a custom resource that only the head (or on-demand nodes)
    # declares, e.g. {CPU: 0, trial_driver: 0.01} with cluster.yaml's head `resources: {trial_driver:
    # 1000}`: a spot node that goes away then takes Train workers (which resume from their checkpoint
    # elsewhere), never the trial drivers. None: 0.01 CPU anywhere.
    driver_resources: dict[str, Amount] | None = Field(
        None, description="Ray resources of a GPU trial's own process, e.g. {CPU: 0, trial_driver: 0.01}; "
                          "null: 0.01 CPU anywhere")
    # The ensemble fit that scores, fixed beforehand (choosing it by the cross-validated MAE it then
    # reports would be optimistic): "tune" (Ray Tune), "lad" or "nnls"; the others are comparisons.
    ensemble: Literal["tune", "lad", "nnls"] = Field(
        "tune", description="the ensemble fit that scores (the others are reported beside it)")
    # The bone age's prediction interval (boneage.validation.intervals): conformal on the ensemble's
    # out-of-fold residuals, its method chosen by cross-fitted coverage and width over the OOF folds.
    interval_level: float = Field(
        0.9, ge=0.5, le=0.99, description="level of the bone age's prediction interval (calibrated on out-of-fold "
                                          "residuals)")
    # The per-sex correction of the ensemble's bias at the extreme ages (boneage.validation.age_calibration),
    # fitted on out-of-fold predictions only; the interval is then calibrated on the corrected predictions.
    # auto: the weakest of the strengths 0, 0.25, ..., 1 (a blend of the prediction and the full inverse)
    # that keeps every age band's out-of-fold bias within age_bias_target; rsna-dev's pooled-wide run:
    # bias 2-5 y +6.9, 15-19 y -8.7 months uncorrected, MAE 9.07; the full inverse 10.09 (docs/benchmarks.md).
    age_calibration: Literal["auto", "linear", "off"] = Field(
        "auto", description="per-sex monotone correction of the bone age for the pull towards the mean age "
                            "(fitted out of fold: prediction regressed on label, inverted); auto: at the weakest "
                            "strength that brings every age band's bias within age_bias_target; linear: in full; "
                            "off: none")
    age_bias_target: float = Field(
        6.5, gt=0, description="auto age correction: the largest out-of-fold bias, in months, it leaves in any age "
                               "band of 30+ images")
    age_correction_max_mae_increase: float = Field(
        0.10, ge=0, description="auto age correction: never at a strength that raises the out-of-fold MAE by more "
                                "than this share")
    # Ray Train's local mode (ScalingConfig(num_workers=0)): the training function runs inside the Tune
    # trial's own process, without Train's controller and worker actors, whose start-up was most of a
    # small CPU trial's time. None: local for CPU trials (gpus_per_trial == 0), a Train worker for GPU
    # trials. A local trial keeps no mid-trial checkpoints: a failed one is retrained from the start
    # (Tune retries it max_failures times; a rerun trains whatever has no part).
    local_train: bool | None = Field(
        None, description="train inside the Tune trial's process (Ray Train's local mode); null: for CPU trials")
    # Test-time augmentation (boneage.model.augment.TTA_VIEWS): each fold model's prediction is the mean
    # over the first n fixed jitters of the zone crop (the plain crop, zoom +-5 %, shift +-3 % either
    # way, turn +-4 degrees; all inside the training augmentation; no flips: registered hands face one
    # way). Used for the scored fold's out-of-fold prediction and, recorded in the bundle, at scoring:
    # the ensemble, gate and interval are fitted on the predictions that ship. Scoring costs ~n times
    # the model time (docs/benchmarks.md); 1: off.
    tta_views: int = Field(
        1, ge=1, le=9, description="test-time augmentation: mean over this many fixed jitters of each zone crop "
                                   "(odd: 1 off, 3, 5, 7 or 9), out of fold and at scoring")

    @model_validator(mode="after")
    def _plateau_needs_a_selection_split(self) -> CVConfig:
        if self.schedule == "plateau" and self.inner_val_fraction == 0:
            raise ValueError("schedule 'plateau' steps on the selection split: set inner_val_fraction > 0")
        return self

    @model_validator(mode="after")
    def _balanced_views_and_pooled_sexes(self) -> CVConfig:
        if self.tta_views % 2 == 0:
            raise ValueError(f"tta_views must be odd (1, 3, 5, 7, 9): the views after the plain crop come in "
                             f"symmetric pairs, got {self.tta_views}")
        if self.sex_views % 2 == 0:
            raise ValueError(f"sex_tta_views must be odd (1, 3, 5, 7, 9), got {self.sex_tta_views}")
        if self.sex_models == "pooled" and set(self.sexes) != {"F", "M"}:
            raise ValueError("sex_models 'pooled' trains one model on both sexes: sexes must be [F, M]")
        return self

    @property
    def sex_views(self) -> int:
        """The sex classifier's test-time views: sex_tta_views, or the zone models' tta_views."""
        return self.tta_views if self.sex_tta_views is None else self.sex_tta_views

    def input_scale_of(self, kind: str) -> float:
        """The input scale a kind trains and scores at: sex_input_scale for the sex classifier, if set."""
        return self.sex_input_scale if kind == self.sex_kind and self.sex_input_scale else self.input_scale

    @property
    def train_in_trial_process(self) -> bool:
        return self.gpus_per_trial == 0 if self.local_train is None else bool(self.local_train)


class RayConfig(_Section):
    address: str | None = Field(None, description="Ray cluster address; null: RAY_ADDRESS when set, else a "
                                                  "local Ray")
    num_cpus: int | None = Field(None, ge=1, description="CPUs for a local Ray; null: all cores")
    verbose: bool = Field(
        False, description="also show Ray's INFO lines, the workers' output and per-operator progress bars "
                           "(Ray's log files under /tmp/ray/session_latest/logs keep them either way)")


class ServeConfig(_Section):
    """`boneage serve`: the HTTP service's address, replicas, batching and limits (docs/serving.md)."""

    host: str = Field("127.0.0.1", description="address the HTTP service listens on; 0.0.0.0: every interface "
                                               "(put TLS and authentication in front: docs/serving.md)")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the service")
    replicas: int = Field(1, ge=1, description="replicas of the scoring service (each holds the bundle's models); "
                                              "with max_replicas: the autoscaler's lower bound")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling: up to this many replicas as the load "
                                                             "asks (Ray Serve's autoscaler); null: a fixed number")
    target_ongoing_requests: float = Field(4.0, gt=0, description="autoscaling: the requests in flight per replica "
                                                                  "that the autoscaler aims at")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs each replica reserves")
    gpus_per_replica: float = Field(0.0, ge=0, description="GPU each replica reserves (0: CPU); a fraction packs "
                                                            "replicas on a GPU")
    torch_threads: int | None = Field(None, ge=1, description="torch's intra-op threads in each replica; null: "
                                                               "Ray's default, the replica's whole CPUs (docs/serving.md)")
    max_batch_size: int = Field(8, ge=1, description="requests scored together by the zone models (Serve's "
                                                     "dynamic batching)")
    batch_wait_s: float = Field(0.01, ge=0, description="how long a batch waits for more requests before it is "
                                                        "scored")
    max_ongoing_requests: int = Field(8, ge=1, description="requests one replica works on at once (preparation "
                                                           "in threads, scoring in batches)")
    max_queued_requests: int = Field(16, ge=0, description="requests waiting for a replica; beyond them the "
                                                           "service answers 503 with Retry-After")
    retry_after_s: float = Field(1.0, ge=0, description="the Retry-After a 503 of a full queue gives")
    max_request_mb: float = Field(64.0, gt=0, description="largest request body, in MB (10^6 bytes); a larger "
                                                          "one is refused with 413")
    # A hand radiograph is 2-15 Mpx (a 43x35 cm plate at 0.1 mm is 15 Mpx); a bigger header is refused
    # before anything is decoded, far below PIL's decompression-bomb limit (about 179 Mpx).
    max_pixels_mpx: float = Field(40.0, gt=0, description="largest image accepted, in million pixels, from its "
                                                          "header; a larger one is refused with 422 bad_image")
    request_timeout_s: float = Field(60.0, gt=0, description="a request not answered in this time ends with 408")
    token_file: str | None = Field(None, description="a file holding the bearer token that every route but "
                                                     "/v1/health then requires; null: the BONEAGE_SERVE_TOKEN "
                                                     "environment variable, else no token")

    @model_validator(mode="after")
    def _bounds(self) -> "ServeConfig":
        if self.max_replicas is not None and self.max_replicas < self.replicas:
            raise ValueError(f"max_replicas ({self.max_replicas}) is below replicas ({self.replicas})")
        return self


class Config(_Section):
    data: DataConfig = Field(default_factory=DataConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    keypoints: KeypointConfig = Field(default_factory=KeypointConfig)
    cv: CVConfig = Field(default_factory=CVConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    output: str = Field("runs/embedded", description="run folder, local or s3://, for everything the run writes")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump()

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


# --- the settings, read back from the models: for the flags, the docs and the error messages ---------

SECTIONS = ("data", "preprocess", "keypoints", "cv", "ray", "serve")


def settings() -> dict[str, FieldInfo]:
    """Every setting by its dotted name ('cv.k', 'output'), in declaration order."""
    out: dict[str, FieldInfo] = {}
    for name, info in Config.model_fields.items():
        if name in SECTIONS:
            out.update({f"{name}.{key}": sub for key, sub in info.annotation.model_fields.items()})
        else:
            out[name] = info
    return out


def default_of(info: FieldInfo) -> Any:
    return info.get_default(call_default_factory=True)


def show_value(value: Any) -> str:
    """A value as YAML writes it inline: null, true, 0.003, [A-reg, A-cls], {CPU: 0}."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(show_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {show_value(v)}" for k, v in value.items()) + "}"
    return str(value)


def _unwrap(annotation: Any) -> tuple[Any, list[Any], bool]:
    """(the type without Annotated and None, the Annotated constraints, whether null is allowed)."""
    constraints: list[Any] = []
    nullable = False
    while True:
        origin = typing.get_origin(annotation)
        if origin is Annotated:
            annotation, *extra = typing.get_args(annotation)
            for e in extra:
                constraints.extend(e.metadata if isinstance(e, FieldInfo) else [e])
        elif origin in (typing.Union, types.UnionType) and type(None) in typing.get_args(annotation):
            nullable = True
            rest = [a for a in typing.get_args(annotation) if a is not type(None)]
            annotation = rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
        else:
            return annotation, constraints, nullable


def type_name(annotation: Any) -> str:
    """A setting's type in words: int, float, str, bool, list of str, [int, int], mapping; 'or null'."""
    inner, _, nullable = _unwrap(annotation)
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    if origin is Literal:
        name = type(args[0]).__name__
    elif origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            name = f"list of {type_name(args[0])}"
        else:
            name = "[" + ", ".join(type_name(a) for a in args) + "]"
    elif origin is dict or inner is dict:
        name = "mapping"
    else:
        name = getattr(inner, "__name__", str(inner))
    return f"{name} or null" if nullable else name


def _bounds(constraints: list[Any]) -> str:
    found = {type(c).__name__: getattr(c, type(c).__name__.lower()) for c in constraints
             if isinstance(c, (annotated_types.Ge, annotated_types.Gt, annotated_types.Le, annotated_types.Lt))}
    low = ("[", found["Ge"]) if "Ge" in found else ("(", found["Gt"]) if "Gt" in found else None
    high = (found["Le"], "]") if "Le" in found else (found["Lt"], ")") if "Lt" in found else None
    if low and high:
        return f"in {low[0]}{low[1]}, {high[0]}{high[1]}"
    if low:
        return f"{'>=' if low[0] == '[' else '>'} {low[1]}"
    if high:
        return f"{'<=' if high[1] == ']' else '<'} {high[0]}"
    return ""


def allowed(info: FieldInfo) -> str:
    """What a setting may be, in words that follow 'must be': '>= 2', 'in [0, 0.5)', 'one of ...'."""
    inner, constraints, nullable = _unwrap(info.annotation)
    constraints = [*info.metadata, *constraints]
    origin, args = typing.get_origin(inner), typing.get_args(inner)
    parts = []
    if origin is Literal:
        parts.append("one of " + ", ".join(map(str, args)))
    elif origin is tuple and len(args) == 2 and args[1] is Ellipsis:
        item, item_constraints, _ = _unwrap(args[0])
        if typing.get_origin(item) is Literal:
            parts.append("each one of " + ", ".join(map(str, typing.get_args(item))))
        least = [c.min_length for c in constraints if isinstance(c, annotated_types.MinLen)]
        if least:
            parts.append(f"at least {least[0]}")
    elif origin is tuple:
        each = {_bounds(_unwrap(a)[1]) for a in args}
        if len(each) == 1 and "" not in each:
            parts.append(f"each {each.pop()}")
    elif origin is dict and args:
        value_bounds = _bounds(_unwrap(args[1])[1])
        if value_bounds:
            parts.append(f"values {value_bounds}")
    bounds = _bounds(constraints)
    if bounds:
        parts.append(bounds)
    return ", ".join(parts) + (" or null" if nullable and parts else "")


def settings_markdown(flags: Mapping[str, str] | None = None) -> str:
    """docs/settings.md: every setting with its type, default, allowed values, flag and help.
    `flags` maps a setting ('cv.k') to its command-line flag ('--folds'); boneage.cli passes its table."""
    flags = flags or {}
    lines = [
        "# Settings",
        "",
        "Every setting of a run, generated from `boneage/config.py` by `boneage config --markdown > "
        "docs/settings.md` (tests/test_settings.py fails when this file differs). The defaults are the "
        "embedded CPU run; a YAML preset (`--config`, e.g. `configs/rsna.yaml`) overrides them and a flag "
        "overrides the YAML. `boneage config [--config FILE] [flags]` prints the resolved configuration.",
    ]
    section = None
    for name, info in settings().items():
        here = name.split(".")[0] if "." in name else ""
        if here != section:
            section = here
            lines += ["", f"## {here or 'run'}", "", "| setting | type | default | allowed | flag | what |",
                      "|---|---|---|---|---|---|"]
        cells = [f"`{name}`", type_name(info.annotation), f"`{show_value(_plain(default_of(info)))}`",
                 allowed(info), f"`{flags[name]}`" if name in flags else "", info.description or ""]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


# --- validation with one line per problem ---------------------------------------------------------------

_TYPE_WORDS = {
    "int_parsing": "an integer", "int_type": "an integer", "int_from_float": "a whole number",
    "float_parsing": "a number", "float_type": "a number", "bool_parsing": "true or false",
    "bool_type": "true or false", "string_type": "a string", "model_type": "a mapping", "dict_type": "a mapping",
    "model_attributes_type": "a mapping", "tuple_type": "a list", "list_type": "a list",
}


_BOUNDS = {"greater_than": ("gt", ">"), "greater_than_equal": ("ge", ">="), "less_than": ("lt", "<"),
           "less_than_equal": ("le", "<=")}


def _dotted(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _setting_of(loc: tuple) -> str:
    """The setting an error location belongs to: ('cv', 'kinds', 0) -> 'cv.kinds'."""
    return ".".join(str(p) for p in loc[:2]) if loc and loc[0] in SECTIONS else (str(loc[0]) if loc else "")


def _has(tree: Any, path: list[str]) -> bool:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return False
        tree = tree[key]
    return True


def _problem(error: dict, data: dict, sources: list[tuple[str, dict, Mapping[str, str]]]) -> str:
    loc, kind, ctx = tuple(error["loc"]), error["type"], error.get("ctx") or {}
    setting = _setting_of(loc)
    info = settings().get(setting)
    if kind == "value_error":  # a check across settings, at the level of its section
        return f"{_dotted(loc) or 'config'}: {ctx.get('error', error['msg'])}"
    where, value = "", error["input"]
    for label, tree, labels in sources:
        if _has(tree, setting.split(".")):
            where = labels.get(setting, label)
    if where.startswith("--") and isinstance(value, str):
        shown = f"{_dotted(loc)}={value} ({where})"  # as typed: --folds ten
    else:
        shown = f"{_dotted(loc)}={value!r}" + (f" ({where})" if where else "")
    if kind == "extra_forbidden":
        parent = Config if len(loc) == 1 else Config.model_fields[loc[0]].annotation
        known = list(parent.model_fields) if isinstance(parent, type) and issubclass(parent, BaseModel) else []
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"did you mean {close[0]}?" if close else f"known: {', '.join(known)}"
        return f"{shown}: unknown setting; {hint}"
    if kind == "literal_error":
        return f"{shown}: must be one of {ctx['expected']}"
    if kind in _TYPE_WORDS:
        return f"{shown}: must be {_TYPE_WORDS[kind]}"
    if kind in _BOUNDS:
        # the whole range of a setting ('in [0, 0.5)'), the one bound broken for an item of one
        whole = _bounds(info.metadata) if info is not None and _dotted(loc) == setting else ""
        key, symbol = _BOUNDS[kind]
        return f"{shown}: must be {whole or f'{symbol} {ctx[key]}'}"
    if kind == "too_short" and "min_length" in ctx:
        return f"{shown}: must have at least {ctx['min_length']} item(s)"
    if kind == "too_long" and "max_length" in ctx:
        return f"{shown}: must have at most {ctx['max_length']} items"
    message = error["msg"]
    return f"{shown}: {message[:1].lower()}{message[1:]}"


def _validate(data: dict, sources: list[tuple[str, dict, Mapping[str, str]]]) -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        errors = err.errors()
        # an error inside a setting (an item of a list) says it all: not also its list's length
        errors = [e for e in errors if not any(len(o["loc"]) > len(e["loc"]) and o["loc"][:len(e["loc"])] == e["loc"]
                                               for o in errors)]
        raise UserError("\n  ".join(_problem(e, data, sources) for e in errors)) from None


def check(config: Config) -> Config:
    """`config` validated again (a stage may have assigned a setting): a UserError, one line a problem."""
    return _validate(config.model_dump(), [])


def _merge(base: dict, extra: Mapping[str, Any]) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), dict) \
            and key in SECTIONS else value
    return out


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML preset as a mapping; a missing file, bad YAML or a non-mapping is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise MissingInput(f"config file {path} not found (presets: configs/embedded.yaml, configs/rsna.yaml)")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{path}: not valid YAML{at}: {getattr(err, 'problem', None) or err}") from None
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: a config file must be a YAML mapping")
    return loaded


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


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None,
                labels: Mapping[str, str] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `overrides` (nested dicts, e.g. from flags), validated
    together: a UserError with one line per bad setting, saying where it came from (the file, or the
    flag `labels` names for a setting, e.g. {'cv.k': '--folds'}). Local paths are then made absolute
    against the working directory (see `absolute`)."""
    loaded = read_yaml(path) if path is not None else {}
    overrides = overrides or {}
    sources = [(str(path), loaded, {}), ("", overrides, labels or {})]
    return resolve_paths(_validate(_merge(loaded, overrides), sources))
