"""boneage: pediatric bone age assessment from hand radiographs, as a batch workflow on Ray.

The packages follow the pipeline, in the order data flows:
  data/          storage (local, s3://), listing and decoding PNG/JPEG/DICOM, labels, manifest, synthetic hands
  registration/  hand mask and contrast, key points, the affine warp into the 2080x1600 frame, QA
  model/         zone, key point and sex networks, augmentation, the torch training loop, weights
  validation/    k-fold CV and out-of-fold tables, ensembles, accuracy metrics
  clinical/      bone age SDS, the rejection gate, clinical columns, per-image cards, DICOM output for a PACS (SR + card)
  distributed/   the Ray adapters (Data, Train, Tune): the only package that imports ray
Above them: score (a bundle scoring registered images), bundle, report/, run (the workflow, stage by
stage), config (every setting), cli (the `boneage` command); errors and progress are shared by all.
"""

__version__ = "0.1.0"
