"""Synthetic radiographs: determinism, key points on the anatomy, mask, ageing, data set files."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from boneage.data import synth
from boneage.registration.frame import KEYPOINT_NAMES

SMALL = (512, 380)


@pytest.fixture(scope="module")
def cases():
    """A spread of nuisance cases at the small size, with internal ground truth."""
    return [synth.render_case_with_truth(s, size=SMALL) for s in range(12)]


def test_same_seed_same_pixels():
    a = synth.render_case(11, size=(256, 190))
    b = synth.render_case(11, size=(256, 190))
    c = synth.render_case(12, size=(256, 190))
    assert a.image.dtype == np.uint8 and a.image.shape == (256, 190)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert np.array_equal(a.keypoints, b.keypoints) and a.boneage == b.boneage
    assert not np.array_equal(a.image, c.image)


def test_fixed_age_and_sex_keep_the_pose():
    young, ty = synth.render_case_with_truth(5, age_months=24, male=True, size=(256, 190))
    old, to = synth.render_case_with_truth(5, age_months=180, male=True, size=(256, 190))
    assert young.true_age == 24 and old.true_age == 180
    # one seed, one pose and one hand (the age-strip pictures rely on it)
    assert young.mirrored == old.mirrored and ty["pose"].angle == to["pose"].angle
    assert np.linalg.norm(young.keypoints[1] - old.keypoints[1]) < 5


def test_full_size_varies_around_rsna():
    case = synth.render_case(3)
    h, w = case.image.shape
    assert 0.85 * 2044 - 1 <= h <= 1.15 * 2044 + 1 and 0.85 * 1514 - 1 <= w <= 1.15 * 1514 + 1
    assert case.mask.shape == (h, w)


def _inside(mask, p):
    x, y = np.round(p).astype(int)
    return 0 <= y < mask.shape[0] and 0 <= x < mask.shape[1] and bool(mask[y, x])


def test_capitate_key_point_is_on_the_capitate():
    for s in range(6):
        case, truth = synth.render_case_with_truth(s, age_months=60 + 20 * s, size=SMALL)
        cap = case.keypoints[KEYPOINT_NAMES.index("capitate")]
        assert _inside(truth["bone"], cap) and _inside(case.mask, cap)
        x, y = np.round(cap).astype(int)
        # brighter than the soft tissue around the carpus (a ring 12-20 px away, in the mask)
        yy, xx = np.mgrid[: SMALL[0], : SMALL[1]]
        r = np.hypot(xx - x, yy - y)
        tissue = case.mask & ~truth["bone"] & (r > 8) & (r < 25)
        assert case.image[y - 1:y + 2, x - 1:x + 2].mean() > np.median(case.image[tissue])


@pytest.mark.parametrize("which", ["finger_tip", "thumb_tip"])
def test_tips_are_soft_tissue_tips_over_the_distal_phalanx(cases, which):
    """Tips are where the finger's soft tissue ends (as annotated on real radiographs): on the mask's
    edge, with the distal phalanx's bone just proximal to them."""
    k = KEYPOINT_NAMES.index(which)
    yy, xx = np.mgrid[-6:7, -6:7]
    for case, truth in cases:
        tip = case.keypoints[k]
        x, y = np.round(tip).astype(int)
        window = case.mask[y - 6 : y + 7, x - 6 : x + 7]
        assert window.any() and not window.all()  # on the edge of the hand
        near = (xx**2 + yy**2) <= 2.5**2
        assert window[near].any()  # within 2.5 px of tissue
        ys, xs = np.nonzero(truth["bone"])
        assert np.min(np.hypot(xs - tip[0], ys - tip[1])) < 20  # bone (the distal phalanx) close by
    for case, _ in cases:  # the middle finger tip is the hand's farthest point from the capitate
        tip, cap = case.keypoints[0], case.keypoints[1]
        ys, xs = np.nonzero(case.mask)
        reach = np.hypot(xs - cap[0], ys - cap[1])
        assert np.hypot(*(tip - cap)) > reach.max() - 4


def test_thumb_side_follows_mirroring():
    mirrored = 0
    for s in range(60):
        case = synth.render_case(s, size=(96, 72))
        tip, cap, thumb = case.keypoints
        a, b = tip - cap, thumb - cap
        cross = a[0] * b[1] - a[1] * b[0]  # > 0: thumb to the right of the finger axis (y down)
        assert (cross < 0) == case.mirrored
        mirrored += case.mirrored
    assert 1 <= mirrored <= 15


def test_mask_covers_bone_and_is_plausible(cases):
    for case, truth in cases:
        bone = truth["bone"]
        assert 0.08 < case.mask.mean() < 0.6
        # all bone inside the silhouette; the mask is the silhouette where exposed (collimation
        # and borders hide bone and tissue alike)
        assert (bone & ~truth["tissue"]).sum() == 0
        assert (case.mask & ~truth["tissue"]).sum() == 0
        assert (bone & ~case.mask).sum() <= 0.05 * bone.sum()
    clean, truth = synth.render_case_with_truth(4, size=SMALL, nuisance=False)
    assert (truth["bone"] & ~clean.mask).sum() == 0


def test_key_points_inside_the_picture_and_exposed():
    """Collimation, borders and markers never hide a key point."""
    from scipy import ndimage

    for s in range(40):
        case = synth.render_case(s, size=(256, 190))
        h, w = case.image.shape
        kp = case.keypoints
        assert (kp >= 0).all() and (kp[:, 0] < w).all() and (kp[:, 1] < h).all()
        exposed = ndimage.binary_dilation(case.mask, iterations=2)
        assert all(_inside(exposed, p) for p in kp), s


