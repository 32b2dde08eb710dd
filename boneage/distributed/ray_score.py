"""Batch scoring on Ray Data: a folder (or list, or s3:// prefix) of radiographs in, parquet out, written
as it goes. Two pipelines give the same rows (`boneage score --pipeline`; auto: lean on CPU, staged on GPUs):

    lean:   manifest ─► LeanScorer (actor pool, one per CPU core): decode, mask, key points, key point
                        model, register, every fold model, the ensemble, in one process per batch
                     ─► write_parquet: one part per block, as blocks finish
    staged: manifest ─► decode, mask, key points (CPU tasks) ─► key point model (actor pool) ─► register
                        (CPU tasks) ─► BundleScorer (actor pool, GPU when asked) ─► write_parquet

The preparation stages are boneage.distributed.ray_prepare's, with the bundle's key point model; the scoring is
boneage.score. Every input file gives exactly one row: a file that cannot be read or registered keeps
its status and error, and the run goes on.

Output (see docs/scoring.md): parts under `parts_uri(out)` (the output folder itself when `out` does
not end in .parquet), each written by Ray Data as soon as its block is scored, so the driver never
holds the table and a crash keeps every finished part. A rerun on the same output scores only the files
that have no row in a part yet. With `out` ending in .parquet the parts are then copied, one at a time,
into that single file.
"""

from __future__ import annotations

import json
import posixpath
import time
import uuid
from typing import Any, Mapping

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from ray.data import ActorPoolStrategy

import boneage
from boneage.clinical import cards, columns, dicom_out
from boneage.distributed import ray_env
from boneage import score
from boneage.data import storage
from boneage.bundle import keypoint_model_sha256, keypoint_model_uri, load_bundle, read_manifest
from boneage.config import Config
from boneage.errors import UserError
from boneage.distributed.ray_prepare import from_manifest, prepare_dataset
from boneage.model import keypoint_model
from boneage.registration import prepare

PARTS_SUFFIX = ".parts"


class BundleScorer:
    """Ray Data actor: loads the bundle's fold models once, scores registered batches into the output
    schema with the run's provenance columns."""

    def __init__(self, bundle_uri: str, storage_options: Mapping[str, Any] | None, use_gpu: bool,
                 ages: Mapping[str, float], provenance: Mapping[str, Any], uid_columns: tuple[str, ...] = (),
                 cards_dir: str | None = None, dicom_dir: str | None = None, reader=None, stow: bool = False):
        device = ray_env.actor_device(use_gpu, "score")
        self.models = score.BundleModels(load_bundle(bundle_uri, storage_options), device)
        self.ages = dict(ages)
        self.uid_columns = tuple(uid_columns)
        self.schema = score.output_schema(self.models.kinds, self.uid_columns, cards=bool(cards_dir),
                                          dicom=bool(dicom_dir), stow=stow)
        self.cards_dir, self.dicom_dir, self.storage_options = cards_dir, dicom_dir, storage_options
        # A DICOMweb input's reader (boneage.data.dicomweb): the source headers, and STOW-RS with --stow.
        self.reader, self.stow = reader, stow
        self.bundle_sha256 = provenance["bundle"]["sha256"]
        self.bundle_version = provenance["bundle"].get("version")
        self.scored_at = pd.Timestamp(provenance["scored_at"])

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        return self._score(batch)

    def _score(self, batch: pd.DataFrame, images: list | None = None) -> pa.Table:
        """The output table of registered rows; `images`: their registered images as arrays (the lean
        path) in place of their registered_png."""
        batch["age_months"] = batch["id"].map(self.ages)
        out = score.score_rows(batch, self.models, images=images)
        out["bundle_sha256"] = self.bundle_sha256  # before the cards: they name the bundle
        dicom = self.dicom_dir or self.stow
        pngs: list | None = [] if dicom else None  # --dicom-out / --stow put each card into a Secondary Capture
        card_errors = None
        if self.cards_dir or dicom:  # --cards: a PNG per image (boneage.clinical.cards)
            uris, card_errors = cards.write_cards(batch, out, self.models, self.cards_dir, self.storage_options,
                                                  pngs=pngs, images=images)
            if self.cards_dir:
                out["card"], out["card_error"] = uris, card_errors
        if dicom:  # an SR and the card's SC per DICOM input (boneage.clinical.dicom_out), to files and/or STOW-RS
            self._dicom(out, pngs, card_errors)
        out["scored_at"] = self.scored_at
        for column in self.uid_columns:
            out[column] = batch[column].to_numpy() if column in batch else None
        out = out.astype(object).where(out.notna(), None)  # NaN -> null, so that bool/int columns convert
        return pa.Table.from_pandas(out[self.schema.names], schema=self.schema, preserve_index=False)

    def _dicom(self, out: pd.DataFrame, pngs: list, card_errors: list | None) -> None:
        """dicom_sr_uid, dicom_error (and with --stow dicom_stow) of a scored batch: the objects are
        written under --dicom-out and/or sent to the DICOMweb service the images came from."""
        level = (self.models.interval or {}).get("level")
        results = dicom_out.make_outputs(out, pngs, self.bundle_sha256, self.bundle_version, level,
                                         self.storage_options, card_errors,
                                         read_header=self.reader.header if self.reader is not None else None)
        if self.dicom_dir:
            results = dicom_out.write_files(results, out["id"].tolist(), self.dicom_dir, self.storage_options)
        if self.stow:
            out["dicom_stow"] = dicom_out.stow(results, self.reader.store)
        out["dicom_sr_uid"] = [r.sr_uid for r in results]
        out["dicom_error"] = [r.reason for r in results]


