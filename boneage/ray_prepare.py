"""Ray Data wiring of preparation: the manifest's rows are sharded over CPU workers, each batch runs
boneage.prepare.prepare_row, and the registered table is written as parquet (local or s3://).
Only this thin layer knows about Ray; the work itself is in boneage.prepare."""

from __future__ import annotations

import math
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from boneage import io, prepare
from boneage.config import Config

# The registered table's schema (see docs/architecture.md). Written explicitly so that a batch in
# which every value of a column happens to be None still writes the right type.
REGISTERED_SCHEMA = pa.schema([
    ("id", pa.string()), ("uri", pa.string()), ("boneage", pa.float64()), ("male", pa.bool_()),
    ("status", pa.string()), ("error", pa.string()),
    ("height", pa.int64()), ("width", pa.int64()), ("format", pa.string()),
    ("mask_area_fraction", pa.float64()), ("mask_doubtful", pa.bool_()),
    *[(c, pa.float64()) for c in prepare.KEYPOINT_COLUMNS],
    ("keypoint_source", pa.string()), ("keypoint_confidence", pa.float64()),
    ("transform", pa.list_(pa.float64())), ("mirrored", pa.bool_()), ("scale", pa.float64()),
    ("thumb_frame_x", pa.float64()), ("thumb_frame_y", pa.float64()), ("frame_coverage", pa.float64()),
    ("registration_doubtful", pa.bool_()), ("registered_png", pa.binary()),
])


class _PrepareBatch:
    """Callable over a pandas batch of manifest rows → registered-table rows (as an Arrow table)."""

    def __init__(self, storage_options: Mapping[str, Any] | None):
        self.storage_options = dict(storage_options or {})

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        rows = [prepare.prepare_row(row, self.storage_options) for row in batch.to_dict("records")]
        return pa.Table.from_pylist(rows, schema=REGISTERED_SCHEMA)


def prepare_dataset(manifest: pd.DataFrame, config: Config) -> ray.data.Dataset:
    """The lazy Ray Dataset of registered rows, one per manifest row."""
    records = manifest.astype(object).where(manifest.notna(), None).to_dict("records")
    batch = config.preprocess.batch_size
    # Enough blocks that every CPU of the cluster gets work, few enough that each block is a few batches.
    blocks = max(1, min(len(records), math.ceil(len(records) / batch)))
    ds = ray.data.from_items(records, override_num_blocks=blocks)
    return ds.map_batches(
        _PrepareBatch(config.data.storage_options),
        batch_size=batch,
        batch_format="pandas",
        num_cpus=1,
    )


def run_prepare(manifest: pd.DataFrame, out_uri: str, config: Config) -> pd.DataFrame:
    """Prepare every manifest row on Ray and write the registered table to `out_uri` (a folder of
    parquet files). Returns the table without its image bytes (for summaries and QA)."""
    ds = prepare_dataset(manifest, config)
    filesystem = io.arrow_filesystem(out_uri, config.data.storage_options)
    ds.write_parquet(io.strip_protocol(out_uri) if filesystem else out_uri, filesystem=filesystem)
    return read_registered(out_uri, config.data.storage_options, columns_without_images=True)


def read_registered(uri: str, storage_options: Mapping[str, Any] | None = None,
                    columns_without_images: bool = False) -> pd.DataFrame:
    """The registered table written by run_prepare, sorted by id."""
    filesystem = io.arrow_filesystem(uri, storage_options)
    columns = [f.name for f in REGISTERED_SCHEMA if not (columns_without_images and f.name == "registered_png")]
    table = pq.read_table(io.strip_protocol(uri) if filesystem else uri, filesystem=filesystem, columns=columns)
    return table.to_pandas().sort_values("id", kind="stable").reset_index(drop=True)
