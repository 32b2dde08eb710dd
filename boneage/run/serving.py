"""`boneage serve`: a bundle as an HTTP service (boneage.distributed.ray_serve), started on the connected Ray
and kept up until interrupted. docs/serving.md."""

from __future__ import annotations

import signal
import sys
import time
from typing import Any, Mapping

from boneage.config import ServeConfig, absolute
from boneage.errors import UserError


def check_installed() -> None:
    """UserError naming the extra when Ray Serve, FastAPI or python-multipart is missing."""
    from importlib.util import find_spec

    missing = [name for name in ("ray.serve", "fastapi", "multipart") if find_spec(name) is None]
    if missing:
        raise UserError(f"boneage serve needs {', '.join(missing)}: pip install 'boneage[serve]'")


def serve(bundle_uri: str, settings: ServeConfig, storage_options: Mapping[str, Any] | None = None,
          wait: bool = True) -> str:
    """Check the bundle (every file against its manifest's hash: a bad bundle fails here, before Serve
    starts), start the service and print where it answers; with `wait`, serve until Ctrl-C, then shut
    Serve down. Returns the service's base URL. Ray is started by the caller."""
    from boneage import bundle as bundle_mod
    from boneage.distributed import ray_serve
    from boneage.run.scoring import measured_accuracy_line

    bundle_uri = absolute(bundle_uri)  # the replicas run elsewhere than the caller's working directory
    loaded = bundle_mod.load_bundle(bundle_uri, storage_options)
    print(f"[serve] bundle {bundle_uri} (manifest sha256 {loaded.sha256[:12]}): {len(loaded.kinds)} kinds x "
          f"{len(loaded.sexes)} sexes x {loaded.manifest['folds']} folds", flush=True)
    accuracy = measured_accuracy_line(loaded.manifest)
    if accuracy:
        print(accuracy.replace("[score]", "[serve]"), flush=True)
    data = bundle_mod.training_data(loaded.manifest)
    if data["kind"] == "synthetic":  # said once, at start, where batch scoring says it when real images come
        print(f"WARNING: this bundle was trained on {data['images']} SYNTHETIC hand radiographs (`boneage synth`): "
              "its bone ages mean nothing for real hands (GET /v1/model: training_data)", file=sys.stderr, flush=True)
    scaling = (f"{settings.replicas}-{settings.max_replicas} replicas (autoscaled)" if settings.max_replicas
               else f"{settings.replicas} replica(s)")
    print(f"[serve] starting {scaling}, {settings.cpus_per_replica:g} CPU and {settings.gpus_per_replica:g} GPU "
          f"each; batches of up to {settings.max_batch_size}", flush=True)
    token = "a bearer token on every route but /v1/health" if ray_serve.read_token(settings.token_file) else "no token"
    print(f"[serve] listening on {settings.host}:{settings.port}, {token}", flush=True)
    url = ray_serve.start(bundle_uri, settings, storage_options, loaded.sha256)
    print(f"[serve] answering at {url}/v1/boneage (OpenAPI: {url}/docs); Ctrl-C stops it", flush=True)
    if not wait:
        return url
    # SIGTERM (docker stop, a process manager) stops it as Ctrl-C does: Serve shut down, not left running.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
    finally:
        ray_serve.shutdown()
    return url


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
