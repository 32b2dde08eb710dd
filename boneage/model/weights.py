"""Model weights without pickle. Loading a pickle (``torch.load(weights_only=False)``) can run any code
the file's author wrote; a bundle travels between sites, so its weights must be data only.

A training state (nested dicts and lists of tensors, numbers, strings, None: what boneage.model.train and
boneage.validation.cv.compact_model produce) is stored as one safetensors file: the tensors as tensors, the rest
as JSON in the file's metadata, with a placeholder where each tensor was. :func:`load_state` reads
that, or a ``.pt`` file through ``torch.load(weights_only=True)`` (tensors and plain containers only,
for the CV's own models and key point models from older runs); anything else is refused.
"""

from __future__ import annotations

import io
import json
import struct
from typing import Any

import numpy as np
import torch

FORMAT = "boneage-state/1"  # the metadata key holding the JSON, and its version
_TENSOR = "__tensor__"


class UnsafeWeights(ValueError):
    """The bytes are not weights this module can load without running code from them."""


def _split(value: Any, tensors: dict[str, torch.Tensor], path: str) -> Any:
    """`value` as JSON-able data, its tensors moved into `tensors` under their path."""
    if isinstance(value, torch.Tensor):
        # contiguous copies: safetensors refuses views and tensors sharing storage
        tensors[path] = value.detach().cpu().contiguous().clone()
        return {_TENSOR: path}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"{path or 'state'}: only string keys can be stored, got {list(value)[:3]}")
        return {k: _split(v, tensors, f"{path}.{k}" if path else k) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_split(v, tensors, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"{path}: {type(value).__name__} cannot be stored as weights (tensors and JSON only)")


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TENSOR}:
            return tensors[value[_TENSOR]]
        return {k: _join(v, tensors) for k, v in value.items()}
    if isinstance(value, list):
        return [_join(v, tensors) for v in value]
    return value


def to_bytes(state: dict[str, Any]) -> bytes:
    """A training state as safetensors bytes."""
    from safetensors.torch import save

    tensors: dict[str, torch.Tensor] = {}
    tree = _split(state, tensors, "")
    return save(tensors, metadata={FORMAT: json.dumps(tree, allow_nan=True)})


def is_safetensors(data: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then a JSON header."""
    if len(data) < 10:
        return False
    (n,) = struct.unpack("<Q", data[:8])
    return 2 <= n <= len(data) - 8 and data[8:9] == b"{"


def from_bytes(data: bytes) -> dict[str, Any]:
    """The training state of :func:`to_bytes` (tensors on the CPU); UnsafeWeights if it is not one."""
    from safetensors.torch import load

    if not is_safetensors(data):
        raise UnsafeWeights("not a safetensors file (weights are read as data only, never unpickled)")
    try:
        tensors = load(data)
        (n,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except Exception as err:
        raise UnsafeWeights(f"damaged safetensors file: {err}") from None
    if FORMAT not in metadata:
        raise UnsafeWeights(f"a safetensors file without boneage's state ({FORMAT}) in its metadata")
    return _join(json.loads(metadata[FORMAT]), tensors)


def load_state(data: bytes) -> dict[str, Any]:
    """A training state from safetensors bytes, or from a ``.pt`` file that ``torch.load`` can read with
    ``weights_only=True`` (which refuses any object that would run code); UnsafeWeights otherwise."""
    if is_safetensors(data):
        return from_bytes(data)
    try:
        return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")
    except Exception as err:  # torch's UnpicklingError names the global it refused
        raise UnsafeWeights(f"not safetensors, and not loadable as tensors only: {str(err).splitlines()[0]}") from None
