"""cluster.yaml's path on this machine, measured: the autoscaling twin's nodes over time, and the time a
lost worker node costs.

    python bench/bench_cluster_twin.py --out bench/results/cluster_twin.json --plot docs/img/cluster_twin_nodes.png

1. **Autoscaling.** The local twin of cluster.yaml (tests/ray_cluster.py: Ray's fake multi-node provider,
   the same node types, GPU workers with logical GPUs, idle timeout 12 s) runs workflows/full_cv.py through
   the job API with the GPU-style settings of tests/test_autoscaling.py. Every second the dashboard's alive
   nodes are counted by type, from submission until the idle workers are gone; the autoscaler's own
   "Adding"/"Removing" events come from its log. Reports the timeline, the job's wall time, and how the
   CV trials packed onto logical GPUs (from cv/trials.parquet).
2. **Node loss** (`--node-loss-repeats N`). On a fixed two-node cluster (tests/test_faults.py's settings:
   two trials, one per node, trial drivers on the head), the CV runs uninterrupted, then again with every
   process of the worker node SIGKILLed once both trials have a registered checkpoint (the test's
   `kill_worker_node_mid_cv`; the node is started again
   afterwards for the next repeat). Reports both wall times per repeat, their medians and the time lost,
   and checks the out-of-fold tables are equal.
3. **A node lost while a trial starts on it** (`--start-window-kills N`). The same cluster; the worker node
   is SIGKILLed as soon as the Train controller whose worker group is on it is between
   "after_worker_group_start callbacks completed" and "Train function launched" (the group counts as
   started, the train function is not running yet: ~2.5 s). Ray Train 2.60 then leaves the group's
   placement group behind and, without
   `boneage.distributed.ray_env.ReleaseOrphanedPlacementGroups`, the retried trial waits for it forever. Reports per
   run: the job's outcome, whether the controller met the dead node as "actor unavailable", the
   placement groups the workaround removed, and whether the out-of-fold table equals an uninterrupted run's.

Small synthetic data: this measures the cluster path's behaviour and overheads, not training speed.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import test_faults as faults  # noqa: E402
from boneage.data import synth  # noqa: E402
from ray_cluster import AutoscalingLocalCluster, LocalCluster, entrypoint, local_twin, run_job  # noqa: E402

# ":event_summary:Adding 1 node(s) of type gpu_worker." / ":event_summary:Removing 2 nodes of type cpu_worker (idle)."
EVENT = re.compile(r"^(\S+ \S+),\d+\s.*:event_summary:(Adding|Removing) (\d+) node(?:s|\(s\)) of type ([\w.-]+?)\.?(?: \((.*)\))?\.?$")


def node_type(node: dict) -> str:
    """The twin's node type from what a node declares (the GPU type is the one with GPUs)."""
    raylet = node["raylet"]
    if raylet.get("isHeadNode"):
        return "head"
    return "gpu_worker" if raylet.get("resourcesTotal", {}).get("GPU") else "cpu_worker"


def autoscaler_events(cluster, since: float) -> list[dict]:
    """The autoscaler's node launches and removals from its log, seconds after `since`."""
    events = []
    for log in Path(cluster.temp_dir).glob("session_2*/logs/monitor.log"):  # not session_latest, its link
        for line in log.read_text().splitlines():
            if m := EVENT.match(line):
                at = datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S").timestamp()
                events.append({"t": round(at - since, 1), "event": m[2].lower(), "count": int(m[3]),
                               "type": m[4], "why": m[5]})
    return events


def autoscaling_run(work: Path, n_images: int, settle_s: float) -> dict:
    from test_autoscaling import GPU_STYLE

    data = synth.write_dataset(n_images, work / "synthetic", seed=5, size=(320, 240), progress=False)
    (work / "gpu.yaml").write_text(GPU_STYLE)
    out = work / "run"
    twin = local_twin(ROOT / "cluster.yaml", cpus_per_node=1, idle_timeout_minutes=0.2)
    with AutoscalingLocalCluster(twin=twin) as cluster:
        timeline: list[dict] = []
        start = time.time()

        def sample():
            counts = {"cpu_worker": 0, "gpu_worker": 0}
            for node in cluster.alive_nodes():
                if (kind := node_type(node)) != "head":
                    counts[kind] += 1
            if not timeline or {k: timeline[-1][k] for k in counts} != counts:
                timeline.append({"t": round(time.time() - start, 1), **counts})

        status, logs = run_job(cluster, entrypoint(
            str(ROOT / "workflows" / "full_cv.py"), "--config", str(work / "gpu.yaml"), "--images",
            str(data["images"]), "--labels", str(data["labels"]), "--keypoints", str(data["keypoints"]),
            "--output", str(out)),
            timeout_s=1800, on_poll=sample, poll_s=1.0)
        job_s = time.time() - start
        if status != "SUCCEEDED":
            raise SystemExit(f"the job {status}:\n{logs[-4000:]}")
        deadline = time.time() + settle_s
        while time.time() < deadline:
            sample()
            if timeline[-1]["cpu_worker"] + timeline[-1]["gpu_worker"] == 0:
                break
            time.sleep(1.0)
        events = autoscaler_events(cluster, start)
    trials = pd.read_parquet(out / "cv" / "trials.parquet")
    per_gpu = trials.groupby([trials["node_id"], trials["gpu_ids"].map(tuple)]).size()
    stages = json.loads((out / "timings.json").read_text())
    return {"images": n_images, "job_wall_s": round(job_s, 1), "stage_seconds": stages,
            "all_workers_gone_at_s": timeline[-1]["t"] if timeline[-1]["cpu_worker"] + timeline[-1]["gpu_worker"] == 0 else None,
            "timeline": timeline, "autoscaler_events": events, "trials": len(trials),
            "trials_per_logical_gpu": sorted(per_gpu.tolist(), reverse=True),
            "gpu_nodes_used_by_trials": int(trials["node_id"].nunique()),
            "trial_devices": sorted(set(trials["device"]))}


