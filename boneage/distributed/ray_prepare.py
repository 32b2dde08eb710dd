"""Ray Data wiring of preparation (the work itself is in boneage.registration.prepare):

    manifest rows ─► analyse (CPU tasks) ─► key point model (actor pool, optional) ─► register (CPU tasks)
                 ─► registered/*.parquet, local or s3://
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pa_dataset
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

from boneage.registration import prepare
from boneage.data import storage
from boneage.config import Config

# The registered table's schema (docs/architecture.md). Written explicitly so that a batch in which
# every value of a column happens to be None still writes the right type.
REGISTERED_SCHEMA = pa.schema([
    ("id", pa.string()), ("uri", pa.string()), ("path", pa.string()), ("boneage", pa.float64()), ("male", pa.bool_()),
    ("group", pa.string()),  # the hashed patient (boneage.data.ingest); null: the image is its own group
    ("status", pa.string()), ("error", pa.string()),
    ("height", pa.int64()), ("width", pa.int64()), ("format", pa.string()),
    ("image_sex", pa.string()), ("image_age_months", pa.float64()), ("image_age_source", pa.string()),
    ("mask_area_fraction", pa.float64()), ("mask_doubtful", pa.bool_()),
    *[(c, pa.float64()) for c in prepare.KEYPOINT_COLUMNS],
    ("keypoint_source", pa.string()), ("keypoint_confidence", pa.float64()),
    ("keypoint_disagreement", pa.float64()),
    ("transform", pa.list_(pa.float64())), ("mirrored", pa.bool_()), ("scale", pa.float64()),
    ("thumb_frame_x", pa.float64()), ("thumb_frame_y", pa.float64()), ("frame_coverage", pa.float64()),
    ("registration_doubtful", pa.bool_()), ("keypoint_input", pa.binary()), ("registered_png", pa.binary()),
])


class _Analyse:
    def __init__(self, storage_options: Mapping[str, Any] | None, fetch: Callable[[str], bytes] | None = None):
        self.storage_options = dict(storage_options or {})
        self.fetch = fetch  # a DICOMweb input's reader: each instance is retrieved here, in the task

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = [prepare.analyse_row(r, self.storage_options, self.fetch) for r in batch.to_dict("records")]
        for row in rows:
            # Failed rows carry empty arrays, not None: a column must be all tensors for Arrow.
            for key, empty in _EMPTY_ARRAYS.items():
                row.setdefault(key, empty)
        return pd.DataFrame(rows)


_EMPTY_ARRAYS = {
    prepare._CLEAN: np.zeros((0, 0), np.uint8),
    prepare._MASK: np.zeros((0, 0), bool),
    prepare._GEOMETRIC: np.full((3, 2), np.nan),
    prepare._GEOMETRIC_CONFIDENCE: float("nan"),
}


def _register(batch: pd.DataFrame, schema: pa.Schema = REGISTERED_SCHEMA) -> pa.Table:
    rows = []
    for row in batch.to_dict("records"):
        model = [row.pop(c, None) for c in prepare.MODEL_KEYPOINT_COLUMNS]
        model = np.array(model, float).reshape(3, 2) if all(v is not None for v in model) else None
        rows.append(prepare.register_row(row, model))
    return pa.Table.from_pylist(rows, schema=schema)


def _analysed_without_arrays(batch: pd.DataFrame) -> pd.DataFrame:
    """The geometric key points as columns, the in-flight arrays dropped (for key point training)."""
    geometric = np.stack([np.asarray(g, float).reshape(6) for g in batch.pop(prepare._GEOMETRIC)])
    batch["keypoint_confidence"] = batch.pop(prepare._GEOMETRIC_CONFIDENCE)
    for i, column in enumerate(prepare.KEYPOINT_COLUMNS):
        batch[column] = geometric[:, i]
    return batch.drop(columns=[prepare._CLEAN, prepare._MASK], errors="ignore")


def from_manifest(manifest: pd.DataFrame, batch_size: int) -> ray.data.Dataset:
    records = manifest.astype(object).where(manifest.notna(), None).to_dict("records")
    # Enough blocks that every CPU of the cluster gets work, few enough that each block is a batch.
    blocks = max(1, min(len(records), math.ceil(len(records) / batch_size)))
    return ray.data.from_items(records, override_num_blocks=blocks)


def analyse_dataset(manifest: pd.DataFrame, config: Config) -> pd.DataFrame:
    """Analyse (decode, mask, geometric key points, key point model input) without registering."""
    ds = from_manifest(manifest, config.preprocess.batch_size)
    ds = ds.map_batches(_Analyse(config.data.storage_options), batch_size=config.preprocess.batch_size,
                        batch_format="pandas", num_cpus=config.preprocess.cpus_per_task)
    return ds.map_batches(_analysed_without_arrays, batch_format="pandas").to_pandas()


def prepare_dataset(manifest: pd.DataFrame, config: Config, keypoint_model: str | None = None,
                    keypoint_sha256: str | None = None, extra_columns: tuple[str, ...] = (),
                    fetch: Callable[[str], bytes] | None = None) -> ray.data.Dataset:
    """The lazy Ray Dataset of registered rows, one per manifest row. `keypoint_sha256`: the checksum
    the key point model must have (a bundle's manifest's), checked where it is loaded. `extra_columns`:
    string columns of the manifest carried along (e.g. DICOM UIDs when asked for). `fetch`: reads each
    row's uri in the decoding tasks instead of storage (a DICOMweb input: boneage.data.dicomweb.Reader)."""
    batch = config.preprocess.batch_size
    ds = from_manifest(manifest, batch).map_batches(
        _Analyse(config.data.storage_options, fetch), batch_size=batch, batch_format="pandas",
        num_cpus=config.preprocess.cpus_per_task)
    if keypoint_model:
        from boneage.distributed.ray_keypoints import KeypointPredictor

        kp = config.keypoints
        ds = ds.map_batches(
            KeypointPredictor,
            fn_constructor_args=(keypoint_model, config.data.storage_options, kp.gpus_per_actor > 0,
                                 keypoint_sha256),
            compute=ActorPoolStrategy(size=kp.actors),
            batch_size=batch * 4,
            batch_format="pandas",
            num_gpus=kp.gpus_per_actor,
            num_cpus=config.preprocess.cpus_per_actor,  # inference at 130x100 is cheap (PreprocessConfig)
        )
    schema = REGISTERED_SCHEMA
    for column in extra_columns:
        schema = schema.append(pa.field(column, pa.string()))
    return ds.map_batches(_register, fn_kwargs={"schema": schema}, batch_size=batch, batch_format="pandas",
                          num_cpus=config.preprocess.cpus_per_task)


