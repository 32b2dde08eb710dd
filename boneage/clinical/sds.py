"""Bone age SDS on the Greulich-Pyle scale: how many standard deviations a bone age lies from the
chronological age, with the Brush Foundation SDs printed in the Greulich-Pyle atlas
(boneage/clinical/reference/greulich_pyle_brush_sd.csv; source and caveats in boneage/clinical/reference/README.md).

    SDS = (BA - CA) / SD(CA, sex)     delayed: SDS < -2,  normal: |SDS| <= 2,  advanced: SDS > 2

With the bone age's prediction interval [lower, upper] (boneage.validation.intervals) the SDS has one
too, and the verdict reads it (interval_verdict): `delayed` / `advanced` only when the WHOLE interval
lies beyond -2 / +2 SD, `normal` when it lies within, `uncertain` when it straddles -2 or +2 SD.

SD(CA, sex) is linearly interpolated between the table's ages; outside a sex's age range (boys 3-204,
girls 3-192 months) there is no SD and the SDS is null with the reason, never an extrapolation.
The RSNA 2017 labels are Greulich-Pyle bone ages, so the models read bone age on this scale.
"""

from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources

import numpy as np

SCALE = "Greulich-Pyle"
REFERENCE = "greulich_pyle_brush_sd.csv"
CITATION = ("Brush Foundation standard deviations of skeletal age, as printed in Greulich WW, Pyle SI. Radiographic "
            "Atlas of Skeletal Development of the Hand and Wrist, 2nd ed., Stanford University Press, 1959 "
            "(transcribed from apyrros/boneage js/script.js, a secondary source)")
# Reports call a bone age outside 2 SD of the chronological age delayed or advanced.
LIMIT_SDS = 2.0

# Why an SDS is null (the `sds_note` column); null note: the SDS is given.
NOTE_NO_BONEAGE = "no_boneage"
NOTE_NO_AGE = "age_unknown"
NOTE_NO_SEX = "sex_unknown"
NOTE_OUT_OF_RANGE = "age_outside_reference"


@lru_cache(maxsize=None)
def reference_table() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """{sex: (chronological ages in months, SD of bone age in months)}, ages increasing, from the
    package's copy of the table."""
    rows: dict[str, list[tuple[float, float]]] = {}
    text = resources.files("boneage.clinical").joinpath("reference", REFERENCE).read_text()
    for row in csv.DictReader(text.splitlines()):
        rows.setdefault(row["sex"], []).append((float(row["chronological_age_months"]),
                                                float(row["skeletal_age_sd_months"])))
    table = {}
    for sex, pairs in rows.items():
        ages, sds = (np.array(v) for v in zip(*sorted(pairs)))
        table[sex] = (ages, sds)
    return table


def reference_sd(age_months, sex) -> np.ndarray:
    """SD of bone age (months) at each chronological age for each sex ('F'/'M'), interpolated between
    the table's rows; NaN where the age or sex is unknown or the age outside the sex's rows."""
    age = np.asarray(age_months, dtype=float).reshape(-1)
    sex = np.asarray(sex, dtype=object).reshape(-1)
    out = np.full(len(age), np.nan)
    for s, (ages, sds) in reference_table().items():
        mine = (sex == s) & np.isfinite(age) & (age >= ages[0]) & (age <= ages[-1])
        out[mine] = np.interp(age[mine], ages, sds)
    return out


def bone_age_sds(boneage_months, age_months, sex) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(SDS, interpretation, SD used, note) per image. interpretation: 'delayed' / 'normal' /
    'advanced' (None where the SDS is null); note: None where the SDS is given, else why not."""
    ba = np.asarray(boneage_months, dtype=float).reshape(-1)
    ca = np.asarray(age_months, dtype=float).reshape(-1)
    sex = np.asarray(sex, dtype=object).reshape(-1)
    sd = reference_sd(ca, sex)
    sds = (ba - ca) / sd  # NaN wherever any part is unknown
    interpretation = np.where(sds < -LIMIT_SDS, "delayed", np.where(sds > LIMIT_SDS, "advanced", "normal")
                              ).astype(object)
    interpretation[~np.isfinite(sds)] = None
    known_sex = np.array([s in reference_table() for s in sex], dtype=bool)
    note = np.full(len(ba), None, dtype=object)
    # The first missing fact is the reason given (an image without a bone age: the error column says why).
    note[~np.isfinite(sd) & known_sex & np.isfinite(ca)] = NOTE_OUT_OF_RANGE
    note[~np.isfinite(ca)] = NOTE_NO_AGE
    note[~known_sex] = NOTE_NO_SEX
    note[~np.isfinite(ba)] = NOTE_NO_BONEAGE
    return sds, interpretation, sd, note


def sds_interval(lower_months, upper_months, age_months, sex) -> tuple[np.ndarray, np.ndarray]:
    """(SDS of the interval's lower bound, of its upper bound): NaN where either SDS is null."""
    sd = reference_sd(age_months, sex)
    ca = np.asarray(age_months, dtype=float).reshape(-1)
    return ((np.asarray(lower_months, dtype=float).reshape(-1) - ca) / sd,
            (np.asarray(upper_months, dtype=float).reshape(-1) - ca) / sd)


def interval_verdict(sds, sds_lower, sds_upper) -> np.ndarray:
    """The interpretation per image from the SDS interval: 'delayed' (upper < -2), 'advanced' (lower > 2),
    'normal' (the interval within [-2, 2]), else 'uncertain' (it straddles -2 or +2). Where the interval
    is unknown (a bundle without an interval calibration) the point SDS decides, as before; None where
    the SDS is null."""
    point = np.asarray(sds, dtype=float).reshape(-1)
    lo, hi = (np.asarray(v, dtype=float).reshape(-1) for v in (sds_lower, sds_upper))
    out = np.where(point < -LIMIT_SDS, "delayed", np.where(point > LIMIT_SDS, "advanced", "normal")).astype(object)
    known = np.isfinite(lo) & np.isfinite(hi)
    ranged = np.where(hi < -LIMIT_SDS, "delayed", np.where(lo > LIMIT_SDS, "advanced",
                      np.where((lo >= -LIMIT_SDS) & (hi <= LIMIT_SDS), "normal", "uncertain")))
    out[known] = ranged[known]
    out[~np.isfinite(point)] = None
    return out
