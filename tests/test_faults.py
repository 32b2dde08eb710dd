"""Faults on a real two-node Ray cluster (tests/ray_cluster.py), every run submitted as a Ray job:

1. a preprocessing worker is SIGKILLed mid-run (Ray retries its task): the run still writes every
   row, exactly once, and the same table as an uninterrupted run - also over an earlier run's output;
2. the Ray Train workers of the CV trials are SIGKILLed once a trial has a checkpoint: Ray Train
   restarts them (FailureConfig) from their last checkpoint, not from epoch 0 (the trial's record
   says from which epoch), and the results equal an uninterrupted run's;
3. the driver is SIGKILLed mid-CV and the same command is run again: the finished trials are not
   trained again (their parts untouched), the cut-off one resumes from its checkpoint, and the
   out-of-fold table equals an uninterrupted run's, value for value.

Small on purpose (24 small synthetic radiographs, one model kind, the girls, 2 folds: 2 trials of
a tiny net): these check the fault handling, not accuracy. Slow (minutes: a Ray cluster, and
Ray Train's start-up per trial), but they run in CI.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pandas as pd
import pytest

from boneage.data import synth
from boneage.distributed.ray_prepare import read_registered

from ray_cluster import LocalCluster, entrypoint, run_job

pytestmark = pytest.mark.slow

N_IMAGES = 24
TRIALS = ["A-reg-F-fold0", "A-reg-F-fold1"]
EPOCHS = 8  # each reports a checkpoint (~0.5-3 s here): seconds for a kill to land mid-training
CV_CONFIG = f"""\
preprocess:
  batch_size: 2              # 12 Ray Data tasks: a kill lands mid-run
keypoints:
  source: geometric          # no key point CNN: faster, and nothing else trains during preprocessing
cv:
  k: 2
  kinds: [A-reg]
  sexes: [F]
  sex_kind: null             # no sex classifier: these tests are about killed zone trials
  input_scale: 0.125
  width_mult: 0.0625
  fc: 32
  epochs: {EPOCHS}
  batch_size: 4
  patience: 0
  cpus_per_trial: 1          # one trial per node
  local_train: false         # a Ray Train worker per trial, as on a GPU cluster: the process killed here
"""


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with LocalCluster(["node_a", "node_b"], num_cpus=1) as c:
        try:
            yield c
        finally:
            c.keep_logs(tmp_path_factory.mktemp("cluster-logs"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("faults")
    paths = synth.write_dataset(N_IMAGES, folder / "synthetic", seed=11, size=(320, 240), progress=False)
    config = folder / "tiny.yaml"
    config.write_text(CV_CONFIG)
    return {"folder": folder, "images": str(paths["images"]), "labels": str(paths["labels"]),
            "config": str(config)}


def _ok(result: tuple[str, str]) -> str:
    status, logs = result
    assert status == "SUCCEEDED", f"job {status}:\n{logs[-6000:]}"
    return logs


def _preprocess(data, output: Path) -> str:
    return entrypoint("-m", "boneage.cli", "preprocess", "--config", data["config"], "--images", data["images"],
                      "--labels", data["labels"], "--output", str(output))


def _cv(data, output: Path, *extra: str) -> str:
    return entrypoint("-m", "boneage.cli", "cv", "--config", data["config"], "--output", str(output), *extra)


@pytest.fixture(scope="module")
def reference(cluster, data):
    """An uninterrupted run: preprocessing, then the CV (both trials at once, one per node)."""
    out = data["folder"] / "reference"
    _ok(run_job(cluster, _preprocess(data, out), timeout_s=600))
    _ok(run_job(cluster, _cv(data, out), timeout_s=600))
    return out


def _kill(proc) -> None:
    os.kill(proc.pid, signal.SIGKILL)


def _checkpointed_epoch(output: Path, trial: str) -> int | None:
    """The epoch of the trial's latest checkpoint that Ray Train has registered (what a restarted
    worker gets back), None before the first. A checkpoint folder alone is not enough: a worker
    killed between writing it and reporting it rightly starts again from scratch."""
    snapshot = output / "cv" / "train" / trial / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(snapshot.read_text()).get("latest_checkpoint_result")
    except (OSError, ValueError):  # not there yet, or being rewritten
        return None
    if not latest:
        return None
    return EPOCHS if latest["metrics"].get("final") else int(latest["metrics"]["epoch"])


def _part(output: Path, trial: str) -> Path:
    return output / "cv" / "parts" / f"{trial}.parquet"


def kill_worker_node_mid_cv(cluster: LocalCluster, output: Path, lost: dict) -> None:
    """Polled during a CV job: once both trials (one per node) are under way with a registered
    checkpoint, whichever of them trains on the worker node has one to resume from; then SIGKILL every
    process of that node, once. `lost` gets each trial's checkpointed epoch and the time of the kill."""
    worker_node = cluster.nodes[1]
    if lost:
        return
    on_node = [p for p in cluster.node_processes(worker_node.name) if p.title.startswith("ray::RayTrainWorker")]
    under_way = {t: e for t in TRIALS if (e := _checkpointed_epoch(output, t)) is not None
                 and e < EPOCHS - 2 and not _part(output, t).exists()}
    if on_node and len(under_way) == len(TRIALS):
        lost.update(under_way, at_s=time.time())
        cluster.kill_node(worker_node.name)


