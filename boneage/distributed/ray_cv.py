"""k-fold CV of the zone models on Ray: a Ray Tune experiment with one trial per (kind, sex, fold),
each trial fitting a Ray Train TorchTrainer on that sex's registered images (cv.sex_models "pooled":
one trial per (kind, fold) on both sexes, the sex an input of the network); the sex classifier
(cv.sex_kind) has one trial per fold on both sexes pooled, in the same experiment. With cv.ship
"refit" each bone age kind (and sex) has one more trial, trained on every CV image and scoring none:
the model the bundle ships.

    registered/*.parquet ─► CV/folds.parquet (driver) ─► Tune trials, max_concurrent_trials in parallel
        trial = TorchTrainer ─► read parquet, bank, fit on the training folds with the epoch chosen on
              their selection split, predict the scored fold once
              ─► CV/models/<trial>.pt, CV/parts/<trial>.parquet ─► CV/oof.parquet, CV/trials.parquet

On CPU the TorchTrainer runs in local mode (the training function inside the trial's process: no
Train worker to start); on GPUs one Train worker per trial checkpoints every epoch. Resuming: a trial
is finished when its part exists, and a rerun schedules only the others; a worker trial cut off
mid-training restarts from its last epoch (Ray Train restores a run of the same name and storage
path). The torch work is boneage.model.train.fit_zone_model; the bookkeeping is boneage.validation.cv.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import fsspec
import ray
import ray.train
import ray.tune
import torch
from ray.train.torch import TorchTrainer

from boneage.validation import cv
from boneage.distributed import ray_env
from boneage.data import storage
from boneage.distributed.ray_checkpoints import read_state, report_state, resume_state
from boneage.config import Config, CVConfig
from boneage.errors import RunError, UserError
from boneage.model.networks import model_kind
from boneage.progress import Progress
from boneage.model.train import TrainConfig, fit_sex_model, fit_zone_model, predict, predict_p_male

# The Tune trial itself only waits on its Train run: it takes this sliver of a CPU, and its worker
# the rest of `cpus_per_trial`, so that N trials fit exactly on N x cpus_per_trial CPUs.
DRIVER_CPUS = 0.01


# -- paths ----------------------------------------------------------------------------------------


def cv_paths(cv_uri: str) -> dict[str, str]:
    return {name: storage.join_uri(cv_uri, name) for name in
            ("folds.parquet", "oof.parquet", "trials.parquet", "parts", "models", "train")}


def finished_trials(cv_uri: str, storage_options: dict | None = None) -> dict[str, tuple[pd.DataFrame, dict]]:
    """{trial name: (predictions, record)} of every readable part (a torn write counts as unfinished)."""
    parts_uri = cv_paths(cv_uri)["parts"]
    fs, path = fsspec.core.url_to_fs(parts_uri, **(storage_options or {}))
    if not fs.exists(path):
        return {}
    out = {}
    for found in sorted(fs.glob(path.rstrip("/") + "/*.parquet")):
        name = os.path.basename(found)[: -len(".parquet")]
        try:
            out[name] = cv.read_part(storage.join_uri(parts_uri, name + ".parquet"), storage_options)
        except Exception as err:  # noqa: BLE001 - an unreadable part is retrained, not fatal
            print(f"[cv] part {name} unreadable ({type(err).__name__}): training it again")
    return out


# -- the Train worker -----------------------------------------------------------------------------


def _train_loop(loop_config: dict[str, Any]) -> tuple[dict, dict] | None:
    """Runs on the Ray Train worker (or, in local mode, in the trial's own process): read this sex's
    images, fit on the training folds with the epoch chosen on an inner selection split, then predict
    the scored fold once. A worker hands the result back in its last checkpoint; local mode returns
    (state, meta)."""
    trial = cv.parse_trial(loop_config["trial"])
    local = loop_config["local"]
    device = ray_env.train_device()
    if device.type == "cpu":  # Ray sizes torch's pool from the worker's (fractional) CPUs: round it
        torch.set_num_threads(max(1, round(loop_config["threads"])))
    options = loop_config["storage_options"]
    with storage.open_output(loop_config["folds_uri"], "rb", options) as f:
        folds = pq.read_table(f).to_pandas()
    # A sex classifier's or pooled trial reads both sexes (trial.male is None), a per-sex trial its own sex.
    rows = cv.read_trial_rows(loop_config["registered_uri"], folds, trial.male, options)
    bank, ages, male = cv.load_bank(rows)
    fold = rows["fold"].to_numpy()
    train_cfg = TrainConfig(**loop_config["train"])
    # The scored fold chooses nothing: the epoch is chosen on a split of the training folds (by patient).
    fit_idx, select_idx = cv.grouped_inner_split(rows, np.flatnonzero(fold != trial.fold),
                                                 loop_config["inner_val_fraction"], train_cfg.seed, ages=ages)
    scored_idx = np.flatnonzero(fold == trial.fold)
    scored_ids = rows["id"].iloc[scored_idx].tolist()
    meta = {"scored_ids": scored_ids, "n_train": len(fit_idx), "n_select": len(select_idx),
            # where it trained (the trials table shows how trials were placed and packed on GPUs)
            "node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": [str(g) for g in ray.get_gpu_ids()],
            "device": str(device)}

    # A restarted worker (or a rerun of a cut-off run) continues from the last checkpoint; which
    # epoch that was goes into the trial's record (None: trained from the start).
    resume = None if local else resume_state()
    meta["resumed_from_epoch"] = None if resume is None else int(resume["epoch"])

    def report(epoch: int, metrics: dict, state: dict) -> None:
        # Every epoch's metrics go with a checkpoint: the state to resume from.
        report_state({**metrics, "best_select_mae": state["best"]["value"]}, state, meta)

    kind = model_kind(trial.kind, loop_config["input_scale"])
    # Test-time augmentation: the scored fold is predicted as scoring will predict (the bundle records it),
    # so the ensemble weights, gate and intervals are fitted on the predictions that ship.
    views = loop_config["tta_views"]
    sex_views = loop_config["sex_tta_views"]  # the sex classifier's own (cv.sex_tta_views)
    sex_input = male if trial.has_sex_input else None  # a pooled model is told each image's sex
    fitting = time.time()
    # Local mode inside a Tune trial has nothing to resume and may not call ray.train.report (Tune's
    # session owns reporting): no per-epoch reports there.
    if trial.is_sex_classifier:  # P(male) of the scored fold instead of its bone age
        result = fit_sex_model(bank, male, fit_idx, select_idx, kind, train_cfg, device,
                               None if local else report, resume)
        scored = predict_p_male(result.model, bank, scored_idx, kind, train_cfg.eval_batch_size, device,
                                train_cfg.bf16, train_cfg.channels_last, views=sex_views).cpu().numpy()
    else:
        watch = loop_config["watch_scored_fold"] and not trial.is_refit
        result = fit_zone_model(bank, ages, fit_idx, select_idx, kind, train_cfg, device,
                                None if local else report, resume,
                                watch_idx=scored_idx if watch else None, male=sex_input)
        # a refit (cv.ship "refit") trained on every CV image: there is no fold left to score
        scored = np.empty(0) if trial.is_refit else predict(
            result.model, bank, scored_idx, kind, train_cfg.eval_batch_size, device, train_cfg.bf16,
            train_cfg.channels_last, views=views, male=sex_input).cpu().numpy()
    meta["scored_pred"] = scored.tolist()
    meta["fit_seconds"] = round(time.time() - fitting, 2)  # the training loop and the scored fold's prediction
    if local:
        return result.state, meta
    report_state({"final": True}, result.state, meta)  # the last checkpoint carries the prediction
    return None


# -- the Tune trial -------------------------------------------------------------------------------


def trial_resources(cvc: CVConfig) -> dict[str, float]:
    """What one Tune trial's own process takes: all of the trial's CPUs (and GPUs) when it trains
    itself (local mode), else a sliver that waits on its Train worker."""
    if not cvc.train_in_trial_process:
        return dict(cvc.driver_resources) if cvc.driver_resources else {"CPU": DRIVER_CPUS}
    return {"CPU": cvc.cpus_per_trial, **({"GPU": cvc.gpus_per_trial} if cvc.gpus_per_trial > 0 else {})}


def _run_trial(params: dict[str, Any], shared: dict[str, Any]) -> None:
    """One Tune trial: fit its TorchTrainer, then write the trial's model and out-of-fold part.
    `params` (in Tune's records) names the trial; `shared` (the run's settings, storage options
    with any credentials) reaches it through the object store, never Tune's experiment files."""
    started = time.time()
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # no line per epoch report
    trial = cv.parse_trial(params["trial"])
    cvc = CVConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in shared["cv"].items()})
    options = shared["storage_options"]
    paths = cv_paths(shared["cv_uri"])
    storage_path, storage_filesystem = storage.arrow_location(paths["train"], options)
    local = cvc.train_in_trial_process
    use_gpu = cvc.gpus_per_trial > 0
    worker = {"CPU": max(cvc.cpus_per_trial - DRIVER_CPUS, DRIVER_CPUS)}
    if use_gpu:
        worker["GPU"] = cvc.gpus_per_trial  # a fraction packs several trials on one GPU
    trainer = TorchTrainer(
        _train_loop,
        torch_config=ray_env.torch_config(),
        train_loop_config={
            "trial": trial.name, "input_scale": cvc.input_scale_of(trial.kind), "threads": cvc.cpus_per_trial,
            "train": cv.train_config(cvc, trial, shared["seed"]).__dict__,
            "inner_val_fraction": cvc.inner_val_fraction, "watch_scored_fold": cvc.watch_scored_fold,
            "tta_views": cvc.tta_views, "sex_tta_views": cvc.sex_views,
            "folds_uri": paths["folds.parquet"], "registered_uri": shared["registered_uri"],
            "storage_options": options, "local": local,
        },
        scaling_config=(ray.train.ScalingConfig(num_workers=0) if local else
                        ray.train.ScalingConfig(num_workers=1, use_gpu=use_gpu, resources_per_worker=worker)),
        run_config=ray.train.RunConfig(
            name=trial.name,  # the trial's key, no timestamp: a rerun finds and resumes this run
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=cvc.max_failures),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=[ray_env.ReleaseOrphanedPlacementGroups()],
        ),
    )
    result = trainer.fit()
    state, meta = result.return_value if local else read_state(result.checkpoint)
    scored_ids, scored_pred = meta["scored_ids"], np.asarray(meta["scored_pred"], float)
    folds = cv_folds(paths["folds.parquet"], options).set_index("id")
    truth = folds.loc[scored_ids, "boneage"].to_numpy(float)
    if trial.is_sex_classifier:  # no bone age: the record's out-of-fold numbers are AUC and accuracy
        record = cv.record_from_state(state, meta["n_train"], meta["n_select"], len(scored_ids),
                                      float("nan"), time.time() - started)
        record["select_bce"] = record.pop("select_mae")  # the selection split's metric is cross-entropy
        record.update(cv.sex_record(scored_pred, folds.loc[scored_ids, "male"].to_numpy(bool)))
    else:
        oof_mae = float(np.mean(np.abs(scored_pred - truth))) if len(truth) else float("nan")  # NaN: a refit
        record = cv.record_from_state(state, meta["n_train"], meta["n_select"], len(scored_ids), oof_mae,
                                      time.time() - started)
    record["finished_at"] = time.time()
    record["resumed_from_epoch"] = meta.get("resumed_from_epoch")  # last checkpoint's epoch, or None
    record["local_train"] = local
    record["fit_seconds"] = meta.get("fit_seconds")
    record.update({k: meta.get(k) for k in ("node_id", "gpu_ids", "device")})

    # The model first, the part last: a part marks the trial finished.
    with storage.open_output(storage.join_uri(paths["models"], trial.name + ".pt"), "wb", options) as f:
        torch.save(cv.compact_model(state, trial, cvc), f)
    part = cv.part_table(trial, scored_ids, truth, scored_pred, record)
    cv.write_part(storage.join_uri(paths["parts"], trial.name + ".parquet"), part, options)

    # Tune keeps metrics only when they come with a checkpoint: the trial's record.
    with tempfile.TemporaryDirectory() as folder:
        with open(os.path.join(folder, "record.json"), "w") as f:
            json.dump({"trial": trial.name, **record}, f)
        ray.tune.report(record, checkpoint=ray.tune.Checkpoint.from_directory(folder))


