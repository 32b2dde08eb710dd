"""The key point model at prediction time, as plain functions: loading a bundle's model (checked against
its manifest's checksum, never unpickled) and predicting an image's three key points in its own pixels.
Batch scoring's actor (boneage.distributed.ray_keypoints.KeypointPredictor) and the per-image path
(boneage.score.prepare_one) both use them."""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from boneage.errors import UserError
from boneage.model import train, weights


def load(data: bytes, uri: str, sha256: str | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The model from its file's bytes; UserError when they do not match `sha256` (a bundle's manifest's)
    or are not a safe weights file."""
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise UserError(f"key point model {uri} does not match its checksum in the bundle's manifest")
    try:
        state = weights.load_state(data)  # safetensors, or a tensors-only .pt: never a pickle
    except weights.UnsafeWeights as err:
        raise UserError(f"key point model {uri} refused: {err}") from None
    return train.model_from_state(state).to(device)


def predict_pixels(model: torch.nn.Module, inputs: np.ndarray, sizes: np.ndarray,
                   device: str | torch.device = "cpu") -> np.ndarray:
    """(n, 3, 2) key points in image pixels from `inputs` (n, 130, 100) uint8, the key point model's
    input (boneage.registration.prepare.keypoint_input) and `sizes` (n, 2): each image's (width, height)."""
    images = torch.from_numpy(np.array(inputs, np.uint8)[:, None])  # a writable copy (PNG decodes are read-only)
    points = train.predict_keypoints(model, images, np.arange(len(images)), device=device).cpu().numpy()
    return points * np.asarray(sizes, float)[:, None, :]
