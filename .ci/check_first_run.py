"""What the README's main command must have written (CI runs it right after that command):

    .venv/bin/python .ci/check_first_run.py runs/embedded

a bundle whose manifest verifies (every file's size and SHA-256) and says it was trained on synthetic
radiographs, report/report.html with its
pictures, an out-of-fold table with one row per labelled image outside the locked test split and no
null prediction, and the locked test split scored by the bundle. Exit status 1 with the reasons if not.
"""

import json
import re
import sys
from pathlib import Path

import pandas as pd

from boneage.bundle import load_bundle
from boneage.data.ingest import build_manifest


def main(run: str) -> int:
    out = Path(run)
    problems = []
    bundle = load_bundle(str(out / "bundle"))  # raises BundleError on a missing or changed file
    if not bundle.manifest.get("accuracy", {}).get("test_split", {}).get("n"):
        problems.append("the bundle's manifest carries no locked-test accuracy")
    # what it was trained on: the embedded default's synthetic hands (boneage score warns on real ones)
    data = bundle.manifest.get("data") or {}
    if data.get("kind") != "synthetic" or (bundle.training.get("data") or {}).get("kind") != "synthetic":
        problems.append(f"the bundle does not record that it was trained on synthetic radiographs: data {data}")

    html = (out / "report" / "report.html").read_text()
    pictures = re.findall(r'src="([^"]+\.png)"', html)
    if "Locked test split" not in html or len(pictures) < 4:
        problems.append(f"report.html lacks the test section or pictures ({len(pictures)} pictures)")
    problems += [f"report picture {p} missing" for p in pictures if not (out / "report" / p).is_file()]

    synthetic = out / "synthetic"
    labelled = build_manifest(str(synthetic / "images"), str(synthetic / "labels.csv"))
    labelled = labelled[labelled.status == "ok"]
    test = pd.read_csv(out / "test" / "split.csv", dtype={"id": str})
    oof = pd.read_parquet(out / "cv" / "oof.parquet")
    expected = set(labelled.id) - set(test.id)
    if set(oof.id) != expected or not oof.id.is_unique:
        problems.append(f"oof.parquet has {len(oof)} rows for {len(expected)} labelled images outside the test split")
    kinds = [k for k in bundle.kinds if k in oof]
    if len(kinds) != len(bundle.kinds) or oof[kinds].isna().any().any():
        problems.append(f"oof.parquet has null predictions or lacks kinds: {oof[kinds].isna().sum().to_dict()}")
    if bundle.manifest.get("sex_kind") and ("p_male" not in oof or oof["p_male"].isna().any()):
        problems.append("oof.parquet lacks the sex classifier's out-of-fold P(male) (p_male) for some images")
    if set(test.id) & set(oof.id):
        problems.append("test split images took part in CV")
    metrics = json.loads((out / "test" / "metrics.json").read_text())
    if metrics["scored"] != len(test) or not len(test):
        problems.append(f"the test split: {metrics['scored']} of {len(test)} scored")

    for problem in problems:
        print(f"check_first_run: {problem}", file=sys.stderr)
    if not problems:
        print(f"check_first_run: {out} ok: bundle verified ({len(bundle.manifest['files'])} files, trained on "
              f"{data['images']} synthetic radiographs), "
              f"{len(oof)} out-of-fold rows, {len(test)} test images scored, report with {len(pictures)} pictures; "
              f"test MAE {metrics['accuracy']['all']['mae']:.2f} months")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "runs/embedded"))