@contextmanager
def two_node_cluster(work: Path):
    """tests/test_faults.py's cluster (two nodes of 1 CPU, trial drivers on the head) with its synthetic
    images preprocessed: yields the cluster, the job's data settings and the preprocessed output."""
    data = synth.write_dataset(faults.N_IMAGES, work / "synthetic", seed=11, size=(320, 240), progress=False)
    config = work / "drivers-on-head.yaml"
    config.write_text(faults.CV_CONFIG + "  driver_resources: {CPU: 0, node_a: 0.001}\n")
    prep = {"config": str(config), "images": str(data["images"]), "labels": str(data["labels"])}
    with LocalCluster(["node_a", "node_b"], num_cpus=1) as cluster:
        base = work / "prep"
        assert run_job(cluster, faults._preprocess(prep, base), timeout_s=900)[0] == "SUCCEEDED"
        yield cluster, prep, base


def node_loss_runs(work: Path, repeats: int) -> dict:
    rows = []
    with two_node_cluster(work) as (cluster, prep, base):

        def cv(out: Path, on_poll=None) -> float:
            shutil.copytree(base / "registered", out / "registered")
            started = time.time()
            status, logs = run_job(cluster, faults._cv(prep, out), timeout_s=1800, on_poll=on_poll)
            if status != "SUCCEEDED":
                raise SystemExit(f"CV job {status}:\n{logs[-4000:]}")
            return time.time() - started

        for repeat in range(repeats):
            whole = work / f"whole{repeat}"
            whole_s = cv(whole)
            lost_out, lost = work / f"lost{repeat}", {}
            lost_s = cv(lost_out, lambda: faults.kill_worker_node_mid_cv(cluster, lost_out, lost))
            trials = pd.read_parquet(lost_out / "cv" / "trials.parquet")
            same = pd.read_parquet(lost_out / "cv" / "oof.parquet").equals(pd.read_parquet(whole / "cv" / "oof.parquet"))
            rows.append({"repeat": repeat, "uninterrupted_s": round(whole_s, 1), "node_lost_s": round(lost_s, 1),
                         "killed": bool(lost), "resumed_from_epoch": trials["resumed_from_epoch"].dropna().tolist(),
                         "oof_equal": bool(same)})
            print(f"[node loss] repeat {repeat}: uninterrupted {whole_s:.0f} s, node lost {lost_s:.0f} s, "
                  f"OOF equal: {same}", flush=True)
            cluster._start_with_retries(cluster.nodes[1], head=False)  # the node comes back for the next repeat
    medians = {k: statistics.median(r[k] for r in rows) for k in ("uninterrupted_s", "node_lost_s")}
    return {"repeats": rows, "median_uninterrupted_s": medians["uninterrupted_s"],
            "median_node_lost_s": medians["node_lost_s"],
            "median_time_lost_s": round(statistics.median(r["node_lost_s"] - r["uninterrupted_s"] for r in rows), 1)}


def controller_logs(cluster) -> set[Path]:
    return set(Path(cluster.temp_dir).glob("session_latest/logs/train/ray-train-sys-controller-*.log"))


def groups_in_start_window(cluster, earlier: set[Path]) -> list[str]:
    """The placement groups (hex ids) of the cluster's Train controllers (not the `earlier` runs') that
    are between their worker group's start and the train function's launch."""
    groups = []
    for log in controller_logs(cluster) - earlier:
        text = log.read_text(errors="ignore")
        if text.count("after_worker_group_start callbacks completed") > text.count("Train function launched"):
            groups += re.findall(r"Registered placement group PlacementGroupID\((\w+)\)", text)[-1:]
    return groups


