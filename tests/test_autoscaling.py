"""cluster.yaml's path on this machine: a local twin of its autoscaling cluster (the same node types,
custom resources, min/max workers; Ray's fake multi-node provider starts and stops worker "nodes" as
raylets here, the GPU type with a logical GPU and no CUDA behind it), workflows/full_cv.py submitted
through the job API with GPU-style settings, as configs/rsna.yaml runs on AWS:

- the cluster starts with the head alone (it has no CPU for tasks, as on AWS): every worker node is
  launched by the autoscaler because work asked for it, the GPU nodes by the key point model and the
  CV trials, which ask for fractions of a GPU and pack two to a GPU;
- the Tune trial drivers run on the head (`cv.driver_resources` names the head's `trial_driver`
  resource), the Train workers on the GPU nodes, and torch falls back to the CPU there, saying so;
- the out-of-fold table equals a CPU run's of the same settings (local Ray, no GPU);
- the idle nodes go away again, and stopping the cluster (`ray down`) leaves no process behind.

The idle timeout is the one setting changed from cluster.yaml (10 minutes there, 12 s here).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from boneage.data import synth

from ray_cluster import AutoscalingLocalCluster, _alive, entrypoint, local_twin, run_job

# Not in the default run (pyproject.toml): 6 minutes of CI's budget, which the README's command and the
# other tests already fill to ~31 of its 40. Run it with: python -m pytest -m cluster_twin tests/test_autoscaling.py
pytestmark = [pytest.mark.slow, pytest.mark.cluster_twin]

ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 26  # with their key point annotations: enough (20+) to train the key point model
GPU_STYLE = """\
keypoints:
  source: model
  epochs: 2
  width_mult: 0.0625
  use_gpu: true              # a Train worker on a GPU node
  gpus_per_actor: 0.5        # the key point predictor actor
cv:
  k: 2
  kinds: [A-reg]
  input_scale: 0.125
  width_mult: 0.0625
  fc: 32
  epochs: 2
  batch_size: 4
  cpus_per_trial: 0.5
  gpus_per_trial: 0.5        # two trials to a GPU
  driver_resources: {CPU: 0, trial_driver: 0.01}   # as configs/rsna.yaml: trial drivers on the head
data:
  test_fraction: 0
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    twin = local_twin(ROOT / "cluster.yaml", cpus_per_node=1, idle_timeout_minutes=0.2)
    with AutoscalingLocalCluster(twin=twin) as c:
        try:
            yield c
        finally:
            c.keep_logs(tmp_path_factory.mktemp("twin-logs"))


def monitor_log(cluster) -> str:
    """The autoscaler's log (launches, removals)."""
    return "".join(p.read_text() for p in Path(cluster.temp_dir).glob("session_*/logs/monitor.log"))


def launched(cluster, node_type: str) -> int:
    """Nodes of `node_type` the autoscaler launched so far."""
    return sum(int(n) for n in re.findall(rf"Launching (\d+) nodes, type {node_type}\.", monitor_log(cluster)))