def parts_uri(out_uri: str) -> str:
    """Where the parts of `out_uri` go: OUT.parts/ beside a .parquet file, else the folder OUT itself."""
    return out_uri.rstrip("/") + PARTS_SUFFIX if out_uri.lower().endswith(".parquet") else out_uri.rstrip("/")


def _part_files(folder: str, storage_options) -> list[str]:
    fs, path = storage.filesystem(folder, storage_options)
    fs.invalidate_cache(path)
    if not fs.isdir(path):
        return []
    return sorted(p for p in fs.find(path) if p.endswith(".parquet") and not posixpath.basename(p).startswith("."))


def scored_uris(out_uri: str, bundle_sha256: str, storage_options: Mapping[str, Any] | None = None) -> set[str]:
    """The URIs that already have a settled row in the parts of `out_uri` (score.settled_uris: a file
    whose latest row is a transient error, e.g. read_failed, is scored again, and read_output then keeps
    its new row). A part that cannot be read (cut off by a crash while it was written) is removed: its
    files have no row and are scored again. Rows of another bundle are a UserError: one output, one bundle."""
    fs, _ = storage.filesystem(out_uri, storage_options)
    rows: list[pd.DataFrame] = []
    for part in _part_files(parts_uri(out_uri), storage_options):
        try:
            with fs.open(part, "rb") as f:
                stowed = ["dicom_stow"] if "dicom_stow" in pq.read_schema(f).names else []  # failed: again
                f.seek(0)
                table = pq.read_table(f, columns=["uri", "bundle_sha256", "error", "scored_at", *stowed])
        except Exception as err:
            print(f"[score] removing a part that cannot be read (a run cut off while writing it?): {part}: {err}")
            fs.rm(part)
            continue
        other = set(table.column("bundle_sha256").to_pylist()) - {bundle_sha256}
        if other:
            raise UserError(f"{out_uri} already holds rows scored with another bundle (manifest sha256 "
                            f"{sorted(other)[0][:12]}...): score into another --out, or delete {parts_uri(out_uri)}")
        rows.append(table.to_pandas())
    return score.settled_uris(pd.concat(rows, ignore_index=True)) if rows else set()


