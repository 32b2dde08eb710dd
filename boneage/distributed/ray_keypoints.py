"""The key point model on Ray: training with Ray Train (one TorchTrainer worker: the net is small) and
prediction as a Ray Data actor pool. The torch work itself is boneage.model.train.fit_keypoint_model."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import ray
import ray.train
import torch
from ray.train.torch import TorchTrainer

from boneage.registration import prepare
from boneage.distributed import ray_env
from boneage.data import storage
from boneage.model import keypoint_model, train, weights
from boneage.config import Config
from boneage.progress import Progress
from boneage.distributed.ray_checkpoints import read_state, report_state, resume_state



def training_set(analysed: pd.DataFrame, annotations: dict[str, np.ndarray], min_confidence: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(inputs uint8 (N,1,130,100), targets (N,3,2) in [0,1] of the image, is_annotation (N,)).

    Annotated images use their annotation; the others, where the geometric estimate is confident,
    use it as a pseudo-label (the seed hand-labelled 800 images; we have few or none)."""
    inputs, targets, annotated = [], [], []
    # In id order: Ray Data hands rows back in the order its tasks finish, and a training set in another
    # order trains another model (the same command gave two key point models in two CI runs).
    analysed = analysed.sort_values("id", kind="stable")
    for row in analysed[analysed.status == "ok"].itertuples():
        size = np.array([row.width, row.height], float)
        if row.id in annotations:
            points, is_annotation = annotations[row.id], True
        elif row.keypoint_confidence is not None and row.keypoint_confidence >= min_confidence:
            points, is_annotation = np.array([getattr(row, c) for c in prepare.KEYPOINT_COLUMNS]).reshape(3, 2), False
        else:
            continue
        if not np.all(np.isfinite(points)):
            continue
        inputs.append(prepare.decode_png(row.keypoint_input)[None])
        targets.append(np.asarray(points, float) / size)
        annotated.append(is_annotation)
    if not inputs:
        return np.zeros((0, 1, *prepare.KEYPOINT_INPUT_HW), np.uint8), np.zeros((0, 3, 2)), np.zeros(0, bool)
    return np.stack(inputs), np.stack(targets).astype(np.float32), np.array(annotated)


def _train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """Runs on the Ray Train worker (reporting every epoch with a resumable checkpoint), or in local
    mode in the calling process (a progress line per epoch; returns the final state)."""
    inputs, targets = ray.get(loop_config["data"])
    # writable copies: the object store hands out read-only views
    inputs, targets = torch.from_numpy(np.array(inputs)), np.array(targets)
    cfg = train.TrainConfig(**loop_config["train"])
    n = len(inputs)
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_val = max(1, int(round(n * loop_config["val_fraction"])))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    device = ray_env.train_device()
    if loop_config["local"]:
        progress = Progress(cfg.epochs, "key point epochs", unit="epochs", every=15)

        def report(epoch, metrics, state):
            progress.update(1, f"validation error {metrics['val_dist_px']:.0f} frame px")

        try:
            return train.fit_keypoint_model(inputs, targets, train_idx, val_idx, cfg, device, report).state
        finally:
            progress.close()
    # A restarted worker continues from its last epoch.
    train.fit_keypoint_model(inputs, targets, train_idx, val_idx, cfg, device,
                             lambda epoch, metrics, state: report_state(metrics, state), resume_state())
    return None


def fit(inputs: np.ndarray, targets: np.ndarray, config: Config, out_uri: str) -> dict[str, Any]:
    """Train the key point model with Ray Train; write its best weights to `out_uri` (a .pt file).
    On CPU in Ray Train's local mode (in this process: no worker to start, no checkpoint per epoch),
    on a GPU as one Train worker that checkpoints every epoch and resumes after a failure."""
    kp = config.keypoints
    local = not kp.use_gpu if kp.local_train is None else bool(kp.local_train)
    storage_path, storage_filesystem = storage.arrow_location(storage.join_uri(config.output, "train"),
                                                         config.data.storage_options)
    trainer = TorchTrainer(
        _train_loop,
        torch_config=ray_env.torch_config(),
        train_loop_config={"data": ray.put((inputs, targets)), "val_fraction": kp.val_fraction, "local": local,
                           "train": {"epochs": kp.epochs, "batch_size": kp.batch_size, "lr": kp.lr,
                                     "width_mult": kp.width_mult, "patience": kp.patience,
                                     "seed": config.data.seed, "schedule": "onecycle"}},
        scaling_config=(ray.train.ScalingConfig(num_workers=0) if local else
                        ray.train.ScalingConfig(num_workers=1, use_gpu=kp.use_gpu,
                                                resources_per_worker={"CPU": _worker_cpus(kp.use_gpu, kp.cpus_per_worker)})),
        run_config=ray.train.RunConfig(
            name="keypoints",
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=1),
            failure_config=ray.train.FailureConfig(max_failures=2),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),  # not a line per checkpoint
            callbacks=[ray_env.ReleaseOrphanedPlacementGroups()],
        ),
    )
    result = trainer.fit()
    state = result.return_value if local else read_state(result.checkpoint)[0]
    compact = {"spec": state["spec"], "best": {"model": state["best"]["model"]}, "metrics": state["best"]["metrics"]}
    storage.write_bytes(out_uri, weights.to_bytes(compact), config.data.storage_options)  # no pickle
    return compact["metrics"]


def _worker_cpus(use_gpu: bool, configured: float | None = None) -> float:
    """keypoints.cpus_per_worker, else: on CPU the one training worker gets the CPUs of a node (Ray
    sizes torch's thread pool by them); on GPU one CPU is enough: the data is on the device."""
    if configured:
        return float(configured)
    if use_gpu:
        return 1
    return max(1, min(node["Resources"].get("CPU", 1) for node in ray.nodes() if node["Alive"]))


class KeypointPredictor:
    """Ray Data actor: loads the model once, adds model_<point>_<x|y> columns (image pixels)."""

    def __init__(self, model_uri: str, storage_options: dict | None = None, use_gpu: bool = False,
                 sha256: str | None = None):
        # A bundle's model is checked against its manifest here too: these actors may run long after,
        # and elsewhere than, the driver's check.
        self.device = ray_env.actor_device(use_gpu, "keypoints")
        self.model = keypoint_model.load(storage.read_bytes(model_uri, storage_options), model_uri, sha256,
                                         self.device)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        ok = (batch["status"] == "ok").to_numpy() & batch["keypoint_input"].notna().to_numpy()
        predicted = np.full((len(batch), 3, 2), np.nan)
        if ok.any():
            images = np.stack([prepare.decode_png(b) for b in batch["keypoint_input"][ok]])
            size = np.stack([batch["width"][ok].to_numpy(float), batch["height"][ok].to_numpy(float)], 1)
            predicted[ok] = keypoint_model.predict_pixels(self.model, images, size, self.device)
        for i, column in enumerate(prepare.MODEL_KEYPOINT_COLUMNS):
            batch[column] = predicted.reshape(len(batch), 6)[:, i]
        return batch
