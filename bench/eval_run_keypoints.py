"""Key point accuracy of a preprocessing run against hand annotations (rsna-dev's keypoints_hand21.csv:
middle_finger4 = finger tip, thumb4 = thumb tip, wrist), as % of hand length (wrist to middle_finger4),
and the angle of the annotated middle finger axis (middle_finger1 → middle_finger4) from vertical after
registration with the run's transform.

    python workflows/preprocess.py --images $RSNA_DEV/images \
        --labels $RSNA_DEV/labels.csv --output runs/rsna-dev
    python bench/eval_run_keypoints.py runs/rsna-dev $RSNA_DEV/keypoints_hand21.csv
"""

from __future__ import annotations

import argparse

import numpy as np

from boneage.data import labels, storage
from boneage.registration import register
from boneage.distributed.ray_prepare import read_registered


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run folder (with registered/)")
    parser.add_argument("hand21", help="keypoints_hand21.csv")
    args = parser.parse_args()

    table = read_registered(storage.join_uri(args.run, "registered"), with_images=False).set_index("id")
    hand21 = labels.read_hand21(args.hand21)
    results = []
    for rid, pts in sorted(hand21.items()):
        row = table.loc[rid] if rid in table.index else None
        if row is None or row.status != "ok":
            results.append((rid, None, np.nan, np.nan, np.nan))
            continue
        wrist, tip, thumb = (np.array(pts[n]) for n in ("wrist", "middle_finger4", "thumb4"))
        length = np.linalg.norm(tip - wrist)
        found_tip = np.array([row.finger_tip_x, row.finger_tip_y])
        found_thumb = np.array([row.thumb_tip_x, row.thumb_tip_y])
        matrix = np.vstack([np.asarray(row["transform"]).reshape(2, 3), [0, 0, 1]])
        base, end = register.transform_points(matrix, [pts["middle_finger1"], pts["middle_finger4"]])
        angle = abs(np.degrees(np.arctan2(end[0] - base[0], base[1] - end[1])))
        results.append((rid, row.keypoint_source, 100 * np.linalg.norm(found_tip - tip) / length,
                        100 * np.linalg.norm(found_thumb - thumb) / length, angle))

    n = len(results)
    tip_err, thumb_err, angles = (np.array([r[i] for r in results], float) for i in (2, 3, 4))
    print(f"{n} annotated images, {int(np.isnan(tip_err).sum())} not registered")
    for name, e in (("middle finger tip", tip_err), ("thumb tip", thumb_err)):
        e = e[~np.isnan(e)]
        print(f"{name:18s} median {np.median(e):5.2f}%  max {e.max():6.1f}%  <=3%: {(e <= 3).sum()}/{n}  "
              f"<=5%: {(e <= 5).sum()}/{n}")
    a = angles[~np.isnan(angles)]
    print(f"finger axis angle  median {np.median(a):5.1f} deg  max {a.max():6.1f} deg  <=5 deg: {(a <= 5).sum()}/{n}")
    sources = [r[1] for r in results if r[1]]
    print("key point sources:", {s: sources.count(s) for s in sorted(set(sources))})


if __name__ == "__main__":
    main()
