import pytest
import torch

from boneage.registration.frame import ZONES
from boneage.model.networks import (
    MODEL_KINDS, N_CLASSES, SEX_KINDS, KeypointNet, ZoneNet, build_from_spec, model_kind, to_months, to_scaled,
)


@pytest.mark.parametrize("name", sorted({**MODEL_KINDS, **SEX_KINDS}))
def test_every_kind_builds_and_runs(name):
    torch.manual_seed(0)
    kind = model_kind(name, input_scale=0.2)
    assert kind.zone is ZONES[name[0]] and kind.box == (kind.zone.x0, kind.zone.y0, kind.zone.width, kind.zone.height)
    model = kind.build(width_mult=0.125, fc=32).eval()
    y = model(torch.randn(3, 1, *kind.input_size))
    assert y.shape == (3,) and torch.isfinite(y).all()


def test_seed_input_sizes_and_scaling():
    assert model_kind("A-reg").input_size == (500, 375)
    assert model_kind("B-cls").input_size == (375, 375)
    assert model_kind("C-reg").input_size == (467, 200)
    assert model_kind("B-reg", 0.25).input_size == (94, 94)
    with pytest.raises(KeyError):
        model_kind("D-reg")


def test_regression_scale_round_trips():
    months = torch.tensor([0.0, 1.0, 120.0, 228.0, 240.0])
    assert torch.allclose(to_months(to_scaled(months)), months)
    assert to_scaled(torch.tensor([0.0, 120.0, 240.0])).tolist() == [-1.0, 0.0, 1.0]


def test_classification_output_in_range_with_gradient():
    torch.manual_seed(0)
    model = ZoneNet((40, 30), head="classification", width_mult=0.125, fc=32).train()
    with torch.no_grad():
        model.out.weight.mul_(50)  # sharp softmax: pushes the expectation towards the ends
    logits = {}

    def keep_logits(module, inputs, out):
        out.retain_grad()
        logits["z"] = out

    model.out.register_forward_hook(keep_logits)
    y = model(torch.randn(8, 1, 40, 30))
    months = to_months(y)
    assert ((months >= 0) & (months < 240)).all()
    y.sum().backward()
    g = logits["z"].grad
    assert g.shape == (8, N_CLASSES) and g.abs().sum() > 0


def test_keypoint_net_shape_and_spec_rebuild():
    net = KeypointNet(width_mult=0.125, fc=16)
    assert net(torch.randn(2, 1, 130, 100)).shape == (2, 3, 2)
    m = build_from_spec({"kind": "C-cls", "input_scale": 0.2, "width_mult": 0.125, "fc": 16, "dropout": 0.5})
    assert m.input_size == model_kind("C-cls", 0.2).input_size and m.head_kind == "cls"


def test_the_expectation_is_float32_under_bf16_autocast():
    """Scoring runs the models under bf16 autocast where asked: the softmax-weighted age must not be
    rounded in bf16 (up to 0.5 month), so CPU and GPU scores agree."""
    torch.manual_seed(0)
    model = ZoneNet((40, 30), head="cls", width_mult=0.125, fc=32).eval()
    logits = torch.randn(64, N_CLASSES) * 4
    plain = model.expectation(logits)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = model.expectation(logits)
    assert under_autocast.dtype == torch.float32
    assert torch.allclose(to_months(under_autocast), to_months(plain), atol=1e-4)


def test_a_pooled_net_takes_the_sex_and_a_per_sex_net_refuses_it():
    """The sex input (cv.sex_models "pooled") changes the output: girl and boy differ for the same image;
    a per-sex net is the seed's, with no sex input, and its state loads as before."""
    torch.manual_seed(0)
    kind = model_kind("B-cls", 0.2)
    pooled = kind.build(width_mult=0.125, fc=32, sex_input=True).eval()
    x = torch.randn(4, 1, *kind.input_size)
    girls, boys = pooled(x, male=torch.zeros(4, dtype=torch.bool)), pooled(x, male=torch.ones(4, dtype=torch.bool))
    assert girls.shape == boys.shape == (4,) and (girls != boys).all()
    mixed = pooled(x, male=torch.tensor([False, True, False, True]))
    assert torch.equal(mixed[0::2], girls[0::2]) and torch.equal(mixed[1::2], boys[1::2])  # per image
    with pytest.raises(ValueError, match="needs each image's sex"):
        pooled(x)
    per_sex = kind.build(width_mult=0.125, fc=32).eval()
    with pytest.raises(ValueError, match="no sex input"):
        per_sex(x, male=torch.zeros(4))
    assert not any(k.startswith("sex_in") for k in per_sex.state_dict())
    # a spec says which: absent (older specs) is per sex
    spec = {"kind": "B-cls", "input_scale": 0.2, "width_mult": 0.125, "fc": 32, "dropout": 0.5}
    assert not build_from_spec(spec).sex_input and build_from_spec({**spec, "sex_input": True}).sex_input
    build_from_spec({**spec, "sex_input": True}).load_state_dict(pooled.state_dict())
    with pytest.raises(ValueError, match="sex classifier"):
        model_kind("A-sex", 0.2).build(width_mult=0.125, fc=32, sex_input=True)
