"""`boneage serve` under load, on loopback, against `boneage score` on the same images in the same run.

    python bench/bench_serve.py $RSNA_DEV/images runs/embedded/bundle --n 16 --clients 1,4,16 --replicas 1,2 \
        --out bench/results/serve_embedded.json

Starts a local Ray (all CPUs). First `boneage score` (boneage.run.score) over the first N images of the folder,
timed without Ray's start-up: batch images/s. Then, for each replica count, the service (boneage.run.serving;
each replica gets the CPUs divided among the replicas), one warm-up request, and for each client count C a
round of max(N, 2C) requests, C at a time from C threads (httpx, a connection each), every image sent as
the raw body without sex or age (as `boneage score` without a subjects CSV): throughput (answers 200 per
second of the round's wall time), latency p50/p95/p99 of the answered requests, and how many were
refused with 503. Last, an overload round: 1 replica with a queue of 2 working and 2 waiting, 16 clients:
how many 503s, and that each carries Retry-After. Each round also gives the largest difference between
the bone age the service answered for an image and its `boneage score` row's. Prints JSON (and writes
it to --out).
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import ray

from boneage import run
from boneage.config import RayConfig, ServeConfig
from boneage.distributed import ray_env, ray_serve
from boneage.run import serving


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def batch_rate(paths: list[str], bundle: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        table = run.score(paths, bundle, str(Path(tmp) / "scored.parquet"))
        seconds = time.perf_counter() - started
    return {"images": len(paths), "scored": int(table["boneage_months"].notna().sum()), "seconds": seconds,
            "images_per_s": len(paths) / seconds, "boneage_months": dict(zip(table["uri"], table["boneage_months"]))}


def load_round(url: str, bodies: list[bytes], clients: int, requests: int) -> dict:
    answers: dict[int, float] = {}  # image index: the bone age the service gave

    def one(i: int, client: httpx.Client) -> tuple[int, float, str | None]:
        started = time.perf_counter()
        answer = client.post(f"{url}/v1/boneage", content=bodies[i % len(bodies)],
                             headers={"content-type": "application/octet-stream"})
        if answer.status_code == 200:
            answers[i % len(bodies)] = answer.json()["boneage_months"]
        return answer.status_code, time.perf_counter() - started, answer.headers.get("retry-after")

    pool_clients = [httpx.Client(timeout=600) for _ in range(clients)]
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda i: one(i, pool_clients[i % clients]), range(requests)))
    wall = time.perf_counter() - started
    for client in pool_clients:
        client.close()
    ok = [latency for status, latency, _ in results if status == 200]
    percentile = (lambda q: float(np.percentile(ok, q))) if ok else (lambda q: None)
    return {"clients": clients, "requests": requests, "ok": len(ok),
            "refused_503": sum(status == 503 for status, _, _ in results),
            "other": sorted({status for status, _, _ in results} - {200, 503}),
            "retry_after": sorted({r for status, _, r in results if status == 503 and r}),
            "seconds": wall, "images_per_s": len(ok) / wall,
            "latency_p50_s": percentile(50), "latency_p95_s": percentile(95), "latency_p99_s": percentile(99),
            "latency_mean_s": statistics.fmean(ok) if ok else None, "boneage_months": answers}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images")
    parser.add_argument("bundle")
    parser.add_argument("--n", type=int, default=16)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--replicas", default="1,2")
    parser.add_argument("--torch-threads", type=int, help="serve.torch_threads of the replicas (default: Ray's)")
    parser.add_argument("--out")
    args = parser.parse_args()
    paths = sorted(str(p) for p in Path(args.images).iterdir() if p.suffix.lower() in (".png", ".jpg", ".dcm"))[:args.n]
    bodies = [Path(p).read_bytes() for p in paths]
    ray_env.init_ray(RayConfig())
    cpus = ray.cluster_resources().get("CPU", 1)
    result = {"images": len(paths), "cpus": cpus, "torch_threads": args.torch_threads, "batch": batch_rate(paths, args.bundle), "serve": []}
    batch = result["batch"].pop("boneage_months")
    print(json.dumps(result["batch"]), flush=True)
    for replicas in (int(r) for r in args.replicas.split(",")):
        settings = ServeConfig(port=free_port(), replicas=replicas, cpus_per_replica=cpus / replicas,
                               max_ongoing_requests=8, max_queued_requests=64, torch_threads=args.torch_threads)
        url = serving.serve(args.bundle, settings, wait=False)
        try:
            load_round(url, bodies, 1, 1)  # warm-up: the first request of a replica pays for its imports
            for clients in (int(c) for c in args.clients.split(",")):
                before = httpx.get(f"{url}/v1/health").json()["scored"]
                measured = {"replicas": replicas, **load_round(url, bodies, clients, max(len(bodies), 2 * clients))}
                if replicas == 1:  # the one replica's count: how many images a batch of the zone models held
                    after = httpx.get(f"{url}/v1/health").json()["scored"]
                    measured["images_per_batch"] = ((after["images"] - before["images"])
                                                    / max(1, after["batches"] - before["batches"]))
                # the same image through the service and through `boneage score`: the same bone age
                measured["max_abs_diff_vs_batch_months"] = max(
                    abs(v - batch[paths[i]]) for i, v in measured.pop("boneage_months").items())
                print(json.dumps(measured), flush=True)
                result["serve"].append(measured)
        finally:
            ray_serve.shutdown()
    settings = ServeConfig(port=free_port(), replicas=1, cpus_per_replica=cpus, max_ongoing_requests=2,
                           max_queued_requests=2, retry_after_s=1)
    url = serving.serve(args.bundle, settings, wait=False)
    try:
        load_round(url, bodies, 1, 1)
        result["overload"] = {"max_ongoing_requests": 2, "max_queued_requests": 2,
                              **load_round(url, bodies, 16, 32)}
        result["overload"].pop("boneage_months")
        print(json.dumps(result["overload"]), flush=True)
    finally:
        ray_serve.shutdown()
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
