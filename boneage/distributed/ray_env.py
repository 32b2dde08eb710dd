"""Starting or joining Ray, the one place workflows do it."""

from __future__ import annotations

import atexit
import logging
import os

import ray
import torch
from ray.train.v2._internal.execution.callback import ControllerCallback, WorkerGroupCallback

from boneage.config import RayConfig
from boneage.progress import interactive


def init_ray(config: RayConfig) -> None:
    """Join `config.address` (or RAY_ADDRESS, as `ray job submit` sets it), else start a local Ray.
    Quiet unless config.verbose: Ray's INFO lines and the workers' output stay in Ray's log files
    (/tmp/ray/session_latest/logs), and the run tells its story in boneage's own lines."""
    if ray.is_initialized():
        return
    address = config.address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if config.verbose else logging.WARNING
    kwargs = {"log_to_driver": config.verbose, "logging_level": level}
    if address:
        ray.init(address=address, **kwargs)
        atexit.register(release_resource_requests)
    else:
        # The dashboard (on 127.0.0.1 only) serves Ray's state API, which Ray Train uses to watch its
        # controller; without it Train logs a warning every few seconds.
        ray.init(num_cpus=config.num_cpus, **kwargs)
    quiet(config.verbose)
    resources = ray.cluster_resources()
    print(f"[ray] {'joined the Ray cluster at ' + address if address else 'started a local Ray'}: "
          f"{len([n for n in ray.nodes() if n['Alive']])} node(s), {resources.get('CPU', 0):g} CPUs, "
          f"{resources.get('GPU', 0):g} GPUs", flush=True)


def cluster_cpus() -> float:
    """The CPUs of the cluster Ray is connected to."""
    return float(ray.cluster_resources().get("CPU", 1))


def cluster_gpus() -> float:
    """The GPUs of the cluster Ray is connected to (logical ones included: the autoscaling twin's)."""
    return float(ray.cluster_resources().get("GPU", 0))


def quiet(verbose: bool) -> None:
    """Ray's driver-side loggers at WARNING; Ray Data's and Tune's console output off (their log files
    keep it; boneage prints each stage's progress and outcome, and its own summary of any failure)."""
    context = ray.data.DataContext.get_current()
    # One bar per dataset on a terminal (rows done of all), not one per operator; none without one.
    context.enable_progress_bars = verbose or interactive()
    context.enable_operator_progress_bars = verbose
    context.print_on_execution_start = verbose
    if verbose:
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # Tune's newer console output prints a table even at verbose=0
    for name in ("ray", "ray.train"):
        logging.getLogger(name).setLevel(logging.WARNING)
    logging.getLogger("ray.tune").setLevel(logging.CRITICAL)  # trial errors: boneage.distributed.ray_cv says them
    for handler in logging.getLogger("ray.data").handlers:  # its file handler keeps everything
        if isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler):
            handler.setLevel(logging.ERROR)


def train_device() -> torch.device:
    """The torch device of a Ray Train worker (or local-mode trial). Where Ray assigned a GPU that has
    no CUDA device behind it (a logical GPU: a local twin of a GPU cluster, a misdeclared node), the
    CPU, and the log says so, instead of failing on the first tensor moved to the GPU."""
    if torch.cuda.is_available():
        from ray.train.torch import get_device

        return get_device()  # the worker's own GPU (its index), not just "cuda"
    return actor_device(bool(ray.get_gpu_ids()), "train")


def actor_device(use_gpu: bool, what: str) -> torch.device:
    """The torch device of a Ray Data actor (key point predictor, bundle scorer) or Train worker that asked
    for a GPU or not. On a logical GPU with no CUDA device behind it, the CPU, and the log says so."""
    if use_gpu and torch.cuda.is_available():
        return torch.device("cuda")
    if use_gpu:
        print(f"[{what}] Ray assigned GPU {ray.get_gpu_ids()} but torch sees no CUDA device: running on the CPU",
              flush=True)
    return torch.device("cpu")


class ReleaseOrphanedPlacementGroups(ControllerCallback, WorkerGroupCallback):
    """Stands in for placement group cleanup that Ray Train V2 (ray 2.60, pinned) skips. When a worker's
    node dies after its worker group counts as started but before the train function runs on it
    (Train's own start-up callbacks, the launch), Train's start-up cleanup skips the group and the
    controller never held it to shut down: its placement group outlives the run (one created by an
    actor lives as long as the job), GCS reschedules it onto another node, and there it holds the CPU
    or GPU that Tune's retry of the trial waits for, forever. One worker group runs at a time, so before
    a group starts and when the controller ends, every placement group this controller created is over:
    remove any that is still there. Ray's RunConfig takes internal callbacks for such workarounds."""

    def before_worker_group_start(self, worker_group_context) -> None:
        self._release()

    async def before_controller_shutdown(self) -> None:
        self._release()  # after the controller shut its worker group down (or failed to)

    def before_controller_abort(self) -> None:
        self._release()

    @staticmethod
    def _release() -> None:
        log = logging.getLogger("boneage")
        try:
            for group in placement_groups_created_by(ray.get_runtime_context().get_actor_id()):
                ray.util.remove_placement_group(group)
                log.warning("removed placement group %s: its worker group was never shut down", group.id.hex())
        except Exception as err:  # noqa: BLE001 - best effort, as Train's own cleaner
            log.warning("could not look for orphaned placement groups: %s", err)


def placement_groups_created_by(actor_id: str) -> list:
    """The placement groups that the actor `actor_id` (hex) created and that are not removed. GCS
    records each group's creator; Ray's public table leaves that field out, so this reads GCS's own."""
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup

    groups = []
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        data = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if data.creator_actor_id.hex() == actor_id and data.state != gcs_pb2.PlacementGroupTableData.REMOVED:
            groups.append(PlacementGroup(ray.PlacementGroupID(data.placement_group_id)))
    return groups


def torch_config():
    """One Train worker per run has no collective to run: gloo works with and without CUDA (nccl
    would fail on a logical GPU)."""
    from ray.train.torch import TorchConfig

    return TorchConfig(backend="gloo")


def release_resource_requests() -> None:
    """Clear the cluster's standing autoscaler request. Ray Data and Tune ask the autoscaler for
    resources (`request_resources`), and the request outlives the job: idle nodes, GPU ones included,
    would stay up for it. Called when the CV's trials are done and when a run that joined a cluster ends."""
    try:
        from ray.autoscaler.sdk import request_resources

        if ray.is_initialized():
            request_resources(bundles=[])
    except Exception as err:  # noqa: BLE001 - at exit: say it, never fail the run for it
        print(f"[ray] could not clear the autoscaler's resource request ({type(err).__name__}: {err})")
