"""Batch scoring on Ray Data: a folder (or list, or s3:// prefix) of radiographs in, one table out.

    manifest ─► decode, mask, key points (CPU tasks) ─► key point model (actor pool) ─► register (CPU tasks)
             ─► BundleScorer (actor pool, GPU when asked): every fold model, the ensemble ─► parquet

The preparation stages are boneage.ray_prepare's, with the bundle's key point model; the scoring is
boneage.score. Every input file gives exactly one row: a file that cannot be read or registered keeps
its status and error, and the run goes on.
"""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from ray.data import ActorPoolStrategy

from boneage import score, storage
from boneage.bundle import keypoint_model_uri, load_bundle, read_manifest
from boneage.config import Config
from boneage.ray_prepare import prepare_dataset


class BundleScorer:
    """Ray Data actor: loads the bundle's fold models once, scores registered batches."""

    def __init__(self, bundle_uri: str, storage_options: Mapping[str, Any] | None, use_gpu: bool,
                 ages: Mapping[str, float]):
        device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
        self.models = score.BundleModels(load_bundle(bundle_uri, storage_options), device)
        self.ages = dict(ages)

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        batch["age_months"] = batch["id"].map(self.ages)
        return score.score_rows(batch, self.models)


def run_score(manifest: pd.DataFrame, bundle_uri: str, config: Config, out_uri: str, actors: int = 1,
              gpus_per_actor: float = 0.0, ages: Mapping[str, float] | None = None) -> pd.DataFrame:
    """Score every manifest row (id, uri, status, error, male) with the bundle; write the table to
    `out_uri` (one parquet file) and return it, sorted by id. `config`: the bundle's preprocessing
    and key point settings with this run's storage options."""
    keypoint_model = keypoint_model_uri(bundle_uri, read_manifest(bundle_uri, config.data.storage_options))
    ds = prepare_dataset(manifest, config, keypoint_model)
    ds = ds.map_batches(
        BundleScorer,
        fn_constructor_args=(bundle_uri, config.data.storage_options, gpus_per_actor > 0, dict(ages or {})),
        compute=ActorPoolStrategy(size=actors),
        batch_size=config.preprocess.batch_size * 4,
        batch_format="pandas",
        num_gpus=gpus_per_actor,
        # Half a CPU: a resource request unlike the CPU tasks' keeps Ray Data from fusing preparation
        # into the (few) scoring actors, and on CPU torch's threads use what the tasks leave idle.
        num_cpus=0.5,
    )
    table = ds.to_pandas().sort_values(["id", "uri"], kind="stable", na_position="last").reset_index(drop=True)
    with storage.open_output(out_uri, "wb", config.data.storage_options) as f:
        pq.write_table(pa.Table.from_pandas(table, preserve_index=False), f)
    return table
