"""The stages of a run, in order, each reading and writing under `config.output`. Workflows and the
`boneage` command call these; Ray is started by the caller (boneage.ray_env.init_ray)."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from boneage import io, ingest, qa, synth
from boneage.config import Config
from boneage.errors import STATUS_OK, error_code


def save_config(config: Config) -> None:
    io.write_bytes(io.join_uri(config.output, "config.yaml"), config.to_yaml().encode(), config.data.storage_options)


def resolve_data(config: Config) -> Config:
    """With no images given, write the embedded synthetic data set (once) and point the config at it."""
    if config.data.images:
        return config
    if "://" in config.output:
        raise ValueError("the embedded synthetic data set is written locally: give --images, or a local --output")
    folder = Path(config.output) / "synthetic"
    if not (folder / "labels.csv").exists():  # a rerun reuses it: it is deterministic by seed anyway
        print(f"[data] writing {config.data.synthetic_n} synthetic radiographs to {folder}")
        synth.write_dataset(config.data.synthetic_n, folder, seed=config.data.seed,
                            size=tuple(config.data.synthetic_size), workers=1)
    config.data.images = str(folder / "images")
    config.data.labels = str(folder / "labels.csv")
    config.data.keypoints = str(folder / "keypoints.csv")
    return config


def preprocess(config: Config) -> pd.DataFrame:
    """Manifest → Ray Data preparation → registered parquet + QA sheet + summary. Returns the
    registered table without image bytes."""
    from boneage import ray_prepare  # imports ray: only when this stage runs

    started = time.time()
    manifest = ingest.build_manifest(config.data.images, config.data.labels, config.data.storage_options)
    print(f"[preprocess] {len(manifest)} items, {int((manifest.status != STATUS_OK).sum())} already failed at ingest")
    out = io.join_uri(config.output, "registered")
    table = ray_prepare.run_prepare(manifest, out, config)
    sheet_rows = ray_prepare.read_registered(out, config.data.storage_options)
    sheet = qa.contact_sheet(sheet_rows, limit=config.preprocess.qa_sheet_size)
    with io.open_output(io.join_uri(config.output, "qa", "registered_sheet.png"), "wb", config.data.storage_options) as f:
        sheet.save(f, format="PNG")
    summary = summarise(table, time.time() - started)
    io.write_bytes(io.join_uri(config.output, "qa", "preprocess_summary.json"),
                   json.dumps(summary, indent=2).encode(), config.data.storage_options)
    print_summary("preprocess", summary)
    return table


def summarise(table: pd.DataFrame, seconds: float) -> dict[str, Any]:
    ok = table[table.status == STATUS_OK]
    errors = table[table.status != STATUS_OK]
    return {
        "items": int(len(table)),
        "ok": int(len(ok)),
        "errors": int(len(errors)),
        "errors_by_code": {str(k): int(v) for k, v in errors.error.map(error_code).value_counts().items()},
        "registration_doubtful": int(ok.registration_doubtful.fillna(False).astype(bool).sum()),
        "mask_doubtful": int(ok.mask_doubtful.fillna(False).astype(bool).sum()),
        "seconds": round(seconds, 1),
        "failed_items": [{"id": r.id, "uri": r.uri, "error": r.error} for r in errors.itertuples()][:50],
    }


def print_summary(stage: str, summary: dict[str, Any]) -> None:
    print(f"[{stage}] {summary['ok']}/{summary['items']} ok, {summary['errors']} errors "
          f"{summary['errors_by_code'] or ''}, {summary['registration_doubtful']} registrations doubtful, "
          f"{summary['seconds']} s")
    for item in summary["failed_items"][:10]:
        print(f"  {item['id']}: {item['error']}")