def run_score(manifest: pd.DataFrame, bundle_uri: str, config: Config, out_uri: str, provenance: Mapping[str, Any],
              actors: int = 1, gpus_per_actor: float = 0.0, ages: Mapping[str, float] | None = None,
              uid_columns: tuple[str, ...] = (), cards: str | None = None, dicom_dir: str | None = None,
              reader=None, stow: bool = False, pipeline: str = "staged") -> dict[str, Any]:
    """Score the manifest rows (id, uri, path, status, error, male) that have no row in `out_uri` yet and
    write them as parquet parts as they finish; then, for an `out_uri` ending in .parquet, gather all
    parts into that file. `config`: the bundle's preprocessing and key point settings with this run's
    storage options. `provenance` goes into every part's and the file's parquet metadata. `cards`: a folder
    for a PNG card per image; `dicom_dir`: a folder for an SR and the card's SC per DICOM input
    (boneage.clinical.dicom_out). `reader`: a DICOMweb input's boneage.data.dicomweb.Reader, which
    retrieves each instance in the decoding tasks; `stow`: send each SR and SC back to it (STOW-RS).
    `pipeline`: "lean", every stage of a batch in one of `actors` LeanScorer actors (CPU), or "staged",
    preparation in CPU tasks and scoring in `actors` BundleScorer actors (with `gpus_per_actor` each).
    Returns {"skipped": rows already there, "scored": rows written now}."""
    options = config.data.storage_options
    done = scored_uris(out_uri, provenance["bundle"]["sha256"], options)
    todo = manifest[~manifest["uri"].isin(done)] if done else manifest
    if done:
        print(f"[score] {len(manifest) - len(todo)} files already have a row in {parts_uri(out_uri)}; "
              f"scoring the other {len(todo)} (a transient error such as read_failed is retried)")
    if len(todo):
        manifest_record = read_manifest(bundle_uri, options)
        schema = score.output_schema(list(manifest_record["kinds"]), uid_columns, cards=bool(cards),
                                     dicom=bool(dicom_dir), stow=stow)
        scorer_args = (dict(ages or {}), dict(provenance), tuple(uid_columns), cards, dicom_dir, reader, stow)
        keypoints = (keypoint_model_uri(bundle_uri, manifest_record), keypoint_model_sha256(manifest_record))
        if pipeline == "lean":
            batch = config.preprocess.batch_size
            ds = from_manifest(todo, batch).map_batches(
                LeanScorer, fn_constructor_args=(bundle_uri, options, *keypoints, *scorer_args),
                compute=ActorPoolStrategy(size=actors), batch_size=batch, batch_format="pandas",
                num_cpus=LEAN_CPUS_PER_ACTOR)
        else:
            ds = prepare_dataset(todo, config, *keypoints, extra_columns=uid_columns, fetch=reader)
            ds = ds.map_batches(
                BundleScorer,
                fn_constructor_args=(bundle_uri, options, gpus_per_actor > 0, *scorer_args),
                compute=ActorPoolStrategy(size=actors),
                batch_size=config.preprocess.batch_size * 4,
                batch_format="pandas",
                num_gpus=gpus_per_actor,
                num_cpus=config.preprocess.cpus_per_actor,  # see PreprocessConfig
            )
        path, filesystem = storage.arrow_location(parts_uri(out_uri), options)
        # APPEND (Ray Data's default) with this run's own file prefix: the parts of earlier runs stay.
        ds.write_parquet(path, filesystem=filesystem, mode=ray.data.SaveMode.APPEND,
                         filename_provider=_RunFiles(provenance["run_id"]),
                         arrow_parquet_args_fn=lambda: {"schema": _with_metadata(schema, provenance)},
                         ray_remote_args={"num_cpus": config.preprocess.cpus_per_write})  # see PreprocessConfig
    if out_uri.lower().endswith(".parquet"):
        gather(out_uri, provenance, options)
    return {"skipped": int(len(manifest) - len(todo)), "scored": int(len(todo))}


