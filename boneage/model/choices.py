"""The names a setting chooses among (model kinds, schedules, losses), without torch: boneage.config
validates against them, and the networks and the training loop build on them."""

from __future__ import annotations

from boneage.registration.frame import ZONES

HEADS = ("reg", "cls")  # the bone age heads; "sex" (one logit of P(male)) is the sex classifier's
MODEL_KIND_NAMES = tuple(f"{z}-{h}" for z in ZONES for h in HEADS)  # A-reg, A-cls, B-reg, ...
SEX_KIND_NAMES = tuple(f"{z}-sex" for z in ZONES)  # the sex classifiers: P(male) from one zone
SCHEDULES = ("onecycle", "cosine", "plateau", "constant")  # plateau watches the validation metric
CLS_LOSSES = ("mae", "mae+ce", "ce")
SEX_MODELS = ("per_sex", "pooled")  # a model per kind and sex, or one per kind for both with the sex as an input
SHIPPED_MODELS = ("folds", "refit")  # the bundle scores with the k fold models, or one model refit on every CV image
