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
        # No dashboard for a local run: it only costs start-up time and a port.
        ray.init(num_cpus=config.num_cpus, include_dashboard=False, log_to_driver=True)
