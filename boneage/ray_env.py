"""Starting or joining Ray, the one place workflows do it."""

from __future__ import annotations

import os

import ray

from boneage.config import RayConfig


def init_ray(config: RayConfig) -> None:
    """Join `config.address` (or RAY_ADDRESS, as `ray job submit` sets it), else start a local Ray."""
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # The dashboard (on 127.0.0.1 only) serves Ray's state API, which Ray Train uses to watch its
        # controller; without it Train logs a warning every few seconds.
        ray.init(num_cpus=config.num_cpus, log_to_driver=True)