def node_of_group(cluster, group: str) -> str | None:
    """The name of the node (its custom resource, tests/ray_cluster.py) holding the group's bundle."""
    from ray.util.state import list_nodes, list_placement_groups

    found = list_placement_groups(address=cluster.dashboard_url, filters=[("placement_group_id", "=", group)],
                                  detail=True, raise_on_missing_output=False)
    node_ids = {b.get("node_id") for g in found for b in (g.bundles or [])}
    for node in list_nodes(address=cluster.dashboard_url, detail=True, raise_on_missing_output=False):
        if node.node_id in node_ids:
            return next((n.name for n in cluster.nodes if n.name in (node.resources_total or {})), None)
    return None


def start_window_kills(work: Path, runs: int) -> dict:
    rows = []
    with two_node_cluster(work) as (cluster, prep, base):
        reference = work / "whole"
        shutil.copytree(base / "registered", reference / "registered")
        assert run_job(cluster, faults._cv(prep, reference), timeout_s=900)[0] == "SUCCEEDED"
        logs = Path(cluster.temp_dir) / "session_latest" / "logs"

        def count(text: str) -> int:
            return sum(f.read_text(errors="ignore").count(text) for f in logs.rglob("*") if f.is_file())

        for run in range(runs):
            out, killed = work / f"window{run}", {}
            shutil.copytree(base / "registered", out / "registered")
            before = {k: count(k) for k in ("Error in control loop iteration: The actor", "its worker group was never shut down")}
            earlier = controller_logs(cluster)

            def kill_in_window():
                # the worker node, as soon as the trial whose worker runs there is in the window
                if not killed and any(node_of_group(cluster, g) == "node_b" for g in groups_in_start_window(cluster, earlier)):
                    killed["at"] = time.time()
                    cluster.kill_node("node_b")

            started = time.time()
            status, _ = run_job(cluster, faults._cv(prep, out), timeout_s=600, on_poll=kill_in_window)
            after = {k: count(k) for k in before}
            same = status == "SUCCEEDED" and pd.read_parquet(out / "cv" / "oof.parquet").equals(
                pd.read_parquet(reference / "cv" / "oof.parquet"))
            rows.append({"run": run, "status": status, "wall_s": round(time.time() - started, 1), "killed": bool(killed),
                         "controller_met_actor_unavailable": (after["Error in control loop iteration: The actor"]
                                                              > before["Error in control loop iteration: The actor"]),
                         "placement_groups_removed_by_workaround":
                             after["its worker group was never shut down"] - before["its worker group was never shut down"],
                         "oof_equal": bool(same)})
            print(f"[start window] {rows[-1]}", flush=True)
            cluster._start_with_retries(cluster.nodes[1], head=False)
    return {"runs": rows}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timeline = result["timeline"]
    end = max(timeline[-1]["t"], result["job_wall_s"]) + 5
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for kind, colour in (("cpu_worker", "tab:blue"), ("gpu_worker", "tab:orange")):
        ts = [p["t"] for p in timeline] + [end]
        ns = [p[kind] for p in timeline] + [timeline[-1][kind]]
        ax.step(ts, ns, where="post", label=kind, color=colour, lw=2)
    ax.axvline(result["job_wall_s"], color="gray", ls="--", lw=1)
    ax.text(result["job_wall_s"], ax.get_ylim()[1] * 0.95, " job done", color="gray", va="top", fontsize=8)
    ax.set_xlabel("seconds after the job was submitted")
    ax.set_ylabel("alive worker nodes")
    ax.set_title("Local twin of cluster.yaml: nodes launched and released by the autoscaler", fontsize=10)
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--plot", type=Path, help="PNG of the worker nodes over time")
    parser.add_argument("--images", type=int, default=26,
                        help="synthetic images of the autoscaling run (with key point annotations: 20+ train the key point "
                             "model); 0 skips the autoscaling run")
    parser.add_argument("--settle-s", type=float, default=240, help="how long to wait for idle nodes to go")
    parser.add_argument("--node-loss-repeats", type=int, default=3, help="0 skips the node-loss runs")
    parser.add_argument("--start-window-kills", type=int, default=0,
                        help="runs with the worker node killed while a trial starts on it (part 3)")
    args = parser.parse_args()
    with open("/proc/loadavg") as f:
        load_before = f.read().split()[:3]
    with tempfile.TemporaryDirectory(prefix="twin-bench") as tmp:
        result = {"load_before": load_before}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if args.images:
            result["autoscaling"] = autoscaling_run(Path(tmp) / "auto", args.images, args.settle_s)
            print(json.dumps({k: v for k, v in result["autoscaling"].items() if k != "timeline"}, indent=1), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=1))  # kept if the node-loss part fails
            if args.plot:
                plot(result["autoscaling"], args.plot)
        if args.node_loss_repeats:
            result["node_loss"] = node_loss_runs(Path(tmp) / "loss", args.node_loss_repeats)
            args.out.write_text(json.dumps(result, indent=1))
        if args.start_window_kills:
            result["start_window_kills"] = start_window_kills(Path(tmp) / "window", args.start_window_kills)
    with open("/proc/loadavg") as f:
        result["load_after"] = f.read().split()[:3]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("node_loss", "start_window_kills") if k in result}, indent=1))


if __name__ == "__main__":
    main()
