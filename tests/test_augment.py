import pytest
import torch

from boneage.model.augment import NO_AUGMENT, Augment, ZoneSampler, keypoint_sampler, points_to_output
from boneage.registration.frame import FRAME_H, FRAME_W
from boneage.model.networks import model_kind


def bank_with_square(cx, cy, half, res=(1040, 800), n=1):
    """Bank of n images (uint8) with a 255 square of half-size `half`, centred at frame (cx, cy)."""
    h, w = res
    bank = torch.zeros(n, 1, h, w, dtype=torch.uint8)
    sx, sy = w / FRAME_W, h / FRAME_H
    bank[:, :, round((cy - half) * sy) : round((cy + half) * sy), round((cx - half) * sx) : round((cx + half) * sx)] = 255
    return bank


def centroid(img):
    """Intensity centroid (row, col) of a [-1, 1] crop, in output pixel indices."""
    wgt = (img + 1) / 2
    rows, cols = torch.meshgrid(torch.arange(img.shape[0]), torch.arange(img.shape[1]), indexing="ij")
    return (wgt * rows).sum() / wgt.sum(), (wgt * cols).sum() / wgt.sum()


@pytest.mark.parametrize("zone", ["A", "B", "C"])
@pytest.mark.parametrize("scale,res", [(1.0, (1040, 800)), (0.25, (260, 200))])
def test_eval_crop_lands_where_the_box_says(zone, scale, res):
    kind = model_kind(f"{zone}-reg", scale)
    x0, y0, bw, bh = kind.box
    h, w = kind.input_size
    # A square well inside the box, off its centre; frame coordinates on the bank's pixel grid.
    step = FRAME_W / res[1]
    cx, cy = (round((x0 + 0.3 * bw) / step) * step, round((y0 + 0.7 * bh) / step) * step)
    half = 8 * step
    crop = ZoneSampler(kind.box, kind.input_size)(bank_with_square(cx, cy, half, res), torch.tensor([0]))[0, 0]
    assert crop.shape == (h, w)
    r, c = centroid(crop)
    # Exact up to interpolation: a half-pixel (align_corners) slip would be off by >= 0.5.
    assert abs(c - ((cx - x0) / bw * w - 0.5)) < 0.1
    assert abs(r - ((cy - y0) / bh * h - 0.5)) < 0.1
    # Inside the square full white, far away the black background.
    assert crop[round(float(r)), round(float(c))] == pytest.approx(1.0, abs=1e-5)
    assert crop[0, 0] == pytest.approx(-1.0) and crop[-1, -1] == pytest.approx(-1.0)


def test_augmentation_changes_crops_keeps_shape_and_is_seeded():
    kind = model_kind("B-cls", 0.25)
    bank = torch.randint(0, 256, (4, 1, 260, 200), dtype=torch.uint8)
    idx = torch.arange(4)
    s = ZoneSampler(kind.box, kind.input_size, Augment())
    plain = s(bank, idx)
    a1 = s(bank, idx, torch.Generator().manual_seed(1), train=True)
    a1b = s(bank, idx, torch.Generator().manual_seed(1), train=True)
    a2 = s(bank, idx, torch.Generator().manual_seed(2), train=True)
    assert plain.shape == a1.shape == (4, 1, *kind.input_size) and a1.dtype == torch.float32
    assert torch.equal(a1, a1b) and not torch.allclose(a1, a2) and not torch.allclose(a1, plain)
    assert torch.equal(plain, ZoneSampler(kind.box, kind.input_size, NO_AUGMENT)(bank, idx, train=True))


def test_points_follow_the_image_under_augmentation():
    # A dot at a known point: after a random affine its crop centroid is where points_to_output
    # puts the point.
    cx, cy = 500.0, 700.0
    bank = bank_with_square(cx, cy, 48, res=(1040, 800), n=8)
    s = keypoint_sampler(Augment(rotate_deg=20, shift=0.1, zoom=0.15, brightness=0, contrast=0))
    x, theta = s.sample(bank, torch.arange(8), torch.Generator().manual_seed(0), train=True)
    pts = points_to_output(theta, torch.tensor([[[cx / FRAME_W, cy / FRAME_H]]]).expand(8, 1, 2))
    assert theta[:, 0, 1].abs().max() > 0  # really rotated
    for img, p in zip(x[:, 0], pts[:, 0]):
        r, c = centroid(img)
        assert abs(c - (p[0] * img.shape[1] - 0.5)) < 0.15 and abs(r - (p[1] * img.shape[0] - 0.5)) < 0.15


