"""Scoring a hospital-style export: a mixed PACS folder tree in, one row per file out, and how fast.

    python bench/bench_score_export.py --n 300 --runs 3 --out bench/results/score_export.json
    python bench/bench_score_export.py --n 3000 --runs 1 --kill-resume --out bench/results/score_export_3000.json

Writes a temporary export of `--n` files: nested patient/study folders whose file names collide
(`IM0001` in every study), PNG 8-bit and 16-bit, JPEG, DICOM uncompressed, RLE, JPEG-LS and JPEG 2000,
extension-less DICOM, and ~5% broken files (empty, truncated, text). The images are synthetic hand
radiographs (boneage.data.synth) at 512x384. It then scores the export `--runs` times with a small untrained
bundle (tests/tiny_bundle.py: two kinds, two folds, geometric key points: the model maths is not what is
measured here), each run afresh into a new folder of parts, each run the real command (`python -m
boneage.cli score`, its own local Ray) in a subprocess, and reports: rows against files, error rows by
code, end-to-end images/s (median over runs), and in the same run the decode-only rate of boneage.data.images
(one process) and of plain PIL on the PNGs, with the ratio; the driver's peak memory (its VmHWM) and the
Ray workers' (every `ray::` process under the driver, sampled from /proc every 0.5 s).

`--kill-resume` then starts the same command once more, SIGKILLs the driver's whole process tree when
`--kill-at` of the files have a row in a finished part, reruns the command to completion and checks that
every file has exactly one row, that the rerun scored only the files without one, and how much time the
interruption cost against the uninterrupted runs. Needs the [dicom] extra.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from boneage.distributed import ray_score  # noqa: E402
from boneage.data import synth
from boneage.errors import error_code  # noqa: E402
from boneage.data.images import list_images, read_image  # noqa: E402

KINDS = ("png8", "png16", "jpeg", "dicom", "dicom_rle", "dicom_jpegls", "dicom_j2k", "dicom_noext")


def _dicom(pixels16: np.ndarray, syntax: str | None) -> bytes:
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientSex, ds.PatientAge = "DX", "F", "009Y"
    ds.Rows, ds.Columns = pixels16.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels16.astype("<u2").tobytes()
    if syntax:
        ds.compress(getattr(pydicom.uid, syntax))
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _encode(gray: np.ndarray, kind: str) -> bytes:
    buffer = io.BytesIO()
    pixels16 = gray.astype(np.uint16) * 16
    if kind == "png8":
        Image.fromarray(gray).save(buffer, "PNG")
    elif kind == "png16":
        Image.fromarray(pixels16).save(buffer, "PNG")
    elif kind == "jpeg":
        Image.fromarray(gray).save(buffer, "JPEG", quality=92)
    else:
        syntax = {"dicom_rle": "RLELossless", "dicom_jpegls": "JPEGLSLossless", "dicom_j2k": "JPEG2000Lossless"}
        return _dicom(pixels16, syntax.get(kind))
    return buffer.getvalue()


def write_export(root: Path, n: int, seed: int = 0) -> dict[str, int]:
    """The export under `root`; returns files by kind (broken ones as 'broken')."""
    data = synth.write_dataset(24, root.parent / "synthetic", seed=seed, size=(512, 384), progress=False)
    bases = [np.asarray(Image.open(p).convert("L")) for p in sorted(Path(data["images"]).glob("*.png"))]
    rng = np.random.default_rng(seed)
    counts: dict[str, int] = {}
    for i in range(n):
        study = root / f"patient{i // 4:04d}" / f"study{i % 2 + 1}"
        study.mkdir(parents=True, exist_ok=True)
        kind = KINDS[i % len(KINDS)]
        ext = {"png8": ".png", "png16": ".png", "jpeg": ".jpg", "dicom_noext": ""}.get(kind, ".dcm")
        # Two files per study, IM0001 and IM0002: the names collide across every study.
        name = f"IM{(i % 4) // 2 + 1:04d}{ext}"
        data_bytes = _encode(bases[i % len(bases)], kind)
        if rng.random() < 0.05:  # broken: empty, cut in half, or not an image
            data_bytes = rng.choice([b"", data_bytes[: len(data_bytes) // 2], b"exported report\n"])
            kind = "broken"
        (study / name).write_bytes(data_bytes)
        counts[kind] = counts.get(kind, 0) + 1
    return counts


# ------------------------------------------------------------------------------------------------
# Memory of a process tree, from /proc
# ------------------------------------------------------------------------------------------------

# Ray's per-node agents are `ray::` processes too, but not the workers that decode and score.
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent")


def _parents() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, start time in clock ticks) of every process (start time tells a reused pid)."""
    parents = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
        except OSError:
            continue
        parents[int(entry.name)] = (int(fields[1]), fields[19])
    return parents


