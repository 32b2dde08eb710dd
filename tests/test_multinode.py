"""The whole workflow on a real multi-node Ray cluster, as on AWS but on this machine: two nodes
started with `ray start --head` and `ray start --address ...` (tests/ray_cluster.py), each with one
CPU and its own custom resource; workflows/full_cv.py submitted through the Ray job API; data,
outputs and Ray Train/Tune storage on S3 (moto server mode on loopback, fixture s3_server).

Small on purpose (20 synthetic radiographs, one model kind, 2 folds, both sexes: 4 trials of a tiny
net): this checks the wiring across nodes and S3, not accuracy.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import s3fs

from boneage.data import storage, synth

from ray_cluster import LocalCluster, entrypoint, run_job

pytestmark = [pytest.mark.slow, pytest.mark.s3]

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 20
KINDS = ["A-reg"]
TINY = """\
keypoints:
  source: geometric          # no key point CNN: the key point model's own Ray Train run is tested elsewhere
cv:
  k: 2
  kinds: [A-reg]
  sex_kind: null             # no sex classifier (test_workflows covers it): 4 trials, all at once
  input_scale: 0.125
  width_mult: 0.0625
  fc: 32
  epochs: 2
  batch_size: 4
  cpus_per_trial: 0.5        # all 4 trials at once, 2 per node
  local_train: false         # Ray Train workers, as on a GPU cluster
data:
  test_fraction: 0.1         # 2 images locked away, scored at the end by the bundle, from S3
"""


@pytest.fixture(scope="module")
def cluster():
    with LocalCluster(["node_a", "node_b"], num_cpus=1) as c:
        yield c


def test_full_cv_as_a_job_on_two_nodes_with_s3(cluster, s3_server, tmp_path):
    options = s3_server["storage_options"]
    fs = s3fs.S3FileSystem(**options)
    prefix = f"s3://{s3_server['bucket']}/multinode"
    # The data set, uploaded as one would upload RSNA: a folder of images and a label CSV.
    local = synth.write_dataset(N_IMAGES, tmp_path / "synthetic", seed=3, size=(320, 240), progress=False)
    fs.put(str(local["images"]), f"{prefix}/data/images", recursive=True)
    fs.put(str(local["labels"]), f"{prefix}/data/labels.csv")
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY)

    nodes = cluster.alive_nodes()
    assert len(nodes) == 2
    out = f"{prefix}/run"
    status, logs = run_job(cluster, entrypoint(
        str(ROOT / "workflows" / "full_cv.py"), "--config", str(config),
        "--images", f"{prefix}/data/images", "--labels", f"{prefix}/data/labels.csv",
        "--output", out, "--storage-options", json.dumps(options)), timeout_s=900)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "[ray] joined the Ray cluster at" in logs  # it joined the cluster (RAY_ADDRESS from the job API)
    fs.invalidate_cache()  # what the job wrote, not this process's listings from before

    # The out-of-fold table: one row per labelled image, a prediction of the trained kind for each.
    oof = pd.read_parquet(f"{out}/cv/oof.parquet", storage_options=options)
    split = pd.read_csv(f"{out}/test/split.csv", storage_options=options)
    assert len(split) == 2 and not set(split.id.astype(str)) & set(oof.id)  # the test split is not in CV
    assert len(oof) == N_IMAGES - 2 and oof.id.is_unique and oof.male.nunique() == 2
    assert oof[KINDS].notna().all().all() and oof[KINDS].apply(lambda c: c.between(0, 240)).all().all()
    trials = pd.read_parquet(f"{out}/cv/trials.parquet", storage_options=options)
    assert len(trials) == len(KINDS) * 2 * 2
    # Ray Train kept its checkpoints on S3 too.
    assert fs.glob(f"{out}/cv/train/A-reg-F-fold0/checkpoint_*")

    # The bundle: a manifest listing files that are all there.
    manifest = json.loads(fs.cat_file(f"{out}/bundle/manifest.json"))
    files = manifest["files"]
    assert files and all(fs.exists(f"{out}/bundle/{item['path']}") for item in files)
    assert {f"models/{name}.safetensors" for name in trials.trial} <= {item["path"] for item in files}
    # The test accuracy lives beside the hashed bundle (measured.json), naming the manifest it measured.
    measured = json.loads(fs.cat_file(f"{out}/bundle/measured.json"))
    assert measured["bundle_sha256"] == hashlib.sha256(fs.cat_file(f"{out}/bundle/manifest.json")).hexdigest()
    assert measured["accuracy"]["test_split"]["n"] + len(json.loads(fs.cat_file(f"{out}/test/metrics.json"))["failed"]) == 2

    # Both nodes worked: Ray Train's workers (half a CPU each, all four at once) ran on both.
    from ray.util.state import list_actors

    workers = list_actors(address=cluster.dashboard_url, filters=[("class_name", "=", "RayTrainWorker")],
                          limit=1000, raise_on_missing_output=False)
    assert {w.node_id for w in workers} == {n["raylet"]["nodeId"] for n in nodes}
    assert storage.read_bytes(f"{out}/config.yaml", options)  # the resolved config, on S3 (credentials redacted)
    assert b"testing" not in storage.read_bytes(f"{out}/config.yaml", options)
