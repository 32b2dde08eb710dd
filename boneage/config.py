"""One typed configuration for every stage. Defaults are the embedded CPU run (synthetic data, minutes on a
laptop); YAML presets in configs/ override them (configs/rsna.yaml: the seed's RSNA-scale settings), and
command-line flags override the YAML. The resolved configuration is saved next to every artefact."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


@dataclass
class DataConfig:
    images: str | None = None  # folder, s3:// prefix, or .txt list of URIs; None = make synthetic radiographs
    labels: str | None = None  # RSNA-style label CSV (any of the three RSNA variants)
    keypoints: str | None = None  # key point annotations (VIA CSV/JSON or plain CSV), optional
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


@dataclass
class KeypointConfig:
    # "model": the key point CNN (trained here when no `model` is given), with the geometric estimate
    # from the hand mask as fallback where the model's registration fails QA; "geometric": no CNN.
    source: str = "model"
    model: str | None = None  # a trained key point model (.pt, local or s3://); None = train one
    # Training: the seed's VGG-like net (blocks 64-128-256, 2 FC of 512) on the image reduced to 130x100.
    epochs: int = 40
    batch_size: int = 32
    lr: float = 2e-3
    width_mult: float = 0.5  # half the seed's widths: enough for 130x100 inputs on a CPU (rsna.yaml: 1.0)
    patience: int = 10
    val_fraction: float = 0.15
    # Images without annotations join training with their geometric key points as pseudo-labels when
    # the geometric estimate is at least this confident.
    pseudo_label_confidence: float = 0.8
    max_training_images: int = 3000
    use_gpu: bool = False
    actors: int = 1  # prediction actor pool size
    gpus_per_actor: float = 0.0  # >0 on a GPU cluster: the net is tiny, a fraction of a GPU suffices


@dataclass
class RayConfig:
    address: str | None = None  # None = start a local Ray (or join RAY_ADDRESS when set)
    num_cpus: int | None = None  # for a local Ray; None = all cores


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    keypoints: KeypointConfig = field(default_factory=KeypointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    output: str = "runs/embedded"  # local folder or s3:// URI for everything the run writes

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(_plain(self.to_dict()), sort_keys=False)


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
            raise ValueError(f"unknown config key {where}{key!r}; known: {', '.join(known)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config key {where}{key!r} must be a mapping")
            _update(current, value, f"{where}{key}.")
        else:
            if isinstance(current, tuple) and isinstance(value, list):
                value = tuple(value)
            setattr(obj, key, value)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> Config:
    """Defaults, then the YAML file (if any), then `overrides` (nested dicts, e.g. from flags)."""
    config = Config()
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"{path}: a config file must be a YAML mapping")
        _update(config, loaded)
    if overrides:
        _update(config, overrides)
    return config