def _status_kb(pid: int, keys: tuple[str, ...]) -> dict[str, int]:
    values = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                name = line.split(":", 1)[0]
                if name in keys:
                    values[name] = int(line.split()[1])
    except OSError:
        pass
    return values


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages (torch's libraries, Ray's object store) split between the
    processes mapping them, so that a sum over workers does not count them once per worker."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return ""


class TreeMemory(threading.Thread):
    """Samples, every `interval` s, the driver process `root` and its descendants: the driver's peak RSS
    (VmHWM, the kernel's own high-water mark), and the Ray workers' (`ray::` processes but Ray's agents)
    RSS summed, PSS summed and the largest single worker's peak. Remembers every descendant it saw, so
    that a killed run's leftovers can be found by pid; and the 1-minute load average while it ran."""

    def __init__(self, root: int, interval: float = 0.5):
        super().__init__(daemon=True)
        self.root, self.interval = root, interval
        self.stopped = threading.Event()
        self.seen: dict[int, str] = {}  # pid -> start time
        self.driver_peak_kb = 0
        self.workers_rss_sum_peak_kb = self.workers_pss_sum_peak_kb = self.worker_peak_kb = 0
        self.tree_pss_sum_peak_kb = 0
        self.workers_max = 0
        self.loads: list[float] = []

    def descendants(self, parents: dict[int, tuple[int, str]]) -> list[int]:
        children: dict[int, list[int]] = {}
        for pid, (ppid, _) in parents.items():
            children.setdefault(ppid, []).append(pid)
        found, todo = [], [self.root]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def sample(self) -> None:
        parents = _parents()
        if self.root not in parents:
            return
        tree = self.descendants(parents)
        for pid in tree:
            self.seen.setdefault(pid, parents[pid][1])
        driver = _status_kb(self.root, ("VmHWM",)).get("VmHWM", 0)
        self.driver_peak_kb = max(self.driver_peak_kb, driver)
        workers = [p for p in tree if _cmdline(p).startswith("ray::") and not _cmdline(p).startswith(RAY_AGENTS)]
        rss = [_status_kb(p, ("VmRSS", "VmHWM")) for p in workers]
        self.workers_rss_sum_peak_kb = max(self.workers_rss_sum_peak_kb, sum(r.get("VmRSS", 0) for r in rss))
        self.worker_peak_kb = max([self.worker_peak_kb] + [r.get("VmHWM", 0) for r in rss])
        self.workers_pss_sum_peak_kb = max(self.workers_pss_sum_peak_kb, sum(_pss_kb(p) for p in workers))
        self.tree_pss_sum_peak_kb = max(self.tree_pss_sum_peak_kb, sum(_pss_kb(p) for p in tree))
        self.workers_max = max(self.workers_max, len(workers))
        with open("/proc/loadavg") as f:
            self.loads.append(float(f.read().split()[0]))

    def run(self) -> None:
        while not self.stopped.is_set():
            self.sample()
            self.stopped.wait(self.interval)

    def stop(self) -> dict:
        self.stopped.set()
        self.join()
        mb = lambda kb: round(kb / 1024, 1)  # noqa: E731
        return {"driver_peak_rss_mb": mb(self.driver_peak_kb),
                "workers_rss_sum_peak_mb": mb(self.workers_rss_sum_peak_kb),
                "workers_pss_sum_peak_mb": mb(self.workers_pss_sum_peak_kb),
                "largest_worker_peak_rss_mb": mb(self.worker_peak_kb),
                "tree_pss_sum_peak_mb": mb(self.tree_pss_sum_peak_kb),
                "workers_at_most": self.workers_max,
                "load_1min": {"mean": round(statistics.mean(self.loads), 2) if self.loads else None,
                              "max": max(self.loads) if self.loads else None}}

    def kill_leftovers(self) -> int:
        """SIGKILL every descendant seen that is still alive (by pid, checked against its start time):
        Ray's workers run in process groups of their own. Returns how many were still there."""
        parents, left = _parents(), 0
        for pid, started in self.seen.items():
            if pid in parents and parents[pid][1] == started:
                left += 1
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        return left


# ------------------------------------------------------------------------------------------------
# Runs of the real command
# ------------------------------------------------------------------------------------------------


def score_command(export: Path, bundle: Path, out: Path, num_cpus: int | None) -> list[str]:
    command = [sys.executable, "-m", "boneage.cli", "score", str(export), "--bundle", str(bundle), "--out", str(out)]
    return command + (["--num-cpus", str(num_cpus)] if num_cpus else [])


