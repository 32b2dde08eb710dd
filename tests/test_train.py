import copy

import numpy as np
import pytest
import torch

from boneage.model import train
from boneage.model.augment import Augment
from boneage.registration.frame import FRAME_H, FRAME_W, ZONES
from boneage.model.networks import model_kind, to_months, to_scaled
from boneage.model.train import (
    TrainConfig, fit_keypoint_model, fit_zone_model, model_from_state, predict, predict_keypoints,
)

RES = (130, 100)  # the frame at 1/16: small enough for CPU, zone B still 47x47 pixels


def toy_bank(n, seed=0):
    """Noise images whose mean brightness of a patch inside zone B encodes the age."""
    g = torch.Generator().manual_seed(seed)
    ages = torch.rand(n, generator=g) * 220 + 10
    bank = torch.randint(0, 30, (n, 1, *RES), generator=g, dtype=torch.uint8)
    z, s = ZONES["B"], RES[1] / FRAME_W
    cx, cy, half = z.center[0] * s, z.center[1] * s, 0.3 * z.width * s
    patch = (40 + ages / 240 * 200).to(torch.uint8).view(n, 1, 1, 1)
    bank[:, :, round(cy - half) : round(cy + half), round(cx - half) : round(cx + half)] = patch
    return bank, ages.numpy()


def small_cfg(**kw):
    base = dict(epochs=6, batch_size=8, lr=1e-3, width_mult=0.125, fc=64, dropout=0.0, patience=0,
                augment=Augment(rotate_deg=5, shift=0.03, zoom=0.05, brightness=0.02, contrast=0.05))
    return TrainConfig(**{**base, **kw})


def test_tiny_fit_learns_the_toy_problem():
    bank, ages = toy_bank(128)
    tr, va = np.arange(96), np.arange(96, 128)
    kind = model_kind("B-reg", 0.125)
    seen = []
    res = fit_zone_model(bank, ages, tr, va, kind, small_cfg(), report=lambda e, m, s: seen.append(m))
    baseline = np.abs(ages[va] - ages[tr].mean()).mean()  # predict the mean age: ~55 months
    assert [m["epoch"] for m in seen] == list(range(6))
    assert res.metrics["val_mae"] < 0.5 * baseline, (baseline, [m["val_mae"] for m in seen])
    assert res.val_pred.shape == (32,) and (res.val_idx == va).all()
    # Scoring a model rebuilt from the state gives the out-of-fold predictions back.
    again = predict(model_from_state(res.state), bank, va, kind).numpy()
    np.testing.assert_allclose(again, res.val_pred, atol=1e-3)


def test_resume_reproduces_continuing():
    bank, ages = toy_bank(48, seed=1)
    tr, va = np.arange(32), np.arange(32, 48)
    kind = model_kind("C-cls", 0.2)
    cfg = small_cfg(epochs=3, dropout=0.5, schedule="onecycle")
    states = []
    full = fit_zone_model(bank, ages, tr, va, kind, cfg, report=lambda e, m, s: states.append(copy.deepcopy(s)))
    resumed = fit_zone_model(bank, ages, tr, va, kind, cfg, resume_state=states[0])
    for k, v in full.state["model"].items():
        torch.testing.assert_close(resumed.state["model"][k], v, rtol=1e-5, atol=1e-6)
    assert [m["val_mae"] for m in resumed.history] == [m["val_mae"] for m in full.history]
    np.testing.assert_allclose(resumed.val_pred, full.val_pred, atol=1e-4)