class LeanScorer(BundleScorer):
    """Ray Data actor of the lean path (issue 25): a batch of manifest rows is decoded, analysed, put
    through the key point model, registered and scored in this one process, with the functions of the
    per-image path (boneage.score.register_analysed, as `boneage serve`): no registered image is
    PNG-encoded and decoded again, no block of full-size arrays crosses the object store between stages,
    and each actor keeps one core busy (LEAN_CPUS_PER_ACTOR) where the staged pipeline's half-CPU actors
    and whole-CPU tasks left cores idle."""

    def __init__(self, bundle_uri: str, storage_options: Mapping[str, Any] | None, keypoint_uri: str | None,
                 keypoint_sha256: str | None, *scorer_args):
        super().__init__(bundle_uri, storage_options, False, *scorer_args)
        self.keypoint_model = None
        if keypoint_uri:  # checked against the bundle's manifest here too, as KeypointPredictor does
            self.keypoint_model = keypoint_model.load(storage.read_bytes(keypoint_uri, storage_options),
                                                      keypoint_uri, keypoint_sha256, self.models.device)

    def __call__(self, batch: pd.DataFrame) -> pa.Table:
        # a DICOMweb input's reader (self.reader) retrieves each instance here
        analysed = [prepare.analyse_row(row, self.storage_options, self.reader) for row in batch.to_dict("records")]
        registered = score.register_analysed(analysed, self.keypoint_model, self.models.device)
        images = [row.pop(prepare.REGISTERED_IMAGE, None) for row in registered]
        return self._score(pd.DataFrame(registered), images)


# Each lean actor's CPUs: one core's work, less a tenth so that the parquet writes (cpus_per_write) still
# fit beside one actor per core. Ray gives an actor of under 2 CPUs one torch thread (OMP_NUM_THREADS).
LEAN_CPUS_PER_ACTOR = 0.9