def test_killed_preprocessing_worker_loses_no_row(cluster, data, reference):
    # The run goes to an output that already holds a registered table, as when the same command is
    # run again: rows must not be appended to it either.
    out = data["folder"] / "prep-killed"
    shutil.copytree(reference / "registered", out / "registered")
    killed = []

    def kill_a_map_worker():
        # SIGKILL the first worker seen running a decoding task (a worker's title names its task only
        # while it runs one). Not "once some output is written": whether Ray Data writes a block before
        # or after the last decoding task depends on its scheduling, and in a CI run it was after.
        if killed:
            return
        busy = cluster.workers("MapBatches(_Analyse)")
        if busy:
            _kill(busy[0])
            killed.append(busy[0])

    _ok(run_job(cluster, _preprocess(data, out), timeout_s=600, on_poll=kill_a_map_worker))
    assert killed, "no preprocessing worker was caught mid-run: the test killed nothing"

    table = read_registered(str(out / "registered"))
    assert len(table) == N_IMAGES and table.id.is_unique and set(table.status) == {"ok"}
    expected = read_registered(str(reference / "registered"))
    pd.testing.assert_frame_equal(table, expected)  # the same rows, images included, as without the kill


def test_killed_training_worker_resumes_from_its_checkpoint(cluster, data, reference):
    out = data["folder"] / "cv-worker-killed"
    shutil.copytree(reference / "registered", out / "registered")
    killed = {}  # trial: the epoch of its registered checkpoint when its worker was killed

    def kill_the_training_workers():
        # As soon as a trial has a registered checkpoint, well before its last epoch, SIGKILL the
        # cluster's Ray Train workers (one per running trial).
        if killed:
            return
        under_way = {t: e for t in TRIALS if (e := _checkpointed_epoch(out, t)) is not None
                     and e < EPOCHS - 2 and not _part(out, t).exists()}
        workers = cluster.workers("RayTrainWorker")
        if under_way and workers:
            for worker in workers:
                _kill(worker)
            killed.update(under_way)

    logs = _ok(run_job(cluster, _cv(data, out), timeout_s=600, on_poll=kill_the_training_workers))
    assert killed, "no training worker was caught after a checkpoint: the test killed nothing"

    trials = pd.read_parquet(out / "cv" / "trials.parquet").set_index("trial")
    assert sorted(trials.index) == TRIALS and (trials.epochs_run == EPOCHS).all()
    for trial, epoch in killed.items():  # resumed from the checkpoint it had, not from scratch
        resumed = trials.loc[trial, "resumed_from_epoch"]
        assert not pd.isna(resumed) and epoch <= resumed < EPOCHS - 1, (
            f"{trial} was killed after epoch {epoch} and resumed from {resumed}:\n{logs[-4000:]}")
    # Resuming restores model, optimiser, schedule and random streams: the same result as no kill.
    pd.testing.assert_frame_equal(pd.read_parquet(out / "cv" / "oof.parquet"),
                                  pd.read_parquet(reference / "cv" / "oof.parquet"), check_exact=True)


