"""Cards: the occlusion heatmap is faithful (it lights up exactly where the prediction depends on the
image, for a toy and for a real zone model), and a card is written per scored row."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from boneage.clinical import cards
from boneage.registration import frame, prepare
from boneage import score
from boneage.model import train
from boneage.model.augment import ZoneSampler
from boneage.bundle import load_bundle
from boneage.model.networks import model_kind

from tiny_bundle import write_tiny_bundle


def test_heatmap_peaks_where_a_toy_prediction_looks():
    rng = np.random.default_rng(0)
    image = rng.integers(50, 255, size=(160, 240), dtype=np.uint8)

    def predict(bank):  # depends only on rows 80-119, columns 120-159: tile (2, 3) of 40 px
        return bank[:, 0, 80:120, 120:160].float().mean(dim=(1, 2)).numpy()

    heat = cards.occlusion_map(predict, image, patch=40, batch=5)
    assert heat.shape == (4, 6)
    expected = np.zeros((4, 6))
    expected[2, 3] = -image[80:120, 120:160].mean()  # blacked out: the mean drops to 0
    np.testing.assert_allclose(heat, expected, rtol=1e-5, atol=1e-4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    path = tmp_path_factory.mktemp("bundle")
    write_tiny_bundle(str(path))
    return score.BundleModels(load_bundle(str(path)))


def test_heatmap_of_a_real_wrist_model_stays_inside_its_zone():
    # A real wrist-zone network (B-reg, through its ZoneSampler crop), fitted for a few steps to read the
    # grey level of zone B: masking outside the zone must change nothing, masking inside it a lot.
    torch.manual_seed(0)
    kind = model_kind("B-reg", 0.125)
    net = kind.build(0.0625, 16, 0.0)
    zone, s, p = frame.ZONES["B"], frame.STORE_SCALE, cards.PATCH
    bank = torch.from_numpy(np.random.default_rng(0).integers(0, 255, (8, 1, frame.STORE_H, frame.STORE_W), np.uint8))
    level = torch.linspace(0, 255, 8)
    bank[:, 0, int(zone.y0 * s):int((zone.y0 + zone.height) * s), int(zone.x0 * s):int((zone.x0 + zone.width) * s)] \
        = level.to(torch.uint8)[:, None, None]
    x = ZoneSampler(kind.box, kind.input_size)(bank, torch.arange(8))
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    for _ in range(25):
        opt.zero_grad()
        (net(x).squeeze(-1) - (level / 255 * 2 - 1)).abs().mean().backward()
        opt.step()
    net.eval()
    heat = cards.occlusion_map(lambda b: train.predict(net, b, np.arange(len(b)), kind).numpy(), bank[6, 0].numpy())
    x0, y0, x1, y1 = zone.x0 * s - 4, zone.y0 * s - 4, (zone.x0 + zone.width) * s + 4, (zone.y0 + zone.height) * s + 4
    rows, cols = np.meshgrid(np.arange(heat.shape[0]), np.arange(heat.shape[1]), indexing="ij")
    outside = ((cols + 1) * p <= x0) | (cols * p >= x1) | ((rows + 1) * p <= y0) | (rows * p >= y1)
    assert outside.sum() >= 90 and (~outside).sum() >= 25  # of 13 x 10 tiles
    assert np.abs(heat[outside]).max() < 1e-3
    assert np.abs(heat[~outside]).max() > 10  # months
    # Every tile that moves the prediction is within the kind's reach (ensemble_occlusion skips the others).
    within = cards.reach(kind, bank.shape[-2:])
    assert np.abs(heat[~within]).max() < 1e-3 and (np.abs(heat) > 1e-3).sum() <= within.sum() < 60


@pytest.fixture(scope="module")
def loud_models(tmp_path_factory):
    """The tiny bundle with every output layer scaled 300x: untrained, its models move by ~1e-3 months
    when a tile is masked, too close to float noise to tell a skipped tile from a computed one."""
    path = tmp_path_factory.mktemp("bundle")
    write_tiny_bundle(str(path))
    models = score.BundleModels(load_bundle(str(path)))
    with torch.no_grad():
        for states in models.models.values():
            for net, _ in states:
                net.out.weight *= 300
    return models


def test_ensemble_occlusion_gives_the_brute_force_numbers(loud_models):
    # A hand-like image on black, sex unknown (both sexes' models): the background tiles and the tiles out
    # of a zone model's reach are skipped; the heatmap must be the one of masking every tile for every model.
    rng = np.random.default_rng(1)
    image = np.zeros((frame.STORE_H, frame.STORE_W), np.uint8)
    image[100:1000, 150:650] = rng.integers(40, 255, (900, 500))
    brute = cards.occlusion_map(cards.ensemble_predictor(loud_models, None), image)
    fast = cards.ensemble_occlusion(loud_models, None, image, batch=16)
    assert fast.shape == brute.shape == (13, 10)
    assert np.abs(brute).max() > 0.1 and (np.abs(brute) > 0.01).sum() > 50
    np.testing.assert_allclose(fast, brute, atol=1e-3)
    assert (fast == 0).sum() >= 20  # the black tiles: skipped
    wrist = next(z for _, z in loud_models.models[("B-cls", "F")])
    assert 10 < cards.reach(wrist, image.shape).sum() < 60  # the wrist model saw a part of the tiles only


def test_card_names_are_the_ids_and_stay_inside_the_folder():
    assert cards.card_uri("out/cards", "1377") == "out/cards/1377.png"
    assert cards.card_uri("s3://b/cards/", "patientA/study1/IM0001") == "s3://b/cards/patientA/study1/IM0001.png"
    assert cards.card_uri("c", "1.2.840.1 x") == "c/1.2.840.1 x.png"
    for bad in ("", "../x", "a/../../x", "/etc/x", "a//b", "a/./b", "a\\..\\b", "a\nb", "x/"):
        with pytest.raises(ValueError, match="not a safe"):
            cards.card_uri("c", bad)


def test_a_card_per_scored_row(models, tmp_path):
    image = np.zeros((frame.STORE_H, frame.STORE_W), np.uint8)
    image[300:900, 250:550] = 180  # a bright block as a stand-in hand
    thumb = np.full((130, 100), 60, np.uint8)  # the input as the key point model saw it
    rows = pd.DataFrame({"registered_png": [prepare.encode_png(image), None],
                         "keypoint_input": [prepare.encode_png(thumb), None], "width": [1000, None],
                         "height": [1300, None], "keypoint_source": ["geometric", None],
                         "finger_tip_x": [500.0, None], "finger_tip_y": [100.0, None], "capitate_x": [520.0, None],
                         "capitate_y": [900.0, None], "thumb_tip_x": [850.0, None], "thumb_tip_y": [600.0, None]})
    table = pd.DataFrame({"id": ["hand", "broken"], "sex": ["F", None], "sex_source": ["csv", "unknown"],
                          "boneage_months": [100.0, np.nan], "boneage_sd_months": [3.0, np.nan],
                          "chronological_age_months": [90.0, np.nan], "boneage_sds": [1.0, np.nan],
                          "reference_sd_months": [10.0, np.nan], "boneage_interpretation": ["normal", None],
                          "sds_note": [None, "no_boneage"], "accepted": [False, False],
                          "reject_reason": ["mask_doubtful;zone_models_disagree", "not_scored"]})
    uris, errors = cards.write_cards(rows, table, models, str(tmp_path / "cards"))
    assert uris[0] == str(tmp_path / "cards" / "hand.png") and errors[0] is None
    assert uris[1] is None and errors[1].startswith("no card: the image has no bone age")
    with open(uris[0], "rb") as f:
        card = prepare.decode_png(f.read())
    assert card.shape == (600, 1040) and card.std() > 10
    from PIL import Image

    rgb = np.asarray(Image.open(uris[0]).convert("RGB")).astype(int)
    panel = rgb[60:330, 842:1030]  # the input panel, top right: its key point markers are drawn
    finger_tip_red = (panel[..., 0] > 200) & (panel[..., 1] < 110) & (panel[..., 2] < 110)
    assert finger_tip_red.sum() >= 4
    assert sorted(p.name for p in (tmp_path / "cards").iterdir()) == ["hand.png"]
    # --dicom-out without --cards: the same card drawn, handed back as PNG bytes, no file written
    pngs: list = []
    assert cards.write_cards(rows, table, models, None, pngs=pngs) == ([None, None], [None, errors[1]])
    assert pngs[1] is None and np.array_equal(prepare.decode_png(pngs[0]), card)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cards"]


def test_the_card_shows_the_interval_never_the_spread_with_plus_minus():
    row = {"boneage_months": 80.31, "boneage_lower_months": 70.12, "boneage_upper_months": 90.5,
           "boneage_sd_months": 6.8, "interval_level": 0.9, "boneage_sds_lower": -2.5, "boneage_sds_upper": -0.4}
    assert cards.bone_age_text(row) == "bone age 80.3 mo (90% interval 70.1-90.5)"
    assert cards.sds_interval_text(row) == " (interval -2.50 to -0.40)"
    old = {**row, "boneage_lower_months": None, "boneage_upper_months": np.nan, "interval_level": None}
    assert cards.bone_age_text(old) == "bone age 80.3 mo (no interval: the bundle has no calibration)"
    assert "±" not in cards.bone_age_text(row) + cards.bone_age_text(old)