def test_keypoint_fit_runs_and_predicts_points():
    g = torch.Generator().manual_seed(0)
    n = 24
    images = torch.randint(0, 255, (n, 1, FRAME_H // 16, FRAME_W // 16), generator=g, dtype=torch.uint8)
    points = torch.rand(n, 3, 2, generator=g) * 0.6 + 0.2
    cfg = TrainConfig(epochs=2, batch_size=8, width_mult=0.125, fc=32, patience=0)
    res = fit_keypoint_model(images, points.numpy(), np.arange(16), np.arange(16, 24), cfg)
    assert res.val_pred.shape == (8, 3, 2) and np.isfinite(res.val_pred).all()
    assert res.metric == "val_dist_px" and res.metrics["val_dist_px"] > 0
    p = predict_keypoints(model_from_state(res.state), images, np.arange(16, 24))
    np.testing.assert_allclose(p.numpy(), res.val_pred, atol=1e-4)


def test_plateau_schedule_and_early_stopping():
    bank, ages = toy_bank(24, seed=2)
    cfg = small_cfg(epochs=5, lr=0.0, schedule="plateau", patience=1)  # lr 0: never improves again
    res = fit_zone_model(bank, ages, np.arange(16), np.arange(16, 24), model_kind("A-reg", 0.1), cfg)
    assert [m["epoch"] for m in res.history] == [0, 1] and res.metrics["epoch"] == 0


def test_one_cycle_warm_up_does_not_count_towards_early_stopping():
    # The shared loop with a validation metric that never improves after epoch 0.
    model = torch.nn.Linear(4, 1)
    cfg = small_cfg(epochs=10, schedule="onecycle", patience=1)
    batch = lambda idx, gen: (torch.zeros(len(idx), 4), torch.zeros(len(idx)))  # noqa: E731
    evaluate = lambda run: ({"val_mae": 1.0}, torch.zeros(1))  # noqa: E731
    res = train._fit(model, {}, cfg, torch.device("cpu"), torch.arange(16), batch,
                     lambda p, y: (p.squeeze(1) - y).abs().mean(), evaluate, "val_mae", 1.0, None, None)
    # epoch 0 is the best; 1-2 are the warm-up (30% of 10 epochs); 3 is the one bad epoch allowed
    assert [h["epoch"] for h in res.history] == [0, 1, 2, 3]


def test_fixed_schedule_keeps_the_last_epoch_and_never_stops_early():
    bank, ages = toy_bank(24, seed=3)
    cfg = small_cfg(epochs=4, patience=1)
    res = fit_zone_model(bank, ages, np.arange(24), np.arange(0), model_kind("B-reg", 0.1), cfg)
    assert [m["epoch"] for m in res.history] == [0, 1, 2, 3] and res.metrics["epoch"] == 3
    assert "val_mae" not in res.metrics and np.isnan(res.state["best"]["value"])
    for k, v in res.state["model"].items():  # the model returned is the last epoch's
        torch.testing.assert_close(res.model.state_dict()[k], v)


def test_a_watched_set_is_recorded_and_chooses_nothing():
    bank, ages = toy_bank(40, seed=4)
    tr, va, watch = np.arange(24), np.arange(24, 32), np.arange(32, 40)
    kind, cfg = model_kind("B-reg", 0.1), small_cfg(epochs=4)
    plain = fit_zone_model(bank, ages, tr, va, kind, cfg)
    watched_ages = ages.copy()
    watched_ages[watch] = np.random.default_rng(0).uniform(0, 228, len(watch))  # its labels: noise
    watched = fit_zone_model(bank, watched_ages, tr, va, kind, cfg, watch_idx=watch)
    assert all("watch_mae" in m for m in watched.history) and "watch_mae" not in plain.history[0]
    assert watched.metrics["epoch"] == plain.metrics["epoch"]
    np.testing.assert_array_equal(watched.val_pred, plain.val_pred)


@pytest.mark.parametrize("loss", ["ce", "mae"])  # "mae+ce" sums the two
def test_each_classification_loss_learns_the_toy_problem(loss):
    bank, ages = toy_bank(128)
    tr, va = np.arange(96), np.arange(96, 128)
    res = fit_zone_model(bank, ages, tr, va, model_kind("B-cls", 0.125), small_cfg(cls_loss=loss, lr=3e-3))
    baseline = np.abs(ages[va] - ages[tr].mean()).mean()
    assert res.metrics["val_mae"] < 0.6 * baseline, (loss, baseline, res.metrics["val_mae"])


def test_distribution_loss_is_smallest_for_a_gaussian_at_the_label():
    model = model_kind("B-cls", 0.125).build(0.125, 32, 0.0)
    loss = train.class_loss(model, TrainConfig(cls_loss="ce", cls_sigma=6.0))
    months = torch.arange(240.0)
    y = to_scaled(torch.tensor([100.0]))

    def gaussian_logits(centre, sigma):
        return (-(months - centre) ** 2 / (2 * sigma**2))[None, :]

    at_label = loss(gaussian_logits(100.0, 6.0), y)
    assert at_label < loss(gaussian_logits(110.0, 6.0), y)  # off by 10 months
    assert at_label < loss(gaussian_logits(100.0, 1.0), y)  # over-confident
    assert at_label < loss(gaussian_logits(100.0, 30.0), y)  # too vague
    # The expectation of those logits is the label: what scoring reads.
    assert abs(to_months(model.expectation(gaussian_logits(100.0, 6.0))).item() - 100.0) < 0.01
    with pytest.raises(ValueError, match="cls_loss"):
        train.class_loss(model, TrainConfig(cls_loss="hinge"))


def test_the_sex_classifier_learns_the_toy_problem():
    """A sex kind on the whole hand: a patch inside zone A (away from zone B's age patch) is brighter in
    the boys; P(male) must separate the held-out images and score like the run did from its state."""
    bank, ages = toy_bank(96, seed=5)
    male = np.random.default_rng(5).random(96) < 0.5
    z, s = ZONES["C"], RES[1] / FRAME_W
    cx, cy, half = z.center[0] * s, z.center[1] * s, 0.15 * z.width * s
    patch = bank[:, :, round(cy - half) : round(cy + half), round(cx - half) : round(cx + half)]
    patch[:] = torch.from_numpy(np.where(male, 170, 90).astype(np.uint8)).view(-1, 1, 1, 1)
    tr, va = np.arange(64), np.arange(64, 96)
    kind = model_kind("A-sex", 0.125)
    res = train.fit_sex_model(bank, male, tr, va, kind, small_cfg(epochs=5, lr=3e-3))
    assert res.metric == "val_bce" and res.val_pred.shape == (32,)
    assert ((res.val_pred > 0.5) == male[va]).mean() >= 0.9, res.val_pred
    p = train.predict_p_male(model_from_state(res.state), bank, va, kind).numpy()
    np.testing.assert_allclose(p, res.val_pred, atol=1e-4)
    with pytest.raises(ValueError, match="sex classifier"):
        train.fit_sex_model(bank, male, tr, va, model_kind("A-reg", 0.125), small_cfg())


# Labels across the whole range: the ends are where a Gaussian cut at 0 and 239 months is biased.
RANGE_LABELS = [0.0, 1.0, *range(6, 229, 6), 234.0, 238.0, 239.0]


def test_the_loss_is_minimised_by_a_distribution_whose_mean_is_the_label_at_every_age():
    """Free logits, one row per label, fitted to the 'ce' loss: the minimising distribution's expectation
    is the label within 1.5 months everywhere from 0 to 239 (a plain cut Gaussian is ~6 months off at 6).
    'mae+ce' adds |expectation - label|, which that same target zeroes: it has the same minimiser."""
    model = model_kind("B-cls", 0.125).build(0.125, 32, 0.0)
    loss = train.class_loss(model, TrainConfig(cls_loss="ce", cls_sigma=12.0))
    labels = torch.tensor(RANGE_LABELS)
    target = train.class_target(labels, 12.0, 240)
    assert torch.allclose(target.sum(1), torch.ones(len(labels)))
    mean = target @ torch.arange(240.0)
    assert (mean - labels).abs().max() < 0.05, (mean - labels).tolist()

    torch.manual_seed(0)
    logits = torch.zeros(len(labels), 240, requires_grad=True)
    opt = torch.optim.Adam([logits], lr=1.0)
    for _ in range(80):
        opt.zero_grad()
        loss(logits, to_scaled(labels)).backward()  # a mean of per-row terms: each row is fitted on its own
        opt.step()
    fitted = to_months(model.expectation(logits.detach()))
    assert (fitted - labels).abs().max() < 1.5, dict(zip(RANGE_LABELS, (fitted - labels).tolist()))


def test_the_loss_is_computed_in_float32_under_autocast():
    model = model_kind("B-cls", 0.125).build(0.125, 32, 0.0)
    loss = train.class_loss(model, TrainConfig(cls_loss="mae+ce", cls_sigma=12.0))
    torch.manual_seed(1)
    logits, y = torch.randn(16, 240) * 3, to_scaled(torch.rand(16) * 239)
    plain = loss(logits, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = loss(logits, y)
    assert under_autocast.dtype == torch.float32 and torch.allclose(under_autocast, plain, rtol=1e-6, atol=1e-7)


def sexed_toy_bank(n, seed):
    """toy_bank whose label also depends on the sex: boys' bone age is 30 months above the patch's
    reading, girls' 30 below; only a model told the sex can get both right."""
    bank, maturity = toy_bank(n, seed)
    male = np.random.default_rng(seed).random(n) < 0.5
    return bank, np.clip(maturity + np.where(male, 30.0, -30.0), 0, 239).astype(np.float32), male


def test_a_pooled_model_learns_from_the_sex_input():
    """One model for both sexes (cv.sex_models "pooled"): trained with each image's sex, it predicts the
    30-month offsets it was shown, and scores from its state as the run did."""
    bank, ages, male = sexed_toy_bank(128, seed=3)
    tr, va = np.arange(96), np.arange(96, 128)
    kind = model_kind("B-reg", 0.125)
    res = fit_zone_model(bank, ages, tr, va, kind, small_cfg(epochs=7, lr=3e-3), male=male)
    assert res.state["spec"]["sex_input"] is True
    model = model_from_state(res.state)
    as_given = predict(model, bank, va, kind, male=male).numpy()
    np.testing.assert_allclose(as_given, res.val_pred, atol=1e-3)
    as_girls, as_boys = predict(model, bank, va, kind, male=False).numpy(), predict(model, bank, va, kind, male=True).numpy()
    # The sex moves the prediction the way the labels do (60 months between them here).
    flipped = predict(model, bank, va, kind, male=~male).numpy()
    # measured: 50 months apart; MAE 14 months with the given sex, 57 with it flipped
    assert (as_boys - as_girls).mean() > 20, (as_boys - as_girls)
    assert np.abs(as_given - ages[va]).mean() < np.abs(flipped - ages[va]).mean() - 15
    with pytest.raises(ValueError, match="needs each image's sex"):
        predict(model, bank, va, kind)


def test_test_time_augmentation_off_is_bit_identical_and_on_stays_close():
    """views=1 is exactly the plain prediction; more views average fixed jitters: deterministic,
    slightly different, still near the plain prediction, for both head kinds and the sex classifier."""
    bank, ages = toy_bank(64, seed=4)
    tr, va = np.arange(48), np.arange(48, 64)
    for name in ("B-cls",):  # the head whose prediction is an expectation: views average expected ages
        kind = model_kind(name, 0.125)
        res = fit_zone_model(bank, ages, tr, va, kind, small_cfg(epochs=3))
        plain = predict(res.model, bank, va, kind).numpy()
        np.testing.assert_array_equal(predict(res.model, bank, va, kind, views=1).numpy(), plain)
        np.testing.assert_array_equal(plain, res.val_pred)  # what the run predicted, no TTA
        tta = predict(res.model, bank, va, kind, views=5).numpy()
        np.testing.assert_array_equal(tta, predict(res.model, bank, va, kind, views=5).numpy())
        assert not np.array_equal(tta, plain)
        assert np.abs(tta - plain).mean() < 10 and ((tta >= 0) & (tta <= 240)).all(), (name, tta - plain)
    sex_kind = model_kind("A-sex", 0.125)
    sex_model = sex_kind.build(0.125, 64, 0.0).eval()
    p = train.predict_p_male(sex_model, bank, va, sex_kind, views=3)
    assert ((p > 0) & (p < 1)).all() and not torch.equal(p, train.predict_p_male(sex_model, bank, va, sex_kind))


def _is_channels_last(model) -> bool:
    convs = [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    return bool(convs) and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)


def test_channels_last_on_cpu_trains_and_predicts_the_same_function_as_nchw():
    """cv.channels_last takes effect on CPU too (oneDNN's NHWC convolutions and max pooling are 1.4-2x faster
    here): training and the loaded model use it, off means NCHW, and both formats compute the same
    function: the same weights predict the same ages, and one epoch from the same seed trains the same weights."""
    bank, ages = toy_bank(48, seed=4)
    tr, va = np.arange(32), np.arange(32, 48)
    kind = model_kind("B-cls", 0.125)
    fitted = {on: fit_zone_model(bank, ages, tr, va, kind, small_cfg(epochs=1, channels_last=on)) for on in (False, True)}
    assert _is_channels_last(fitted[True].model) and not _is_channels_last(fitted[False].model)
    for k, v in fitted[False].state["model"].items():
        torch.testing.assert_close(fitted[True].state["model"][k], v, rtol=1e-4, atol=1e-5)
    loaded = model_from_state(fitted[False].state)  # what scoring loads: channels_last
    assert _is_channels_last(loaded)
    np.testing.assert_allclose(predict(loaded, bank, va, kind).numpy(), fitted[False].val_pred, atol=1e-3)
    nchw = loaded.to(memory_format=torch.contiguous_format)
    np.testing.assert_allclose(predict(nchw, bank, va, kind, channels_last=False).numpy(), fitted[False].val_pred,
                               atol=1e-3)
