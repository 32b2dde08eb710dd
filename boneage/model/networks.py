"""The seed's VGG-like networks (key points and zone age models) and the registry of model kinds.

Ages: networks work on age scaled to [-1, 1] over 0-240 months (`to_scaled` / `to_months`);
MAE on that scale is MAE in months / 120.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from boneage.model.choices import HEADS
from boneage.registration.frame import FRAME_H, FRAME_W, ZONES, Zone

MAX_MONTHS = 240.0
N_CLASSES = 240  # one class per month, ages 0..239


def to_scaled(months: torch.Tensor) -> torch.Tensor:
    return months / (MAX_MONTHS / 2) - 1.0


def to_months(scaled: torch.Tensor) -> torch.Tensor:
    return (scaled + 1.0) * (MAX_MONTHS / 2)


def vgg_block(c_in: int, c_out: int) -> nn.Sequential:
    """conv3x3 + conv1x1, BN, ELU, MaxPool 3/2 (the seed's block).

    BN+ELU follow each conv: a 1x1 conv straight after a 3x3 one with nothing in between would
    collapse into a single linear 3x3 conv. The pool pads by 1 ('same' pooling, out = ceil(n/2))
    so six blocks never shrink a small CPU-test input to nothing; at seed sizes it only keeps
    the border row/column that 'valid' pooling drops.
    """
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ELU(inplace=True),
        nn.Conv2d(c_out, c_out, 1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ELU(inplace=True),
        nn.MaxPool2d(3, stride=2, padding=1),
    )


def _trunk(widths: list[int]) -> nn.Sequential:
    chans = [1, *widths]
    return nn.Sequential(*[vgg_block(a, b) for a, b in zip(chans[:-1], chans[1:])])


def _flat_features(trunk: nn.Module, input_size: tuple[int, int]) -> int:
    # Flatten sized from the input, as Keras' Flatten after the conv stack: registered crops
    # are spatially aligned, so the FC layers may use where a feature is, not only that it is.
    with torch.no_grad():
        return trunk(torch.zeros(1, 1, *input_size)).numel()


def _fp32(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run the output layer in fp32 even under bf16 autocast: bf16 keeps ~3 significant digits,
    which is up to 0.5 month on the age scale and ~4 frame pixels for a key point."""
    with torch.autocast(x.device.type, enabled=False):
        return layer(x.float())


def _scale_widths(widths: tuple[int, ...], width_mult: float) -> list[int]:
    return [max(4, round(w * width_mult)) for w in widths]


class KeypointNet(nn.Module):
    """Finger tip, capitate, thumb tip (x, y) in [0,1] of the input, from the frame reduced 16x."""

    def __init__(self, input_size=(FRAME_H // 16, FRAME_W // 16), width_mult=1.0, fc=512):
        super().__init__()
        self.input_size = tuple(input_size)
        self.features = _trunk(_scale_widths((64, 128, 256), width_mult))
        n = _flat_features(self.features, self.input_size)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(n, fc), nn.ELU(inplace=True), nn.Linear(fc, fc), nn.ELU(inplace=True),
        )
        self.out = nn.Linear(fc, 6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fp32(self.out, self.head(self.features(x))).view(-1, 3, 2)


# Width of the sex input's embedding (pooled models): the sex (-1 girl, +1 boy) through a small linear
# layer, concatenated with the flattened image features into the first FC layer, as the MGH model and
# Deeplasia feed it (a single +-1 among thousands of image features would start out drowned).
SEX_FEATURES = 16


class ZoneNet(nn.Module):
    """Bone age from one zone crop. forward() returns the age scaled to [-1, 1], shape (B,); with the
    "sex" head, the logit of P(male) instead.

    sex_input=True: one model for both sexes (cv.sex_models "pooled"), which takes each image's sex
    (`male`) beside the crop; without it the model is one sex's and takes none."""

    def __init__(self, input_size, head="reg", width_mult=1.0, fc=2048, dropout=0.5, sex_input=False):
        super().__init__()
        head = {"regression": "reg", "classification": "cls"}.get(head, head)
        if head not in (*HEADS, "sex"):
            raise ValueError(f"head must be one of {(*HEADS, 'sex')}, got {head!r}")
        if sex_input and head == "sex":
            raise ValueError("a sex classifier cannot take the sex as an input")
        self.input_size, self.head_kind, self.sex_input = tuple(input_size), head, bool(sex_input)
        self.features = _trunk(_scale_widths((32, 64, 128, 128, 256, 384), width_mult))
        n = _flat_features(self.features, self.input_size)
        # The same layers (and state_dict keys) with or without the sex input: only the first FC
        # layer's input grows by SEX_FEATURES.
        self.fc = nn.Sequential(
            nn.Flatten(), nn.Linear(n + (SEX_FEATURES if sex_input else 0), fc), nn.ELU(inplace=True),
            nn.Dropout(dropout), nn.Linear(fc, fc), nn.ELU(inplace=True), nn.Dropout(dropout),
        )
        if sex_input:
            self.sex_in = nn.Linear(1, SEX_FEATURES)
        self.out = nn.Linear(fc, N_CLASSES if head == "cls" else 1)
        # Class k stands for k months, on the same [-1, 1] scale as the regression target.
        self.register_buffer("class_ages", to_scaled(torch.arange(N_CLASSES, dtype=torch.float32)))

    def _hidden(self, x: torch.Tensor, male: torch.Tensor | None) -> torch.Tensor:
        if not self.sex_input:
            if male is not None:
                raise ValueError("this model is one sex's (no sex input): do not pass `male`")
            return self.fc(self.features(x))
        if male is None:
            raise ValueError("a pooled model (sex input) needs each image's sex: pass `male`")
        flat = self.fc[0](self.features(x))
        sex = self.sex_in(male.to(device=flat.device, dtype=torch.float32).view(-1, 1) * 2 - 1)
        return self.fc[1:](torch.cat([flat, sex.to(flat.dtype)], dim=1))

    def forward(self, x: torch.Tensor, logits: bool = False, male: torch.Tensor | None = None) -> torch.Tensor:
        """The scaled age; with logits=True a classification head returns its (B, 240) logits
        (training uses them for its distribution loss; `expectation` turns them into the age).
        male: (B,) bool or 0/1, each image's sex; required by a pooled model, refused by a per-sex one."""
        z = _fp32(self.out, self._hidden(x, male))
        if self.head_kind != "cls":
            return z.squeeze(1)
        return z if logits else self.expectation(z)

    def expectation(self, logits: torch.Tensor) -> torch.Tensor:
        """Expected (scaled) age under the softmax of the 240 logits, in fp32."""
        return expected_age(logits, self.class_ages)


def expected_age(logits: torch.Tensor, class_ages: torch.Tensor) -> torch.Tensor:
    """softmax(logits) @ class_ages in fp32 under any autocast: autocast would run the matmul in bf16,
    whose ~3 significant digits round the age by up to 0.5 month (and CPU and GPU scores would differ)."""
    with torch.autocast(logits.device.type, enabled=False):
        return F.softmax(logits.float(), dim=1) @ class_ages.float()


@dataclass(frozen=True)
class ModelKind:
    """A zone x head: fixes the crop box and input size, so scoring cannot drift from training.

    `input_scale` < 1 trains at reduced resolution (the CPU embedded run); the crop box stays.
    """

    name: str
    zone: Zone
    head: str
    input_scale: float = 1.0

    @property
    def input_size(self) -> tuple[int, int]:
        h, w = self.zone.input_size
        return max(1, round(h * self.input_scale)), max(1, round(w * self.input_scale))

    @property
    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, width, height) in frame coordinates."""
        z = self.zone
        return z.x0, z.y0, z.width, z.height

    def scaled(self, input_scale: float) -> ModelKind:
        return replace(self, input_scale=float(input_scale))

    def build(self, width_mult=1.0, fc=2048, dropout=0.5, sex_input=False) -> ZoneNet:
        return ZoneNet(self.input_size, self.head, width_mult=width_mult, fc=fc, dropout=dropout, sex_input=sex_input)


MODEL_KINDS = {f"{z}-{h}": ModelKind(f"{z}-{h}", ZONES[z], h) for z in ZONES for h in HEADS}
# The sex classifiers (P(male) from a zone), one model for both sexes; never part of the bone age ensemble.
SEX_KINDS = {f"{z}-sex": ModelKind(f"{z}-sex", ZONES[z], "sex") for z in ZONES}


def model_kind(name: str, input_scale: float = 1.0) -> ModelKind:
    """'A-reg', 'B-cls', ... or a sex classifier 'A-sex' (sex is not part of the kind: a per-sex model
    is one kind)."""
    kinds = {**MODEL_KINDS, **SEX_KINDS}
    if name not in kinds:
        raise KeyError(f"unknown model kind {name!r}; known: {sorted(kinds)}")
    return kinds[name].scaled(input_scale)


def build_from_spec(spec: dict) -> nn.Module:
    """Rebuild a network from the `spec` a training run stores next to its weights."""
    if spec["kind"] == "keypoints":
        return KeypointNet(tuple(spec["input_size"]), spec["width_mult"], spec["fc"])
    kind = model_kind(spec["kind"], spec["input_scale"])
    # sex_input: a pooled model (absent from older specs: per-sex models)
    return kind.build(spec["width_mult"], spec["fc"], spec["dropout"], spec.get("sex_input", False))