def cv_folds(uri: str, storage_options: dict | None = None) -> pd.DataFrame:
    with storage.open_output(uri, "rb", storage_options) as f:
        return pq.read_table(f).to_pandas()


def fits_now(cvc: CVConfig) -> int:
    """How many trials the cluster's CPUs (and GPUs, when trials use them) hold at this moment: only
    what the run says at its start. Tune is not capped by it (see CVConfig.max_concurrent_trials): an
    autoscaler adds nodes for the trials that wait."""
    total = ray.cluster_resources()
    n = math.floor(total.get("CPU", 0) / cvc.cpus_per_trial + 1e-9)
    if cvc.gpus_per_trial > 0:
        n = min(n, math.floor(total.get("GPU", 0) / cvc.gpus_per_trial + 1e-9))
    return n


# -- progress and failing fast --------------------------------------------------------------------

# Failures of one trial's process or node (a lost node, a killed worker, out of memory): the trial is
# retried and the others go on. Any other error (a missing file or package, a wrong setting, a bug)
# will meet every trial alike: the first one stops the CV.
ONE_TRIAL_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                    ray.exceptions.NodeDiedError, ray.exceptions.OutOfMemoryError,
                    ray.exceptions.ObjectLostError, MemoryError, torch.OutOfMemoryError)