def test_full_cv_on_an_autoscaling_twin_of_cluster_yaml(cluster, ray_local, tmp_path):
    from boneage.cli import main as cli_main

    assert cluster.worker_nodes() == []  # the head alone
    data = synth.write_dataset(N_IMAGES, tmp_path / "synthetic", seed=5, size=(320, 240), progress=False)
    (tmp_path / "gpu.yaml").write_text(GPU_STYLE)
    out = tmp_path / "run"
    status, logs = run_job(cluster, entrypoint(
        str(ROOT / "workflows" / "full_cv.py"), "--config", str(tmp_path / "gpu.yaml"),
        "--images", str(data["images"]), "--labels", str(data["labels"]), "--keypoints", str(data["keypoints"]),
        "--output", str(out)), timeout_s=1200)
    assert status == "SUCCEEDED", logs[-6000:]
    assert "the trials wait for an autoscaler" in logs or "more if an autoscaler adds nodes" in logs
    # The key point model trained on a GPU worker and predicted in actors given half a GPU each: on logical
    # GPUs both fell back to the CPU, saying so in their workers' logs.
    assert "[keypoints] training the key point model" in logs
    workers = "".join(p.read_text(errors="replace") for p in Path(cluster.temp_dir).glob("session_*/logs/worker-*.out"))
    assert re.search(r"\[train\] Ray assigned GPU \[.+\] but torch sees no CUDA device", workers)
    assert re.search(r"\[keypoints\] Ray assigned GPU \[.+\] but torch sees no CUDA device", workers)

    # GPU nodes came from the autoscaler, for the work that asked for GPUs.
    assert launched(cluster, "gpu_worker") >= 1 and launched(cluster, "cpu_worker") >= 1
    trials = pd.read_parquet(out / "cv" / "trials.parquet")
    assert len(trials) == 6 and trials["local_train"].eq(False).all()  # A-reg x 2 sexes x 2 folds, A-sex x 2 folds
    assert trials["device"].eq("cpu").all() and trials["gpu_ids"].map(len).eq(1).all()  # a logical GPU each
    from ray.util.state import list_nodes

    every_node = list_nodes(address=cluster.dashboard_url, detail=True, limit=1000, raise_on_missing_output=False)
    gpu_nodes = {n.node_id for n in every_node if n.resources_total.get("GPU")}  # alive or gone since
    assert set(trials["node_id"]) <= gpu_nodes  # every Train worker on a GPU node
    assert trials.groupby(["node_id", trials["gpu_ids"].map(tuple)]).size().max() >= 2  # packed: 2 per GPU
    assert "6 trials were given a GPU by Ray but trained on the CPU: torch sees no CUDA device" in logs

    # The same settings on CPU (this session's local Ray, no GPU), on the same registered images.
    cpu = tmp_path / "cpu"
    shutil.copytree(out / "registered", cpu / "registered")
    shutil.copy(out / "config.yaml", cpu / "config.yaml")
    cpu_config = tmp_path / "cpu.yaml"
    cpu_config.write_text(GPU_STYLE.replace("gpus_per_trial: 0.5", "gpus_per_trial: 0")
                          .replace("cpus_per_trial: 0.5", "cpus_per_trial: 1")
                          .replace("driver_resources: {CPU: 0, trial_driver: 0.01}", "driver_resources: null"))
    assert cli_main(["cv", "--config", str(cpu_config), "--output", str(cpu)]) == 0
    gpu_oof = pd.read_parquet(out / "cv" / "oof.parquet").sort_values("id").reset_index(drop=True)
    cpu_oof = pd.read_parquet(cpu / "cv" / "oof.parquet").sort_values("id").reset_index(drop=True)
    assert list(gpu_oof.id) == list(cpu_oof.id)
    np.testing.assert_allclose(gpu_oof["A-reg"], cpu_oof["A-reg"], atol=1e-3)
    np.testing.assert_allclose(gpu_oof["p_male"], cpu_oof["p_male"], atol=1e-5)  # the sex classifier too

    # Idle nodes go (idle timeout 12 s, the autoscaler checks every second).
    deadline = time.time() + 180
    while cluster.worker_nodes() and time.time() < deadline:
        time.sleep(2)
    assert cluster.worker_nodes() == []
    assert "Removing" in monitor_log(cluster) and "(idle)" in monitor_log(cluster)

    # `ray down`: stopping the cluster leaves none of its processes (the autoscaler's included).
    ours = cluster.processes()
    assert any("monitor.py" in p.title for p in ours)
    cluster.cleanup()
    deadline = time.time() + 15  # SIGKILLed processes take a moment to leave /proc
    while _alive(ours) and time.time() < deadline:
        time.sleep(0.5)
    assert [p.title for p in _alive(ours)] == [] and not Path(cluster.temp_dir).exists()
