"""k-fold CV on real radiographs: the registered zone models against (a) the per-sex median and (b) a
plain whole-image CNN without registration, trained with the same budget (same net, head, folds,
epochs, input size as zone A).

    python workflows/preprocess.py --images $RSNA_DEV/images \
        --labels $RSNA_DEV/labels.csv --output runs/rsna-dev
    python bench/eval_rsna_cv.py runs/rsna-dev runs/rsna-dev-cv --epochs 30

It writes OUT/registered (links to RUN/registered) and CVs the configured kinds there, then writes
OUT-plain/registered: the same images, labels and ids, but each original radiograph only
percentile-windowed and letterboxed into the 1040x800 store (no mask, no key points, no
registration), and CVs A-reg and A-cls on it. Zone A is then nearly the whole image. Results:
OUT/cv/summary.json, OUT-plain/cv/summary.json and the comparison printed and saved to --json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from boneage.validation import cv
from boneage.registration import prepare
from boneage.distributed import ray_env
from boneage import run
from boneage.data.images import read_image
from boneage.config import load_config
from boneage.errors import STATUS_OK
from boneage.registration.frame import STORE_H, STORE_W
from boneage.distributed.ray_prepare import REGISTERED_SCHEMA, read_registered


def letterbox(image: np.ndarray) -> np.ndarray:
    """The whole image, aspect kept, centred in the STORE_H x STORE_W store on black."""
    h, w = image.shape
    scale = min(STORE_H / h, STORE_W / w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
    out = np.zeros((STORE_H, STORE_W), np.uint8)
    y, x = (STORE_H - size[1]) // 2, (STORE_W - size[0]) // 2
    out[y : y + size[1], x : x + size[0]] = small
    return out


def write_plain(registered: "pd.DataFrame", out: Path) -> None:  # noqa: F821
    """OUT/registered for the plain baseline: the labelled ok rows with letterboxed originals."""
    rows = []
    for row in registered[cv.labelled(registered)].to_dict("records"):
        image = read_image(row["uri"]).image
        rows.append({**{k: row.get(k) for k in ("id", "uri", "boneage", "male")}, "status": STATUS_OK,
                     "registered_png": prepare.encode_png(letterbox(image))})
    schema = pa.schema([REGISTERED_SCHEMA.field(n) for n in ("id", "uri", "boneage", "male", "status",
                                                             "registered_png")])
    table = pa.Table.from_pylist(rows, schema=schema)
    # read_registered wants every column of the schema: the rest are nulls here.
    for field in REGISTERED_SCHEMA:
        if field.name not in table.column_names:
            table = table.append_column(field, pa.nulls(len(table), field.type))
    (out / "registered").mkdir(parents=True, exist_ok=True)
    pq.write_table(table.select(REGISTERED_SCHEMA.names), out / "registered" / "plain.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a preprocessed run folder (with registered/)")
    parser.add_argument("out", help="output folder; OUT-plain is written beside it")
    parser.add_argument("--config", default="configs/embedded.yaml", help="CV settings (default: the embedded ones)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--json", default="bench/results/rsna_dev_cv.json")
    args = parser.parse_args()

    out, plain = Path(args.out), Path(str(args.out).rstrip("/") + "-plain")
    (out / "registered").mkdir(parents=True, exist_ok=True)
    for part in sorted(Path(args.run, "registered").glob("*.parquet")):
        link = out / "registered" / part.name
        if not link.exists():
            os.symlink(part.resolve(), link)
    if not (plain / "registered" / "plain.parquet").exists():
        write_plain(read_registered(str(Path(args.run, "registered")), with_images=False), plain)

    overrides = {"cv": {"epochs": args.epochs, "k": args.k}}
    config = load_config(args.config, {**overrides, "output": str(out)})
    ray_env.init_ray(config.ray)
    registered = run.cross_validate(config)
    plain_config = load_config(args.config, {"cv": {**overrides["cv"], "kinds": ["A-reg", "A-cls"]},
                                             "output": str(plain)})
    baseline = run.cross_validate(plain_config)

    result = {"settings": {**overrides["cv"], "config": args.config, "run": args.run},
              "registered": registered["mae"], "plain_whole_image": baseline["mae"],
              "seconds": {"registered": registered["seconds"], "plain": baseline["seconds"]}}
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"[eval] written {args.json}")


if __name__ == "__main__":
    main()