def root_cause(err: BaseException | None) -> BaseException | None:
    """The original exception under Ray's wrappers (RayTaskError, Train's worker/controller errors)."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        failures = getattr(err, "worker_failures", None)
        inner = (getattr(err, "cause", None) or (next(iter(failures.values())) if failures else None)
                 or getattr(err, "controller_failure", None) or err.__cause__)
        if inner is None:
            break
        err = inner
    return err


def fix_for(err: BaseException) -> str:
    """What a user can do about an error that hit every trial."""
    if isinstance(err, (FileNotFoundError, PermissionError)):
        return ("every node must read the run folder and the registered table: on a cluster use s3:// "
                "or shared storage for --output; locally check the path exists")
    if isinstance(err, ImportError):
        return "install the project and its dependencies on every Ray node (cluster.yaml setup_commands)"
    return "fix the cause (a setting in OUTPUT/config.yaml or the code), then rerun with the same --output"


class CVProgress(ray.tune.Callback):
    """Trials done/total with elapsed time, ETA and the last finished trial's out-of-fold MAE; records
    the first systemic error so that FirstSystemicError stops the experiment."""

    def __init__(self, total: int):
        self.total = total
        self.progress: Progress | None = None
        self.systemic: tuple[str, BaseException] | None = None
        self.failed: list[str] = []

    def setup(self, **info):
        self.progress = Progress(self.total, "CV trials", unit="trials")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result, name = trial.last_result or {}, trial.config["trial"]
        if "oof_auc" in result:  # a sex classifier's trial
            note = f"{name}: AUC {result['oof_auc']:.2f} out of fold"
        elif cv.parse_trial(name).is_refit:  # trained on every CV image: nothing out of fold
            note = f"{name}: refit on every CV image"
        else:
            note = f"{name}: {result['oof_mae']:.1f} months out of fold" if "oof_mae" in result else ""
        self.progress.update(1, note)

    def on_trial_error(self, iteration, trials, trial, **info):
        name = trial.config["trial"]
        self.failed.append(name)
        try:
            err = root_cause(trial.get_pickled_error())
        except Exception:  # noqa: BLE001 - an unreadable error is not a reason to stop
            err = None
        if err is not None and not isinstance(err, ONE_TRIAL_ERRORS) and self.systemic is None:
            self.systemic = (name, err)
        self.progress.update(1, f"{name} FAILED")

    def on_experiment_end(self, trials, **info):
        if self.progress is not None:
            self.progress.close()


class FirstSystemicError(ray.tune.Stopper):
    """Stops every trial once CVProgress has seen an error that every trial will meet."""

    def __init__(self, progress: CVProgress):
        self.progress = progress

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        return self.progress.systemic is not None


# -- the experiment -------------------------------------------------------------------------------


class CVFailed(RunError):
    """The CV stopped on an error that every trial would meet; the message names cause and fix."""


def run_cv(table: pd.DataFrame, registered_uri: str, config: Config,
           exclude: set[str] | frozenset[str] = frozenset()) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Cross-validate every configured (kind, sex, fold) not finished yet; return (oof, trials), also
    written to CV/oof.parquet and CV/trials.parquet. `table`: the registered table (no images needed),
    without the `exclude` ids (the locked test split), which an existing folds table must not hold.
    Raises RuntimeError, after writing the tables, when some trial failed (a rerun retries it)."""
    cvc, options = config.cv, config.data.storage_options
    cv_uri = storage.join_uri(config.output, "cv")
    paths = cv_paths(cv_uri)

    # 1. Folds, once per run folder: a rerun must score every image in the same fold.
    fs, folds_path = fsspec.core.url_to_fs(paths["folds.parquet"], **options)
    if fs.exists(folds_path):
        folds = cv_folds(paths["folds.parquet"], options)
        if int(folds["fold"].max()) + 1 != cvc.k:
            raise UserError(f"{paths['folds.parquet']} has {int(folds['fold'].max()) + 1} folds, not "
                            f"cv.k={cvc.k}: use a fresh --output")
        if folds["id"].isin(exclude).any():
            raise UserError(f"{paths['folds.parquet']} trains on images of the locked test split (it was "
                            "made before the split): use a fresh --output")
    else:
        folds = cv.folds_table(table, cvc.k, config.data.seed)
        with storage.open_output(paths["folds.parquet"], "wb", options) as f:
            folds.to_parquet(f, index=False)

    # 2. The trials still to train.
    trials = cv.all_trials(cvc, cv.sexes_present(folds, cvc.sexes))
    done = finished_trials(cv_uri, options)
    pending = cv.pending_trials(trials, done)
    print(f"[cv] {len(folds)} images in {cvc.k} folds; {len(trials)} trials, {len(trials) - len(pending)} "
          f"already finished, {len(pending)} to train")

    errors: list[str] = []
    if pending:
        # 3. One Tune trial per (kind, sex, fold) (pooled: per (kind, fold)); each builds its own
        # TorchTrainer (Train V2).
        storage_path, storage_filesystem = storage.arrow_location(cv_uri, options)
        cap, now = cvc.max_concurrent_trials, min(fits_now(cvc), len(pending))
        each = f"{cvc.cpus_per_trial:g} CPU, {cvc.gpus_per_trial:g} GPU each"
        if now < 1:
            print(f"[cv] the cluster has no room for a trial yet ({each}): the trials wait for an "
                  "autoscaler to add nodes (without one they wait forever: stop with Ctrl-C and lower "
                  "cv.cpus_per_trial / cv.gpus_per_trial)")
        else:
            print(f"[cv] {min(now, cap or now)} trials at a time on the cluster as it is ({each})"
                  + (f", at most {cap}" if cap else "; more if an autoscaler adds nodes"))
        shared = {"cv": cv_asdict(cvc), "seed": config.data.seed, "cv_uri": cv_uri,
                  "registered_uri": registered_uri, "storage_options": options}
        progress = CVProgress(len(pending))
        tuner = ray.tune.Tuner(
            ray.tune.with_resources(ray.tune.with_parameters(_run_trial, shared=shared), trial_resources(cvc)),
            param_space={"trial": ray.tune.grid_search([t.name for t in pending])},
            tune_config=ray.tune.TuneConfig(
                max_concurrent_trials=cap,  # None: whatever the cluster holds, as it grows
                reuse_actors=True,  # one trial process per slot, not per trial: a Python start-up saved
                trial_name_creator=lambda t: t.config["trial"],
                trial_dirname_creator=lambda t: t.config["trial"],
            ),
            run_config=ray.tune.RunConfig(
                name="tune", storage_path=storage_path, storage_filesystem=storage_filesystem,
                # Tune retries a failed trial: a local one from the start; one with a Train worker
                # (which retries itself from its checkpoint) when its own process died with its node,
                # and the new TorchTrainer of the same name resumes from the last checkpoint.
                failure_config=ray.tune.FailureConfig(max_failures=cvc.max_failures),
                stop=FirstSystemicError(progress),
                callbacks=[progress],
                verbose=0,
            ),
        )
        results = tuner.fit()
        # Tune's standing request for the trials' resources outlives the CV: cleared, idle GPU nodes
        # can go while the ensemble, bundle and report run (the twin kept them ~3 minutes longer).
        ray_env.release_resource_requests()
        if progress.systemic is not None:
            name, err = progress.systemic
            raise CVFailed(f"CV stopped at the first failed trial, {name}, with an error every trial would "
                           f"meet:\n  {type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}\n"
                           f"  fix: {fix_for(err)}\n  (the traceback: {storage.join_uri(cv_uri, 'tune', name, 'error.txt')})")
        errors = []
        for r in results:
            if r.error is not None:
                err = root_cause(r.error)
                errors.append(f"{r.config['trial']}: {type(err).__name__}: {err}".split("\n")[0])

    # 4. The experiment's tables, from every finished part (this run's and earlier runs').
    done = finished_trials(cv_uri, options)
    parts = [done[t.name] for t in trials if t.name in done]
    oof = cv.oof_table(folds, parts, list(cvc.kinds))
    if cvc.sex_kind is not None:
        oof = cv.with_p_male(oof, parts, cvc.sex_kind)
    records = cv.trials_table(parts)
    with storage.open_output(paths["oof.parquet"], "wb", options) as f:
        oof.to_parquet(f, index=False)
    with storage.open_output(paths["trials.parquet"], "wb", options) as f:
        records.to_parquet(f, index=False)
    if {"gpu_ids", "device"} <= set(records.columns):  # the workers' own log lines stay in Ray's files
        on_cpu = records[records["gpu_ids"].map(lambda g: g is not None and len(g) > 0) & (records["device"] == "cpu")]
        if len(on_cpu):
            print(f"[cv] {len(on_cpu)} trials were given a GPU by Ray but trained on the CPU: torch sees no CUDA "
                  "device there (a logical GPU, a CPU build of torch, or a driver mismatch)")
    if errors:
        raise RuntimeError(f"{len(errors)} CV trials failed (rerun to retry them):\n  " + "\n  ".join(errors))
    return oof, records


def cv_asdict(cvc: CVConfig) -> dict[str, Any]:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cvc.model_dump().items()}