def test_bone_brighter_than_soft_tissue_brighter_than_background():
    case, truth = synth.render_case_with_truth(2, age_months=140, size=SMALL, nuisance=False)
    img = case.image.astype(float)
    bone, tissue, bg = img[truth["bone"]], img[case.mask & ~truth["bone"]], img[~case.mask]
    assert np.median(bone) > np.median(tissue) + 20 > np.median(bg) + 40


def _stats(age, male):
    return synth.build_hand(age, male, np.random.default_rng(0)).stats


@pytest.mark.parametrize("male", [True, False])
def test_maturity_indicators_increase_with_age(male):
    ages = np.arange(0, 229, 6)
    stats = [_stats(a, male) for a in ages]
    for key in ("carpals", "carpal_area", "epi_ratio", "fused"):
        vals = [s[key] for s in stats]
        assert all(b >= a - 1e-9 for a, b in zip(vals, vals[1:])), key
    assert _stats(1, male)["carpals"] == 0
    assert _stats(8, male)["carpals"] == 2  # capitate and hamate in the first months
    assert _stats(180, male)["carpals"] == 8
    assert _stats(120, male)["fused"] < 0.05 and _stats(228, male)["fused"] == 1.0


def test_girls_mature_earlier_than_boys():
    assert _stats(48, False)["carpals"] > _stats(48, True)["carpals"] or \
        _stats(48, False)["carpal_area"] > _stats(48, True)["carpal_area"]
    assert _stats(168, False)["fused"] > _stats(168, True)["fused"]


def test_carpal_order():
    seen = []
    for a in range(0, 229, 2):
        hand = synth.build_hand(a, True, np.random.default_rng(0))
        for s in hand.shapes:
            if s.kind == "carpal" and s.name not in seen:
                seen.append(s.name)
    assert seen[:2] in (["capitate", "hamate"], ["hamate", "capitate"])
    assert seen.index("triquetrum") < seen.index("lunate") < seen.index("scaphoid")
    assert seen.index("pisiform") > seen.index("scaphoid") and "sesamoid" in seen


def test_age_sampling_like_rsna():
    rng = np.random.default_rng(0)
    ages = np.array([synth.sample_age(rng) for _ in range(4000)])
    assert ages.min() >= 1 and ages.max() <= 228
    assert 0.6 < np.mean((ages >= 96) & (ages <= 180)) < 0.9
    assert np.mean(ages < 48) > 0.03


def test_label_is_noisy_true_age():
    diffs = [c.boneage - c.true_age for c in (synth.render_case(s, size=(64, 48)) for s in range(80))]
    assert 3.0 < np.std(diffs) < 8.0 and abs(np.mean(diffs)) < 2.0


def test_write_dataset_files_and_workers(tmp_path):
    p1 = synth.write_dataset(6, tmp_path / "a", seed=3, size=(128, 96), workers=1, progress=False, masks=True)
    p2 = synth.write_dataset(6, tmp_path / "b", seed=3, size=(128, 96), workers=2, progress=False, masks=True)
    with open(p1["labels"]) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["id", "boneage", "male"]
    assert [r[0] for r in rows[1:]] == [str(i) for i in range(1, 7)]
    assert all(r[2] in ("True", "False") for r in rows[1:])
    with open(p1["keypoints"]) as f:
        assert next(csv.reader(f)) == ["id", "finger_tip_x", "finger_tip_y", "capitate_x", "capitate_y",
                                       "thumb_tip_x", "thumb_tip_y"]
    with open(p1["truth"]) as f:
        assert next(csv.reader(f)) == ["id", "true_age", "mirrored"]
    for name in ("labels", "truth", "keypoints"):
        assert p1[name].read_bytes() == p2[name].read_bytes()
    for i in range(1, 7):
        for sub in ("images", "masks"):
            assert (tmp_path / "a" / sub / f"{i}.png").read_bytes() == (tmp_path / "b" / sub / f"{i}.png").read_bytes()
    # case i of the set is render_case(case_seed(seed, i))
    from PIL import Image
    img = np.asarray(Image.open(tmp_path / "a" / "images" / "2.png"))
    assert np.array_equal(img, synth.render_case(synth.case_seed(3, 2), size=(128, 96)).image)


def test_written_radiographs_are_marked_synthetic_and_real_ones_are_not(synthetic_small, tmp_path):
    """`boneage synth` marks each PNG (Software chunk); decoding reports it; the RSNA fixtures are real."""
    from pathlib import Path

    from boneage.data import images

    written = sorted(Path(synthetic_small["images"]).glob("*.png"))
    real = sorted((Path(__file__).parent / "fixtures" / "real").glob("*.png"))
    head = written[0].read_bytes()[:images.HEAD_BYTES]
    assert images.png_text(head)["Software"].startswith("boneage synth ")
    assert images.read_image(str(written[0])).meta["synthetic"] is True
    assert images.read_image(str(real[0])).meta["synthetic"] is False
    assert images.count_synthetic(map(str, written)) == {"checked": len(written), "synthetic": len(written)}
    assert images.count_synthetic(map(str, real)) == {"checked": 4, "synthetic": 0}
    assert images.data_kind(images.count_synthetic(map(str, written))) == "synthetic"
    assert images.data_kind(images.count_synthetic(map(str, real))) == "real"
    assert images.data_kind(images.count_synthetic(map(str, written[:1] + real))) == "mixed"
    assert images.data_kind(images.count_synthetic([str(written[0]) + ".missing"])) == "unknown"
    # a file that is no image (PNG magic alone, text) is not a real radiograph either: not counted
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "notes.png").write_text("not an image\n")
    assert images.count_synthetic([str(tmp_path / "broken.png"), str(tmp_path / "notes.png"), str(written[0])]) == {
        "checked": 1, "synthetic": 1}
