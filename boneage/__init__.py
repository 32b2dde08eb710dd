"""boneage: pediatric bone age assessment from hand radiographs, as a batch workflow on Ray.

Modules follow the pipeline stages:
  storage     local paths and s3:// URIs: bytes in and out, Arrow locations
  images      listing inputs, their ids, decoding PNG/JPEG (DICOM: dicom)
  labels      label and subject tables, key point annotations
  weights     model weights as safetensors (no pickle)
  synth       synthetic hand radiographs with ground truth (the embedded default data)
  frame       the registered frame, its key point targets and the zone boxes
  errors      the per-item error vocabulary carried as `status`/`error` columns
Only modules under workflows/ (and boneage.ray_* adapters) import ray.
"""

__version__ = "0.1.0"
