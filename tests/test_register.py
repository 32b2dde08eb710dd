"""Registration geometry: key points land exactly on their targets, mirroring, rotation, warp
conventions, zone crops, QA."""

from __future__ import annotations

import numpy as np
import pytest

from boneage.registration import frame, register
from boneage.errors import ItemError

TIP, CAP = np.array(frame.FINGER_TIP_TARGET), np.array(frame.CAPITATE_TARGET)


def hand_points(angle_deg: float = 0.0, scale: float = 0.5, centre=(500.0, 600.0), thumb_right=True) -> np.ndarray:
    """Key points of an upright hand (tip above capitate, thumb to the right) rotated by
    angle_deg (counter-clockwise on screen), scaled and moved."""
    kp = np.array([TIP, CAP, [1300.0, 900.0]])
    if not thumb_right:
        kp[2, 0] = 2 * TIP[0] - kp[2, 0]
    a = np.radians(angle_deg)
    # y points down, so a counter-clockwise turn on screen is (x, y) -> (x cos + y sin, -x sin + y cos)
    rot = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
    mid = kp.mean(0)
    return (kp - mid) @ rot.T * scale + np.asarray(centre)


def test_identity_when_already_registered():
    kp = np.array([TIP, CAP, [1300.0, 900.0]])
    m = register.registration_transform(kp)
    np.testing.assert_allclose(m, np.eye(3), atol=1e-12)


@pytest.mark.parametrize("angle", [0.0, 17.0, -33.0, 90.0, 180.0, -150.0])
def test_key_points_land_exactly_on_targets(angle):
    kp = hand_points(angle, scale=0.37, centre=(321.0, 654.0))
    m = register.registration_transform(kp)
    out = register.transform_points(m, kp)
    np.testing.assert_allclose(out[0], TIP, atol=1e-9)
    np.testing.assert_allclose(out[1], CAP, atol=1e-9)
    assert out[2, 0] > TIP[0]  # thumb on the right
    assert np.linalg.det(m[:2, :2]) > 0  # a right-way-round hand is not mirrored
    np.testing.assert_allclose(np.sqrt(np.linalg.det(m[:2, :2])), 1 / 0.37, rtol=1e-9)


@pytest.mark.parametrize("angle", [0.0, 25.0, -70.0])
def test_rotation_recovered(angle):
    m = register.registration_transform(hand_points(angle))
    # the registration undoes the rotation: its rotation angle is -angle (on screen)
    got = np.degrees(np.arctan2(-m[1, 0], m[0, 0]))
    assert got == pytest.approx(-angle, abs=1e-9)


@pytest.mark.parametrize("angle", [0.0, 40.0, -120.0])
def test_mirrored_hand_is_reflected(angle):
    kp = hand_points(angle, thumb_right=False)
    m = register.registration_transform(kp)
    out = register.transform_points(m, kp)
    np.testing.assert_allclose(out[:2], [TIP, CAP], atol=1e-9)
    assert np.linalg.det(m[:2, :2]) < 0
    assert out[2, 0] == pytest.approx(1300.0)  # the thumb's mirror image of the left-hand position


def test_bad_key_points_raise_item_error():
    with pytest.raises(ItemError, match="bad_keypoints"):
        register.registration_transform(np.array([[1.0, 2.0], [1.0, 2.0], [3.0, 4.0]]))
    with pytest.raises(ItemError, match="bad_keypoints"):
        register.registration_transform(np.full((3, 2), np.nan))


def test_transform_points_homogeneous():
    m = np.array([[2.0, 0, 5], [0, 3.0, -1], [0, 0, 1]])
    np.testing.assert_allclose(register.transform_points(m, [[1, 1], [0, 0]]), [[7, 2], [5, -1]])


def test_warp_puts_key_points_on_stored_targets():
    """Bright dots at the key points of a rotated image land on the targets at STORE_SCALE;
    pixel centres are integers in both."""
    h, w = 700, 600
    kp = hand_points(30.0, scale=0.3, centre=(300.0, 350.0))
    img = np.zeros((h, w), np.uint8)
    for x, y in kp[:2]:
        yy, xx = np.mgrid[0:h, 0:w]
        img = np.maximum(img, (255 * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * 3.0**2))).astype(np.uint8))
    m = register.registration_transform(kp)
    out = register.warp_to_frame(img, m)
    assert out.shape == (frame.STORE_H, frame.STORE_W) and out.dtype == np.uint8
    s = frame.STORE_SCALE
    for target in (TIP, CAP):
        x, y = np.round(target * s).astype(int)
        win = out[y - 15 : y + 16, x - 15 : x + 16].astype(float)
        yy, xx = np.mgrid[-15:16, -15:16]
        cy, cx = (win * yy).sum() / win.sum(), (win * xx).sum() / win.sum()
        assert abs(cx) < 0.3 and abs(cy) < 0.3  # centroid of the dot on the target pixel


def test_warp_single_pixel_exact():
    img = np.zeros((200, 300), np.uint8)
    img[50, 100] = 255
    kp = np.array([[100.0, 50.0], [100.0, 150.0], [150.0, 100.0]])
    out = register.warp_to_frame(img, register.registration_transform(kp), scale=1.0)
    assert out.shape == (frame.FRAME_H, frame.FRAME_W)
    assert np.unravel_index(out.argmax(), out.shape) == (100, 800)


def test_crop_zone_sizes_and_content():
    reg = np.zeros((frame.STORE_H, frame.STORE_W), np.uint8)
    z = frame.ZONES["B"]
    s = frame.STORE_SCALE
    # mark the zone's box exactly: the crop is all marked, and has the zone's input size
    # (B's edges fall on stored pixel 212.5 / 587.5: the crop is pixels 213..587)
    y0, y1 = int(np.ceil(z.y0 * s)), int(np.ceil((z.y0 + z.height) * s))
    x0, x1 = int(np.ceil(z.x0 * s)), int(np.ceil((z.x0 + z.width) * s))
    reg[y0:y1, x0:x1] = 200
    for zone in frame.ZONES.values():
        crop = register.crop_zone(reg, zone, s)
        assert crop.shape == zone.input_size and crop.dtype == np.uint8
    crop_b = register.crop_zone(reg, z, s)
    assert crop_b.min() == 200 and np.array_equal(crop_b, reg[y0:y1, x0:x1])
    assert z.input_size == (375, 375)  # B at 1:2 from a 1:2 store: a plain cut


def test_registration_qa_flags():
    kp = hand_points(10.0, scale=0.4, centre=(500, 600))
    m = register.registration_transform(kp)
    qa = register.registration_qa(m, kp, (1000, 800))
    assert not qa["registration_doubtful"] and not qa["mirrored"]
    # a thumb on the axis (wrong finger taken as thumb) is doubtful
    bad = kp.copy()
    bad[2] = kp[0] + 0.3 * (kp[1] - kp[0])
    qa = register.registration_qa(register.registration_transform(bad), bad, (1000, 800))
    assert qa["registration_doubtful"]