def run_prepare(manifest: pd.DataFrame, out_uri: str, config: Config, keypoint_model: str | None = None
                ) -> pd.DataFrame:
    """Prepare every manifest row on Ray and write the registered table to `out_uri` (a folder of
    parquet files). Returns the table without its image bytes (for summaries and QA)."""
    ds = prepare_dataset(manifest, config, keypoint_model)
    path, filesystem = storage.arrow_location(out_uri, config.data.storage_options)
    # Replace, never append (Ray Data's default): a rerun on the same output, after a run cut off
    # mid-preprocessing or after a finished one, must leave each input's row exactly once.
    ds.write_parquet(path, filesystem=filesystem, mode=ray.data.SaveMode.OVERWRITE,
                     ray_remote_args={"num_cpus": config.preprocess.cpus_per_write})  # see PreprocessConfig
    return read_registered(out_uri, config.data.storage_options, with_images=False)


def read_registered(uri: str, storage_options: Mapping[str, Any] | None = None, with_images: bool = True,
                    ids: list[str] | None = None) -> pd.DataFrame:
    """The registered table written by run_prepare, sorted by id; only the rows of `ids` when given
    (the images of a whole RSNA run are ~10 GB: a contact sheet reads just its own)."""
    path, filesystem = storage.arrow_location(uri, storage_options)
    images = ("keypoint_input", "registered_png")
    columns = [f.name for f in REGISTERED_SCHEMA if with_images or f.name not in images]
    # Tables written before a column was added lack it: read what is there, the rest is null.
    present = set(pa_dataset.dataset(path, filesystem=filesystem, format="parquet").schema.names)
    filters = pc.field("id").isin(pa.array(list(ids), pa.string())) if ids is not None else None
    table = pq.read_table(path, filesystem=filesystem, columns=[c for c in columns if c in present], filters=filters)
    frame = table.to_pandas()
    for column in columns:
        if column not in frame:
            frame[column] = None
    return frame[columns].sort_values("id", kind="stable").reset_index(drop=True)