def test_points_identity_in_eval():
    s = keypoint_sampler()
    theta = s.theta(2, "cpu")
    p = torch.rand(2, 3, 2)
    assert torch.allclose(points_to_output(theta, p), p, atol=1e-6)


def test_bad_bank_is_refused():
    with pytest.raises(ValueError):
        ZoneSampler((0, 0, 10, 10), (4, 4))(torch.zeros(1, 1, 8, 8), torch.tensor([0]))


def test_pooling_once_per_bank_cuts_the_same_crops_as_pooling_every_batch():
    import gc

    import torch.nn.functional as F

    from boneage.model import augment
    from boneage.model.networks import model_kind

    bank = torch.randint(0, 255, (12, 1, 1040, 800), dtype=torch.uint8)
    idx = torch.tensor([3, 1, 7, 11])
    for scale in (0.125, 0.25):
        kind = model_kind("A-reg", scale)
        sampler = ZoneSampler(kind.box, kind.input_size, Augment(brightness=0.0, contrast=0.0))
        k = sampler._pool_factor(1040, 800)
        assert k >= 4 and augment._cache_pooling(bank, k)
        crops, theta = sampler.sample(bank, idx, torch.Generator().manual_seed(0), train=True)
        per_batch = F.avg_pool2d(bank[idx].float(), k)
        grid = F.affine_grid(theta, [4, 1, *kind.input_size], align_corners=False)
        expected = F.grid_sample(per_batch, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        torch.testing.assert_close(crops, expected * (2 / 255) - 1, rtol=0, atol=1e-6)
        assert augment.pooled_bank(bank, k) is augment.pooled_bank(bank, k)  # pooled once
    # another bank (a new trial's) is never served the old one's pooling
    other = torch.zeros_like(bank)
    assert augment.pooled_bank(other, 8).abs().max() == 0
    del bank
    gc.collect()
    augment.pooled_bank(other, 4)  # drops the entries of banks that are gone
    assert all(ref() is not None for ref, _ in augment._POOLED.values())


def test_test_time_views_are_fixed_jitters_of_the_box_in_balanced_pairs():
    from boneage.model.augment import TTA_VIEWS, tta_views

    kind = model_kind("B-reg", 0.25)
    bank = torch.randint(0, 256, (3, 1, 260, 200), dtype=torch.uint8)
    idx = torch.arange(3)
    s = ZoneSampler(kind.box, kind.input_size, Augment())
    plain = s(bank, idx)
    assert tta_views(1) == (TTA_VIEWS[0],) and len(tta_views(9)) == 9
    assert torch.equal(s(bank, idx, view=TTA_VIEWS[0]), plain)  # the first view is the plain crop
    crops = [s(bank, idx, view=v) for v in TTA_VIEWS]
    for view, crop in zip(TTA_VIEWS[1:], crops[1:]):
        assert torch.equal(crop, s(bank, idx, view=view))  # deterministic: no generator, same crop
        assert not torch.allclose(crop, plain)
        assert view.rotate_deg <= Augment().rotate_deg and abs(view.zoom - 1) <= Augment().zoom
        assert max(abs(view.shift_x), abs(view.shift_y)) <= Augment().shift
    for a, b in zip(TTA_VIEWS[1::2], TTA_VIEWS[2::2]):  # each pair is one jitter and its opposite
        assert (a.rotate_deg, a.shift_x, a.shift_y, a.zoom - 1) == (-b.rotate_deg, -b.shift_x, -b.shift_y, 1 - b.zoom)
    # A square in the box's middle moves the way the view says: right for +shift_x (the box moves right).
    x0, y0, bw, bh = kind.box
    square = bank_with_square(x0 + bw / 2, y0 + bh / 2, 0.1 * bw, (1040, 800))
    c0 = centroid(s(square, torch.tensor([0]))[0, 0])[1]
    c1 = centroid(s(square, torch.tensor([0]), view=TTA_VIEWS[3])[0, 0])[1]
    assert TTA_VIEWS[3].shift_x > 0 and c1 < c0 - 0.5
    with pytest.raises(ValueError):
        tta_views(10)
    with pytest.raises(ValueError, match="inference"):
        s(bank, idx, torch.Generator().manual_seed(0), train=True, view=TTA_VIEWS[1])