def test_rerun_after_killed_driver_skips_finished_trials(cluster, data, reference):
    out = data["folder"] / "cv-driver-killed"
    shutil.copytree(reference / "registered", out / "registered")
    command = _cv(data, out, "--max-concurrent-trials", "1")  # one trial after the other
    seen = {}

    def kill_the_driver():
        # One trial finished, the other under way with a checkpoint: SIGKILL the job's driver.
        if seen or not (_part(out, TRIALS[0]).exists() ^ _part(out, TRIALS[1]).exists()):
            return
        running = next(t for t in TRIALS if not _part(out, t).exists())
        epoch = _checkpointed_epoch(out, running)
        if epoch is None or epoch >= EPOCHS - 2:  # not yet, or too late to be mid-training
            return
        drivers = [p for p in cluster.processes() if "boneage.cli cv" in p.title and str(out) in p.title
                   and not p.title.startswith("/bin/sh")]
        if drivers:
            finished = next(t for t in TRIALS if _part(out, t).exists())
            seen.update(finished=finished, mtime=_part(out, finished).stat().st_mtime_ns, epoch=epoch)
            _kill(drivers[0])

    status, logs = run_job(cluster, command, timeout_s=600, on_poll=kill_the_driver)
    assert seen, f"the driver was not caught between the two trials (job {status}):\n{logs[-3000:]}"
    assert status == "FAILED", f"the killed driver's job is {status}"
    finished_before = pd.read_parquet(_part(out, seen["finished"]))  # its record is in the metadata

    logs = _ok(run_job(cluster, command, timeout_s=600))
    assert "2 trials, 1 already finished, 1 to train" in logs
    part = _part(out, seen["finished"])
    assert part.stat().st_mtime_ns == seen["mtime"]  # not trained again, not rewritten
    pd.testing.assert_frame_equal(pd.read_parquet(part), finished_before)
    trials = pd.read_parquet(out / "cv" / "trials.parquet").set_index("trial")
    assert sorted(trials.index) == TRIALS
    cut_off = next(t for t in TRIALS if t != seen["finished"])
    assert trials.loc[cut_off, "resumed_from_epoch"] >= seen["epoch"]  # the rerun continued its checkpointed run
    assert pd.isna(trials.loc[seen["finished"], "resumed_from_epoch"])
    pd.testing.assert_frame_equal(pd.read_parquet(out / "cv" / "oof.parquet"),
                                  pd.read_parquet(reference / "cv" / "oof.parquet"), check_exact=True)


def test_a_lost_worker_node_costs_time_not_results(cluster, data, reference):
    """Every process of the worker node (its raylet, object store, Train workers, whatever Ray put
    there) is SIGKILLed mid-CV, as when a spot node is taken away. The trial drivers stay on the head
    (`cv.driver_resources` asks for the head's custom resource, as configs/rsna.yaml asks for the
    head's `trial_driver` in cluster.yaml); the lost trial resumes from its last checkpoint on the
    head, and the out-of-fold table equals the uninterrupted run's. Runs last: the node stays dead."""
    out = data["folder"] / "cv-node-lost"
    shutil.copytree(reference / "registered", out / "registered")
    config = data["folder"] / "drivers-on-head.yaml"
    config.write_text(CV_CONFIG + "  driver_resources: {CPU: 0, node_a: 0.001}\n")
    lost = {}
    command = entrypoint("-m", "boneage.cli", "cv", "--config", str(config), "--output", str(out))
    logs = _ok(run_job(cluster, command, timeout_s=900, on_poll=lambda: kill_worker_node_mid_cv(cluster, out, lost)))
    assert lost, "no trial was caught training on the worker node: the test killed nothing"
    from ray.util.state import list_nodes

    alive = list_nodes(address=cluster.dashboard_url, filters=[("state", "=", "ALIVE")], raise_on_missing_output=False)
    assert len(alive) == 1  # GCS's view (the dashboard's node summary can lag behind it)

    trials = pd.read_parquet(out / "cv" / "trials.parquet").set_index("trial")
    assert sorted(trials.index) == TRIALS and (trials.epochs_run == EPOCHS).all()
    head = alive[0].node_id
    resumed = trials[trials.resumed_from_epoch.notna()]
    assert len(resumed) >= 1 and (resumed.node_id == head).all(), (trials, logs[-4000:])
    pd.testing.assert_frame_equal(pd.read_parquet(out / "cv" / "oof.parquet"),
                                  pd.read_parquet(reference / "cv" / "oof.parquet"), check_exact=True)
