"""Scoring from a PACS against scoring the same files from a folder: `boneage score dicomweb+http://...`
against a local Orthanc, and `boneage score FOLDER`, alternating, in one process.

    PYTHONPATH=. python bench/bench_dicomweb.py --n 200 --runs 2 --dicom-n 24 \
        --json bench/results/dicomweb_200.json

Writes `--n` uncompressed 12-bit DX instances made from 24 synthetic hand radiographs at 512x384 (as
bench/bench_score_export.py does), 10 per study, into a folder and into a fresh Orthanc (Debian's
`orthanc` + `orthanc-dicomweb`, started like the tests start it: loopback, authentication on, its own
temporary storage). Scores them with the tiny untrained test bundle (tests/tiny_bundle.py: the model
maths is not what is measured), each run the real command (`python -m boneage.cli score`, its own local
Ray) in a subprocess into a fresh output, alternating folder and PACS `--runs` times:

1. plain scoring: FOLDER against `dicomweb+http://... --studies FILE` (listing + WADO-RS retrieval);
2. with the DICOM output, on the first `--dicom-n` studies' instances (each one draws its card: seconds
   per image): FOLDER `--dicom-out DIR` against the PACS with `--stow` (the SR and SC sent back).

Reports images/s (median over runs) of each and the ratios PACS / folder, the instances Orthanc holds
after (sources + one SR and one SC per scored image), and the load average (a shared machine).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

from bench_score_export import _dicom  # noqa: E402
from boneage.data import synth  # noqa: E402

PER_STUDY = 10


def write_instances(root: Path, n: int, seed: int = 0) -> tuple[list, list[str]]:
    """(datasets, study UIDs): `n` DX instances, PER_STUDY a study, also written under root/images."""
    import pydicom

    data = synth.write_dataset(24, root / "synthetic", seed=seed, size=(512, 384), progress=False)
    bases = [np.asarray(Image.open(p).convert("L")) for p in sorted(Path(data["images"]).glob("*.png"))]
    folder = root / "images"
    folder.mkdir()
    datasets, studies = [], []
    for i in range(n):
        if i % PER_STUDY == 0:
            studies.append(pydicom.uid.generate_uid())
        ds = pydicom.dcmread(io.BytesIO(_dicom(bases[i % len(bases)].astype(np.uint16) * 16, None)))
        ds.StudyInstanceUID = studies[-1]
        ds.SeriesInstanceUID = pydicom.uid.generate_uid(entropy_srcs=[studies[-1], "series"])
        ds.save_as(folder / f"IM{i:04d}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return datasets, studies


def run(args: list[str], env: dict) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "boneage.cli", "score", *args], env=env, capture_output=True,
                          text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"boneage score failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--dicom-n", type=int, default=20, help="instances scored with DICOM output (0: skip)")
    parser.add_argument("--json", help="write the results here")
    options = parser.parse_args()

    import orthanc_server
    import pandas as pd
    import requests
    from dicomweb_client.api import DICOMwebClient
    from tiny_bundle import write_tiny_bundle

    tmp = Path(tempfile.mkdtemp(prefix="bench-dicomweb-"))
    datasets, studies = write_instances(tmp, options.n)
    bundle = str(tmp / "bundle")
    write_tiny_bundle(bundle)
    (tmp / "orthanc").mkdir()
    process, server = orthanc_server.start(tmp / "orthanc")
    loads = [os.getloadavg()[0]]
    results: dict = {"n": options.n, "runs": options.runs, "per_study": PER_STUDY}
    try:
        session = requests.Session()
        session.auth = server["auth"]
        client = DICOMwebClient(url=server["url"], session=session)
        started = time.perf_counter()
        for i in range(0, len(datasets), 20):
            client.store_instances(datasets[i:i + 20])
        results["upload_s"] = round(time.perf_counter() - started, 2)
        env = {**os.environ, "PYTHONPATH": str(REPO), "BONEAGE_DICOMWEB_USER": server["auth"][0],
               "BONEAGE_DICOMWEB_PASSWORD": server["auth"][1]}
        pacs = "dicomweb+" + server["url"]
        number = {str(ds.SOPInstanceUID): i for i, ds in enumerate(datasets)}  # a PACS row's id -> file IM<i>

        def compare(name: str, count: int, folder_extra, pacs_extra) -> None:
            chosen = studies[: -(-count // PER_STUDY)]
            listed = tmp / f"{name}-studies.txt"
            listed.write_text("\n".join(chosen) + "\n")
            files = tmp / f"{name}-files.txt"
            files.write_text("\n".join(str(tmp / "images" / f"IM{i:04d}.dcm") for i in range(len(chosen) * PER_STUDY)))
            seconds: dict[str, list[float]] = {"folder": [], "pacs": []}
            outcomes: dict[str, set] = {"folder": set(), "pacs": set()}
            for r in range(options.runs):
                for variant in ("folder", "pacs") if r % 2 == 0 else ("pacs", "folder"):  # neither always first
                    out = tmp / f"{name}-{variant}{r}"
                    common = ["--bundle", bundle, "--out", str(out), "--num-cpus", "2"]
                    if variant == "folder":
                        args = [str(files), *common, *folder_extra(out)]
                    else:
                        args = [pacs, "--studies", str(listed), *common, *pacs_extra(out)]
                    seconds[variant].append(run(args, env))
                    table = pd.read_parquet(out)
                    assert len(table) == len(chosen) * PER_STUDY, (variant, len(table))
                    # the same images, the same outcome: the error code (or ok) per image, in file order
                    index = table.id.map(number) if variant == "pacs" else table.id.str[2:].astype(int)
                    order = table.assign(index=index.to_numpy()).sort_values("index")
                    outcomes[variant].add(tuple(order.error.fillna("ok").str.split(":").str[0]))
                    loads.append(os.getloadavg()[0])
            images = len(chosen) * PER_STUDY
            assert len(outcomes["folder"] | outcomes["pacs"]) == 1, outcomes  # every run, either way, the same
            rate = {v: images / statistics.median(s) for v, s in seconds.items()}
            codes = next(iter(outcomes["folder"]))
            results[name] = {"images": images, "seconds": seconds,
                             "rows_by_code": {c: codes.count(c) for c in sorted(set(codes))},
                             "images_per_s": {v: round(x, 3) for v, x in rate.items()},
                             "pacs_over_folder": round(rate["pacs"] / rate["folder"], 3)}
            print(name, json.dumps(results[name]), flush=True)

        compare("plain", options.n, lambda out: [], lambda out: [])
        if options.dicom_n:
            compare("dicom", options.dicom_n, lambda out: ["--dicom-out", f"{out}-dicom"], lambda out: ["--stow"])
            results["orthanc_instances_after"] = len(
                requests.get(f"{server['base']}/instances", auth=server["auth"], timeout=30).json())
    finally:
        orthanc_server.stop(process)
        shutil.rmtree(tmp, ignore_errors=True)
    results["loadavg_1min"] = loads
    print(json.dumps(results, indent=1))
    if options.json:
        Path(options.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
