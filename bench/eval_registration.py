"""Mask + geometric key points + registration measured on the real rsna-dev sample.

    .venv/bin/python bench/eval_registration.py [--data DIR] [--sheets OUT_DIR] [--limit N]

Prints: key point errors on the 27 images with hand21 annotations; the capitate calibration on
the 38 images registered by the 2017 pipeline; where the rois.csv boxes land in the frame (zone
placement check); QA counts over all images, and writes contact sheets of the registered images
(100 per sheet, id under each; '?' marks a QA flag).
"""

from __future__ import annotations

import argparse
import csv
import glob
import os
from concurrent.futures import ProcessPoolExecutor

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage as ndi

from boneage.registration import frame, keypoints_geometric, preprocess, register

# An rsna-dev folder (docs/benchmarks.md: images/<id>.png, labels.csv, keypoints_hand21.csv), from $RSNA_DEV
DATA = os.environ.get("RSNA_DEV")


def load(path: str) -> np.ndarray:
    return np.asarray(Image.open(path).convert("L"))


def pipeline(image: np.ndarray):
    clean, mask, qa = preprocess.preprocess(image)
    kp, conf, info = keypoints_geometric.estimate_keypoints(mask)
    return clean, mask, qa, kp, conf, info


def pt(row: dict, name: str) -> np.ndarray:
    return np.array([float(row[name + "_x"]), float(row[name + "_y"])])


def eval_hand21(data: str) -> None:
    rows = list(csv.DictReader(open(f"{data}/keypoints_hand21.csv")))
    tip_err, thumb_err, angles, along = [], [], [], []
    for r in rows:
        _, _, _, kp, conf, _ = pipeline(load(f"{data}/images/{r['id']}.png"))
        hand_len = np.linalg.norm(pt(r, "wrist") - pt(r, "middle_finger4"))
        tip_err.append(100 * np.linalg.norm(kp[0] - pt(r, "middle_finger4")) / hand_len)
        thumb_err.append(100 * np.linalg.norm(kp[2] - pt(r, "thumb4")) / hand_len)
        axis = pt(r, "middle_finger4") - pt(r, "middle_finger1")
        along.append(100 * np.dot(pt(r, "middle_finger4") - kp[0], axis / np.linalg.norm(axis)) / hand_len)
        m = register.registration_transform(kp)
        a, b = register.transform_points(m, [pt(r, "middle_finger1"), pt(r, "middle_finger4")])
        angles.append(abs(np.degrees(np.arctan2(b[0] - a[0], a[1] - b[1]))))
    tip_err, thumb_err, angles = map(np.array, (tip_err, thumb_err, angles))
    n = len(rows)
    print(f"== hand21 annotations: {n} images; error as % of hand length (wrist to middle_finger4)")
    for name, e in (("middle finger tip", tip_err), ("thumb tip", thumb_err)):
        print(f"{name:18s} median {np.median(e):5.2f}%  mean {e.mean():5.2f}%  max {e.max():6.1f}%  "
              f"<=3%: {(e <= 3).sum()}/{n}  <=5%: {(e <= 5).sum()}/{n}")
    print(f"annotated tip lies {-np.median(along):.2f}% of hand length inside our (extreme) tip (median, along the finger)")
    print(f"registered middle finger axis (mf1->mf4) from vertical: median {np.median(angles):.1f} deg, "
          f"max {angles.max():.1f} deg, <=5 deg: {(angles <= 5).sum()}/{n}")
    ok = tip_err <= 5
    print(f"  over the {ok.sum()} images with tip error <=5%: axis angle median {np.median(angles[ok]):.1f}, max {angles[ok].max():.1f} deg")


def reference_mask(img: np.ndarray) -> np.ndarray:
    return ndi.binary_fill_holes(ndi.binary_opening(img > 8, iterations=2))


def eval_reference(data: str) -> None:
    """The 2017 pipeline put the tip at (400, 50) and the capitate at (400, 800) of these
    800x1040 images: our estimator on them calibrates CAPITATE_K and checks the tip convention."""
    files = sorted(glob.glob(f"{data}/registered_reference/*.png"))
    cap = np.array([400.0, 800.0])
    ks, tips, caps, thumbs = [], [], [], []
    for f in files:
        kp, conf, info = keypoints_geometric.estimate_keypoints(reference_mask(load(f)))
        tip = kp[0]
        ks.append(np.linalg.norm(cap - tip) / np.linalg.norm(np.array(info["web_mid_xy"]) - tip))
        tips.append(tip), caps.append(kp[1]), thumbs.append(kp[2])
    ks, tips, caps, thumbs = map(np.array, (ks, tips, caps, thumbs))
    print(f"== registered_reference: {len(files)} images (2017 registration, 800x1040; tip target (400,50), capitate (400,800))")
    print(f"capitate factor k (tip-capitate distance / tip-web midpoint distance): median {np.median(ks):.3f}, "
          f"IQR {np.percentile(ks, 25):.3f}-{np.percentile(ks, 75):.3f} (used: {keypoints_geometric.CAPITATE_K})")
    print(f"our tip on them: median ({np.median(tips[:, 0]):.1f}, {np.median(tips[:, 1]):.1f}); "
          f"distance to (400,50) median {np.median(np.linalg.norm(tips - [400, 50], axis=1)):.1f} px")
    print(f"our capitate on them: distance to (400,800) median {np.median(np.linalg.norm(caps - cap, axis=1)):.1f} px "
          f"(= {100 * np.median(np.linalg.norm(caps - cap, axis=1)) / 750:.1f}% of tip-capitate)")
    right = thumbs[:, 0] > 400
    print(f"thumb tip found on the right (thumb side) in {right.sum()}/{len(files)}; frame x,y of the thumb "
          f"(5/50/95 pct): x {np.percentile(2 * thumbs[right, 0], [5, 50, 95]).round()}, "
          f"y {np.percentile(2 * thumbs[right, 1], [5, 50, 95]).round()}")


