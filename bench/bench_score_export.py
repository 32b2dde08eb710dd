"""Scoring a hospital-style export: a mixed PACS folder tree in, one row per file out, and how fast.

    python bench/bench_score_export.py --n 300 --runs 3 --out bench/results/score_export.json

Writes a temporary export of `--n` files: nested patient/study folders whose file names collide
(`IM0001` in every study), PNG 8-bit and 16-bit, JPEG, DICOM uncompressed, RLE, JPEG-LS and JPEG 2000,
extension-less DICOM, and ~5% broken files (empty, truncated, text). The images are synthetic hand
radiographs (boneage.synth) at 512x384. It then scores the export `--runs` times with a small untrained
bundle (tests/tiny_bundle.py: two kinds, two folds, geometric key points: the model maths is not what is
measured here), each run afresh into a new output, and reports: rows against files, error rows by code,
end-to-end images/s (median over runs), and in the same run the decode-only rate of boneage.images
(one process) and of plain PIL on the PNGs, with the ratio. Needs the [dicom] extra.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from boneage import ray_env, run, synth  # noqa: E402
from boneage.config import RayConfig  # noqa: E402
from boneage.errors import error_code  # noqa: E402
from boneage.images import list_images, read_image  # noqa: E402

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=300, help="files in the export")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=None)
    parser.add_argument("--out", help="write the JSON result here too")
    args = parser.parse_args()
    from tiny_bundle import write_tiny_bundle

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        counts = write_export(tmp / "export", args.n)
        files = list_images(str(tmp / "export"))
        write_tiny_bundle(str(tmp / "bundle"))
        # Decode only, one process: boneage.images on every file, plain PIL on the PNGs.
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

        ray_env.init_ray(RayConfig(num_cpus=args.num_cpus))
        rates, table = [], None
        for r in range(args.runs):
            out = tmp / f"predictions-{r}.parquet"
            started = time.perf_counter()
            run.score(str(tmp / "export"), str(tmp / "bundle"), str(out))
            rates.append(len(files) / (time.perf_counter() - started))
            table = pd.read_parquet(out)
    codes = table.loc[table.status != "ok", "error"].map(error_code).value_counts().to_dict()
    result = {
        "files_written": args.n, "files_listed": len(files), "rows": int(len(table)),
        "ids_unique": bool(table.id.is_unique), "files_by_kind": counts,
        "error_rows_by_code": {str(k): int(v) for k, v in codes.items()},
        "score_images_per_s": {"median": round(statistics.median(rates), 2), "runs": [round(x, 2) for x in rates]},
        "decode_only_images_per_s_one_process": round(decode_rate, 1),
        "pil_png_decode_images_per_s_one_process": round(pil_rate, 1),
        "score_vs_decode_only": round(statistics.median(rates) / decode_rate, 3),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