def rows_in_finished_parts(folder: Path, counted: dict[str, int]) -> int:
    """Rows in the parts whose footer can be read (a part being written has none yet); `counted` caches
    the finished ones, which never change."""
    for part in folder.glob("*.parquet") if folder.is_dir() else ():
        if part.name not in counted:
            try:
                counted[part.name] = pq.read_metadata(part).num_rows
            except Exception:
                continue
    return sum(counted.values())


# Ray gives its raylet a fixed 30 s to register (ray/_private/node.py); on 2 cores shared with other
# jobs a niced start can miss it. Such a run did no work: it is started again, and the time counted.
RAY_START_TIMEOUT = "The current node timed out during startup"


def run_command(command: list[str], log: Path, kill_at_rows: int | None = None, parts: Path | None = None,
                tries: int = 3) -> dict:
    """`_run_once`, again (up to `tries` times) when Ray itself failed to start; `failed_starts_s` is
    the time those attempts took (also in wall_s)."""
    failed_s = []
    for _ in range(tries):
        result = _run_once(command, log, kill_at_rows, parts)
        if result["returncode"] == 0 or result["killed_with_rows"] is not None or RAY_START_TIMEOUT not in result["output"]:
            break
        failed_s.append(result["wall_s"])
        print(f"Ray did not start in time ({log.name}); again", flush=True)
    return {**result, "wall_s": round(result["wall_s"] + sum(failed_s), 1), "failed_starts_s": failed_s}