def lean_actors(cluster_cpus: float, cpus_per_write: float) -> int:
    """Lean actors that fill a cluster of `cluster_cpus` CPUs and leave room for a parquet write."""
    return max(1, int((cluster_cpus - cpus_per_write) // LEAN_CPUS_PER_ACTOR))


class _RunFiles(ray.data.datasource.FilenameProvider):
    """part-<run id>-<block>.parquet: a rerun never overwrites an earlier run's parts."""

    def __init__(self, run_id: str):
        super().__init__(file_format="parquet")
        self.run_id = run_id

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return f"part-{self.run_id}-{write_uuid}-{task_index:06d}.parquet"


def _with_metadata(schema: pa.Schema, provenance: Mapping[str, Any]) -> pa.Schema:
    # and the scale the SDS columns are on (boneage.clinical.columns)
    return schema.with_metadata({score.PROVENANCE_KEY: json.dumps(provenance, sort_keys=True).encode(),
                                 **columns.parquet_metadata()})


def gather(out_uri: str, provenance: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> None:
    """Copy every part of `out_uri` into the single parquet file `out_uri`, one part in memory at a time,
    with `provenance` (this run's) in its metadata; a file listed twice keeps its newest row."""
    fs, _ = storage.filesystem(out_uri, storage_options)
    parts = _part_files(parts_uri(out_uri), storage_options)
    tables = []
    for part in parts:
        with fs.open(part, "rb") as f:
            tables.append((part, pq.read_schema(f)))
    if not tables:
        return
    # Parts of older runs may lack a column a newer run has (e.g. the UID columns): the union schema.
    schema = pa.unify_schemas([s.remove_metadata() for _, s in tables])
    seen: set[str] = set()
    tmp = out_uri + f".tmp-{uuid.uuid4().hex[:8]}"
    with storage.open_output(tmp, "wb", storage_options) as out:
        with pq.ParquetWriter(out, _with_metadata(schema, provenance)) as writer:
            for part, _ in sorted(tables, key=lambda t: t[0], reverse=True):  # newest run first
                with fs.open(part, "rb") as f:
                    table = pq.read_table(f)
                uris = table.column("uri").to_pylist()
                keep = [u not in seen for u in uris]
                seen.update(uris)
                table = table.filter(pa.array(keep, pa.bool_()))  # typed: an empty part's [] is not null-typed
                for name in schema.names:
                    if name not in table.column_names:
                        table = table.append_column(name, pa.nulls(len(table), schema.field(name).type))
                writer.write_table(table.select(schema.names).cast(schema))
    _, tmp_path = storage.filesystem(tmp, storage_options)
    _, out_path = storage.filesystem(out_uri, storage_options)
    fs.mv(tmp_path, out_path)  # replace only once complete: a cut-off gather leaves the old file


def read_output(out_uri: str, columns: tuple[str, ...], storage_options: Mapping[str, Any] | None = None
                ) -> pd.DataFrame:
    """`columns` of a scoring output (the .parquet file, or the folder of parts), sorted by id; one row per
    file, its latest (score.latest_rows: a rescored transient error replaces the old row)."""
    uri = out_uri if out_uri.lower().endswith(".parquet") else parts_uri(out_uri)
    # s3fs caches folder listings per process: one made before Ray's workers wrote this run's parts
    # would make their files "not found".
    fs, fs_path = storage.filesystem(uri, storage_options)
    fs.invalidate_cache(fs_path)
    path, filesystem = storage.arrow_location(uri, storage_options)
    wanted = list(dict.fromkeys([*columns, "uri", "scored_at"]))
    table = score.latest_rows(pq.read_table(path, filesystem=filesystem, columns=wanted).to_pandas())
    return table[list(columns)].sort_values(["id", "uri"], kind="stable").reset_index(drop=True)


def remove_output(out_uri: str, storage_options: Mapping[str, Any] | None = None) -> None:
    """Delete a scoring output and its parts (a scoring afresh)."""
    for uri in {out_uri, parts_uri(out_uri)}:
        fs, path = storage.filesystem(uri, storage_options)
        if fs.exists(path):
            fs.rm(path, recursive=True)


def read_provenance(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The provenance a scoring table (or part) carries in its parquet metadata."""
    fs, path = storage.filesystem(uri, storage_options)
    with fs.open(path, "rb") as f:
        metadata = pq.read_schema(f).metadata or {}
    return json.loads(metadata[score.PROVENANCE_KEY])


def new_provenance(bundle_uri: str, manifest_bytes: bytes, bundle_manifest: Mapping[str, Any], id_from: str,
                   keep_uids: bool) -> dict[str, Any]:
    """What every output of this run records about how it was made."""
    import hashlib

    now = time.time()
    return {
        "run_id": time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + uuid.uuid4().hex[:6],
        "scored_at": pd.Timestamp(now, unit="s", tz="UTC").isoformat(),
        "boneage_version": boneage.__version__,
        "bundle": {"uri": bundle_uri, "sha256": hashlib.sha256(manifest_bytes).hexdigest(),
                   "format": bundle_manifest.get("format"), "version": bundle_manifest.get("version"),
                   "created": bundle_manifest.get("created"),
                   "boneage_version": (bundle_manifest.get("packages") or {}).get("boneage")},
        "ids": id_from, "dicom_uids": bool(keep_uids),
        # The QA inputs every row carries: which registration the bone age rests on.
        "qa_columns": ["registration_doubtful", "mask_doubtful", "keypoint_source", "keypoint_confidence",
                       "mirrored", "transform"],
        "transform": "2x3 affine (row-major) from image pixels to the full-resolution 2080x1600 frame: a "
                     "similarity, with a mirror for a right hand (mirrored)",
    }
