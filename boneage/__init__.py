"""boneage: pediatric bone age assessment from hand radiographs, as a batch workflow on Ray.

Modules follow the pipeline stages:
  io          read images (PNG/JPEG/DICOM, local or s3://), labels and key point annotations
  synth       synthetic hand radiographs with ground truth (the embedded default data)
  frame       the registered frame, its key point targets and the zone boxes
  errors      the per-item error vocabulary carried as `status`/`error` columns
Only modules under workflows/ (and boneage.ray_* adapters) import ray.
"""

__version__ = "0.1.0"
