"""Stage 1, data in: storage (local or s3://), listing and decoding radiographs (PNG, JPEG, DICOM), label
and key point tables, the manifest of a run, and the synthetic radiographs of the embedded default."""