def _run_once(command: list[str], log: Path, kill_at_rows: int | None = None, parts: Path | None = None) -> dict:
    """Run `command` in a session of its own, logging to `log`, sampling its memory. With `kill_at_rows`,
    SIGKILL its process group and every descendant once the finished parts under `parts` hold that many
    rows. Returns the wall time, the exit status, whether it was killed, its memory and its output."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, never a cluster
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
                                   start_new_session=True)
    monitor = TreeMemory(process.pid)
    monitor.start()
    killed_with_rows, counted = None, {}
    while process.poll() is None:
        if kill_at_rows is not None and rows_in_finished_parts(parts, counted) >= kill_at_rows:
            killed_with_rows = sum(counted.values())
            monitor.sample()  # the tree as it is now: every pid to kill
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            break
        time.sleep(1.0)
    wall = time.perf_counter() - started
    memory = monitor.stop()
    leftovers = 0
    if killed_with_rows is not None or process.returncode != 0:  # nothing of a failed run may linger
        leftovers = monitor.kill_leftovers()
        deadline = time.time() + 30
        while monitor.kill_leftovers() and time.time() < deadline:
            time.sleep(0.5)
    return {"wall_s": round(wall, 1), "returncode": process.returncode, "killed_with_rows": killed_with_rows,
            "processes_left_after_group_kill": leftovers, "memory": memory, "output": log.read_text()}


def check_output(out: Path, files: list[str]) -> tuple[dict, "pd.DataFrame"]:
    """Every listed file exactly once, and nothing else."""
    table = ray_score.read_output(str(out), ("id", "uri", "status", "error", "scored_at"))
    per_uri = table.uri.value_counts()
    listed = set(files)
    codes = table.loc[table.status != "ok", "error"].map(error_code).value_counts().to_dict()
    return {"rows": int(len(table)), "files_without_row": len(listed - set(table.uri)),
            "rows_of_unlisted_files": int((~table.uri.isin(listed)).sum()),
            "files_with_more_than_one_row": int((per_uri > 1).sum()), "ids_unique": bool(table.id.is_unique),
            "error_rows_by_code": {str(k): int(v) for k, v in codes.items()}}, table


def kill_and_resume(command: list[str], out: Path, files: list[str], logs: Path, kill_at: float,
                    uninterrupted_s: float) -> dict:
    cut = run_command(command, logs / "killed.log", kill_at_rows=int(kill_at * len(files)),
                      parts=Path(ray_score.parts_uri(str(out))))
    if cut["killed_with_rows"] is None:
        raise SystemExit(f"the run ended (status {cut['returncode']}) before {kill_at:.0%} of the files had a row: "
                         f"{cut['output'][-2000:]}")
    rerun = run_command(command, logs / "rerun.log")
    if rerun["returncode"] != 0:
        raise SystemExit(f"the rerun failed (status {rerun['returncode']}): {rerun['output'][-2000:]}")
    said = re.search(r"(\d+) files already have a row in .*; scoring the other (\d+)", rerun["output"])
    checks, table = check_output(out, files)
    # Each run stamps its rows with its start time: the rerun's rows are those with the latest stamp.
    by_run = table.scored_at.value_counts().sort_index()
    rerun_rows = int(by_run.iloc[-1]) if len(by_run) > 1 else 0
    kept = int(said.group(1)) if said else None
    return {
        **checks,
        "kill_at_fraction": kill_at,
        "rows_in_finished_parts_at_kill": cut["killed_with_rows"],
        "rows_kept_said_by_rerun": kept,
        "rerun_said_it_would_score": int(said.group(2)) if said else None,
        "rows_scored_by_rerun": rerun_rows,
        "rows_by_run": [int(v) for v in by_run.to_numpy()],
        "rerun_scored_only_files_without_row": kept is not None and rerun_rows == len(files) - kept,
        "killed_run_s": cut["wall_s"], "rerun_s": rerun["wall_s"],
        "failed_starts_s": cut["failed_starts_s"] + rerun["failed_starts_s"],
        "processes_left_after_group_kill": cut["processes_left_after_group_kill"],
        "time_lost_s": round(cut["wall_s"] + rerun["wall_s"] - uninterrupted_s, 1),
        "memory_killed_run": cut["memory"], "memory_rerun": rerun["memory"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="files in the export")
    parser.add_argument("--runs", type=int, default=3, help="uninterrupted runs, each afresh")
    parser.add_argument("--num-cpus", type=int, default=None, help="CPUs of each run's local Ray (default: all)")
    parser.add_argument("--kill-resume", action="store_true",
                        help="also kill a run part-way (SIGKILL, whole process tree) and resume it")
    parser.add_argument("--kill-at", type=float, default=0.5, help="share of the files with a row at the kill")
    parser.add_argument("--out", help="write the JSON result here too")
    args = parser.parse_args()
    from tiny_bundle import write_tiny_bundle

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        started = time.perf_counter()
        counts = write_export(tmp / "export", args.n)
        files = list_images(str(tmp / "export"))
        # By the listing rule an extension-less file is an input only with the DICOM marker: a broken
        # extension-less file (empty, or text) is not one.
        listed = set(files)
        not_listed = sorted(str(p.relative_to(tmp / "export")) for p in (tmp / "export").rglob("*")
                            if p.is_file() and str(p) not in listed)
        write_tiny_bundle(str(tmp / "bundle"))
        print(f"export of {len(files)} files written in {time.perf_counter() - started:.0f} s", flush=True)
        # Decode only, one process: boneage.data.images on every file, plain PIL on the PNGs.
        started = time.perf_counter()
        for uri in files:
            try:
                read_image(uri)
            except Exception:
                pass
        decode_rate = len(files) / (time.perf_counter() - started)
        pngs = [f for f in files if f.endswith(".png")]
        started = time.perf_counter()
        for uri in pngs:
            try:
                np.asarray(Image.open(uri).convert("L"))
            except Exception:
                pass
        pil_rate = len(pngs) / (time.perf_counter() - started)
        print(f"decode only: {decode_rate:.1f} images/s; PIL on PNGs: {pil_rate:.1f} images/s", flush=True)

        runs, checks = [], None
        for r in range(args.runs):
            out = tmp / f"predictions-{r}"
            result = run_command(score_command(tmp / "export", tmp / "bundle", out, args.num_cpus),
                                 tmp / f"run-{r}.log")
            if result["returncode"] != 0:
                raise SystemExit(f"run {r} failed (status {result['returncode']}): {result['output'][-2000:]}")
            checks, _ = check_output(out, files)
            runs.append({"wall_s": result["wall_s"], "images_per_s": round(len(files) / result["wall_s"], 2),
                         "failed_starts_s": result["failed_starts_s"], "memory": result["memory"], **checks})
            print(f"run {r}: {json.dumps(runs[-1])}", flush=True)
            if args.out:  # what is measured so far survives a bench cut short
                Path(args.out).write_text(json.dumps({"partial": True, "files_listed": len(files), "runs": runs,
                                                      "decode_only_images_per_s_one_process": round(decode_rate, 1)},
                                                     indent=2) + "\n")
        rates = [r["images_per_s"] for r in runs]
        median_wall = statistics.median(r["wall_s"] for r in runs)
        resumed = None
        if args.kill_resume:
            out = tmp / "predictions-resumed"
            resumed = kill_and_resume(score_command(tmp / "export", tmp / "bundle", out, args.num_cpus), out, files,
                                      tmp, args.kill_at, median_wall)
            print(f"kill and resume: {json.dumps(resumed)}", flush=True)
    result = {
        "files_written": args.n, "files_listed": len(files), "files_not_listed": not_listed,
        "files_by_kind": counts, **checks,
        "score_images_per_s": {"median": round(statistics.median(rates), 2), "runs": rates},
        "decode_only_images_per_s_one_process": round(decode_rate, 1),
        "pil_png_decode_images_per_s_one_process": round(pil_rate, 1),
        "score_vs_decode_only": round(statistics.median(rates) / decode_rate, 3),
        "runs": runs,
        "kill_and_resume": resumed,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