def eval_rois(data: str) -> None:
    """Register the ROI-annotated images with our key points; where do the boxes land?"""
    rows = list(csv.DictReader(open(f"{data}/rois.csv")))
    by_id: dict[str, list[dict]] = {}
    for r in rows:
        by_id.setdefault(r["id"], []).append(r)
    land: dict[str, list[np.ndarray]] = {}
    for i, rs in by_id.items():
        _, _, _, kp, conf, _ = pipeline(load(f"{data}/images/{i}.png"))
        if conf < 0.5:
            continue
        m = register.registration_transform(kp)
        for r in rs:
            box = np.array([[float(r["xmin"]), float(r["ymin"])], [float(r["xmax"]), float(r["ymax"])],
                            [float(r["xmin"]), float(r["ymax"])], [float(r["xmax"]), float(r["ymin"])]])
            p = register.transform_points(m, box)
            land.setdefault(r["region"], []).append(np.r_[p.min(0), p.max(0)])
    print(f"== rois.csv: {len(by_id)} images, registered with our key points (confidence >= 0.5); "
          f"boxes in frame coords, median [x0 y0 x1 y1], 5-95 pct of each edge")
    for reg, bs in sorted(land.items()):
        b = np.array(bs)
        print(f"{reg:7s} n={len(b):3d} median {np.median(b, 0).round().astype(int)}  "
              f"x0 {np.percentile(b[:, 0], [5, 95]).round().astype(int)} x1 {np.percentile(b[:, 2], [5, 95]).round().astype(int)}  "
              f"y0 {np.percentile(b[:, 1], [5, 95]).round().astype(int)} y1 {np.percentile(b[:, 3], [5, 95]).round().astype(int)}")
    for z in frame.ZONES.values():
        print(f"zone {z.name}: x {z.x0:.0f}-{z.x0 + z.width:.0f}, y {z.y0:.0f}-{z.y0 + z.height:.0f}")


def run_one(path: str):
    img = load(path)
    clean, mask, qa, kp, conf, info = pipeline(img)
    item = os.path.basename(path)[:-4]
    if not np.isfinite(kp).all():
        return item, None, qa, conf, {"registration_doubtful": True}
    m = register.registration_transform(kp)
    reg = register.warp_to_frame(clean, m)
    rqa = register.registration_qa(m, kp, img.shape, reg)
    thumb = Image.fromarray(reg).resize((80, 104), Image.BILINEAR)
    return item, np.asarray(thumb), qa, conf, rqa


def write_sheets(results, out_dir: str, per_sheet: int = 100) -> list[str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    tw, th, cols = 80, 104, 10
    for s in range(0, len(results), per_sheet):
        chunk = results[s : s + per_sheet]
        rows = (len(chunk) + cols - 1) // cols
        sheet = Image.new("L", (cols * tw, rows * (th + 11)), 40)
        d = ImageDraw.Draw(sheet)
        for j, (item, thumb, qa, conf, rqa) in enumerate(chunk):
            x, y = (j % cols) * tw, (j // cols) * (th + 11)
            if thumb is not None:
                sheet.paste(Image.fromarray(thumb), (x, y))
            flag = qa["mask_doubtful"] or rqa["registration_doubtful"] or conf < 0.5
            d.text((x + 2, y + th), f"{item}{' ?' if flag else ''}", fill=255)
        p = f"{out_dir}/registered_sheet_{s // per_sheet:02d}.png"
        sheet.save(p, optimize=True)
        paths.append(p)
    return paths


def eval_all(data: str, sheets: str, limit: int | None) -> None:
    files = sorted(glob.glob(f"{data}/images/*.png"))[:limit]
    with ProcessPoolExecutor(os.cpu_count()) as ex:
        results = list(ex.map(run_one, files, chunksize=8))
    n = len(results)
    mask_flag = sum(r[2]["mask_doubtful"] for r in results)
    low_conf = sum(r[3] < 0.5 for r in results)
    reg_flag = sum(r[4]["registration_doubtful"] for r in results)
    any_flag = sum(r[2]["mask_doubtful"] or r[3] < 0.5 or r[4]["registration_doubtful"] for r in results)
    print(f"== all images: {n}; mask doubtful {mask_flag}, key point confidence < 0.5: {low_conf}, "
          f"registration doubtful {reg_flag}; any flag {any_flag} ({100 * any_flag / n:.1f}%)")
    paths = write_sheets(results, sheets)
    print(f"contact sheets: {paths[0]} .. {paths[-1]}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=DATA, required=DATA is None,
                    help="an rsna-dev folder: images/<id>.png, labels.csv, keypoints_hand21.csv (docs/benchmarks.md); "
                         "default: $RSNA_DEV")
    ap.add_argument("--sheets", default="/tmp/boneage_registered_sheets")
    ap.add_argument("--limit", type=int, default=None)
    ap.add_argument("--skip-all", action="store_true", help="skip the run over all images")
    a = ap.parse_args()
    eval_hand21(a.data)
    eval_reference(a.data)
    eval_rois(a.data)
    if not a.skip_all:
        eval_all(a.data, a.sheets, a.limit)


if __name__ == "__main__":
    main()
