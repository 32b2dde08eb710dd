"""The one checkpoint format of every Ray Train run here (key points, CV trials): a folder with the
torch training state (`state.pt`, what boneage.model.train's report hands over, resumable) and an optional
JSON of facts the trainer needs back (e.g. which ids the out-of-fold predictions belong to)."""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import ray.train
import torch

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def report_state(metrics: dict[str, Any], state: dict[str, Any], meta: dict[str, Any] | None = None) -> None:
    """ray.train.report with a checkpoint of `state` (saved now: its tensors are live) and `meta`."""
    with tempfile.TemporaryDirectory() as folder:
        torch.save(state, os.path.join(folder, STATE_FILE))
        if meta is not None:
            with open(os.path.join(folder, META_FILE), "w") as f:
                json.dump(meta, f)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))


def read_state(checkpoint: ray.train.Checkpoint) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, meta) of a checkpoint written by report_state, tensors on the CPU."""
    with checkpoint.as_directory() as folder:
        # weights_only: tensors and plain containers only, so a checkpoint cannot run code when read
        state = torch.load(os.path.join(folder, STATE_FILE), weights_only=True, map_location="cpu")
        meta_path = os.path.join(folder, META_FILE)
        meta = json.load(open(meta_path)) if os.path.exists(meta_path) else {}
    return state, meta


def resume_state() -> dict[str, Any] | None:
    """Inside a Train worker: the state to resume from (a restarted worker, or a rerun of a cut-off
    run of the same name), or None for a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    return None if checkpoint is None else read_state(checkpoint)[0]
