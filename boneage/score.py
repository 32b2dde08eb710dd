"""Scoring registered images with a bundle, without Ray: every fold model of every kind, the ensemble,
and the table's columns. boneage.distributed.ray_score runs it over a folder on Ray Data.

For an image of known sex, each kind's prediction is the mean of that sex's k fold models, and the
bone age is the bundle's ensemble of those means. Its uncertainty is the spread of the k fold-wise
ensembles (fold f's models of every kind, combined with the same weights): how much the answer moves
with the training data. With unknown sex both sexes' bone ages are given, `boneage_months` is their
mean, flagged `sex_unknown`, and the spread is over both sexes' 2k fold-wise ensembles (girls mature
~1.15x faster: the two estimates differ by up to ~15 months).

A bundle with a sex classifier (manifest `sex_kind`) gives every image `p_male`, the mean P(male) of
its k fold models. A predicted sex is used only where the bundle has earned it (training.json
"sex_prediction", boneage.validation.sex_calls: a threshold whose out-of-fold confident calls are wrong
at most cv.sex_max_error_rate of the time, cross-fitted; old bundles: off). Then an image of unknown sex
whose P(male) is beyond the threshold is scored as that sex (`sex_source` "predicted"), keeps both
sexes' estimates, and `sex_uncertainty_months` says how far a wrong call moves it; otherwise it is
`sex_unsure` and scored as unknown (both sexes).
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import pandas as pd
import pyarrow as pa
import torch

from boneage.clinical import columns, gate
from boneage.validation import age_calibration, cv, ensemble, intervals, sex_calls
from boneage.model import train
from boneage.bundle import Bundle, BundleError
from boneage.model.networks import model_kind

SEX_SOURCES = ("csv", "dicom", "predicted", "unknown")

# The output table, in order: see docs/scoring.md for each column's meaning.
OUTPUT_COLUMNS = (
    "id", "uri", "path", "status", "error", "sex", "sex_source", "sex_unknown", "p_male", "sex_unsure", "sex_mismatch",
    "boneage_months", "boneage_lower_months", "boneage_upper_months", "boneage_sd_months", "boneage_if_female_months", "boneage_if_male_months",
    "sex_uncertainty_months",
    "chronological_age_months", "age_source", "boneage_minus_age_months",
    "registration_doubtful", "mask_doubtful", "keypoint_source", "keypoint_confidence",
    "format", "height", "width", "mirrored", "transform",
    gate.ZONE_SPREAD,  # the zone spread check's statistic: one fold's kinds (boneage.clinical.gate)
    *columns.COLUMNS,  # bone age SDS and the rejection gate (boneage.clinical.columns)
)
# Added by boneage.distributed.ray_score to every row: which bundle scored it, and when (a resumed output mixes
# runs); the table's parquet metadata holds the rest (PROVENANCE_KEY).
PROVENANCE_COLUMNS = ("bundle_sha256", "scored_at")
PROVENANCE_KEY = b"boneage"
# Only with --keep-dicom-uids: identifiers, which link a row back to the patient's study.
UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
CARD_COLUMNS = ("card", "card_error")  # only with --cards (boneage.clinical.cards)
DICOM_COLUMNS = ("dicom_sr_uid", "dicom_error")  # only with --dicom-out or --stow (boneage.clinical.dicom_out)
STOW_COLUMNS = ("dicom_stow",)  # only with --stow: whether the DICOMweb service took the row's SR and SC

_TYPES = {"sex_unknown": pa.bool_(), "sex_mismatch": pa.bool_(), "registration_doubtful": pa.bool_(), "mask_doubtful": pa.bool_(),
          "accepted": pa.bool_(),
          "mirrored": pa.bool_(), "height": pa.int64(), "width": pa.int64(), "transform": pa.list_(pa.float64()),
          "scored_at": pa.timestamp("us", tz="UTC")}
_STRINGS = {"id", "uri", "path", "status", "error", "sex", "sex_source", "age_source", "keypoint_source", "format",
            "bundle_sha256", "boneage_interpretation", "sds_note", "reject_reason", *CARD_COLUMNS, *UID_COLUMNS,
            *DICOM_COLUMNS, *STOW_COLUMNS}


def output_schema(kinds: list[str], uid_columns: tuple[str, ...] = (), cards: bool = False,
                  dicom: bool = False, stow: bool = False) -> pa.Schema:
    """The scoring table's schema, written explicitly: a part in which a column happens to be all null
    must still have its type, or the parts would not read back as one table."""
    names = [*OUTPUT_COLUMNS, *kinds, *PROVENANCE_COLUMNS, *uid_columns, *(CARD_COLUMNS if cards else ()),
             *(DICOM_COLUMNS if dicom or stow else ()), *(STOW_COLUMNS if stow else ())]
    return pa.schema([(n, _TYPES.get(n, pa.string() if n in _STRINGS else pa.float64())) for n in names])


class BundleModels:
    """The bundle's fold models as torch modules on one device, with their zone kinds. A pooled bundle's
    models (manifest sex_models "pooled") are called with the sex each image is scored under; every
    model's prediction is averaged over the bundle's test-time views (manifest tta_views)."""

    def __init__(self, bundle: Bundle, device: str | torch.device = "cpu"):
        self.device = torch.device(device)
        self.kinds = bundle.kinds
        self.record = ensemble_record(bundle)
        self.gate = gate.calibration_of(bundle.training)  # the rejection gate's thresholds (boneage.clinical.gate)
        # the bone age's prediction interval (boneage.validation.intervals); None: an older bundle, null bounds
        self.interval = intervals.calibration_of(bundle.training)
        # the per-sex correction of the bias at the extreme ages (None: an older bundle, uncorrected)
        self.age_calibration = age_calibration.of_training(bundle.training)
        self.sex_kind = bundle.manifest.get("sex_kind")  # the sex classifier's kind; None: the bundle has none
        # Whether, and beyond which P(male), a predicted sex may replace an unknown one (off: p_low None).
        self.sex_calls = sex_calls.of_bundle(bundle.training, self.sex_kind)
        # Test-time augmentation: each fold model's mean over this many crop jitters, as the bundle's
        # out-of-fold table was predicted (manifest tta_views; older bundles: 1, none).
        self.tta_views = int(bundle.manifest.get("tta_views") or 1)
        # the sex classifier's own views (manifest sex_tta_views; older bundles: the zone models')
        self.sex_tta_views = int(bundle.manifest.get("sex_tta_views") or self.tta_views)
        # "pooled": one fold model set per kind for both sexes (sex "all"), told the sex it scores under
        self.sex_models = bundle.manifest.get("sex_models") or "per_sex"
        self.models: dict[tuple[str, str], list[tuple[Any, Any]]] = {}
        for (kind, sex), states in bundle.models.items():
            self.models[(kind, sex)] = [
                (train.model_from_state(s).to(self.device), model_kind(s["spec"]["kind"], s["spec"]["input_scale"]))
                for s in states]
        if self.sex_models == "pooled":  # the same modules under each sex scoring asks for
            for kind in self.kinds:
                for sex in cv.SEXES:
                    self.models[(kind, sex)] = self.models[(kind, cv.POOLED)]

    def kind_predictions(self, bank: torch.Tensor, sex: str, kind: str, idx=None) -> np.ndarray:
        """(len(idx), k) months: the k fold models of `kind` and `sex` on bank[idx] (all by default)."""
        idx = np.arange(len(bank)) if idx is None else np.asarray(idx)
        return np.stack([train.predict(model, bank, idx, zone, device=self.device, views=self.tta_views,
                                       male=(sex == "M") if getattr(model, "sex_input", False) else None
                                       ).float().cpu().numpy()
                         for model, zone in self.models[(kind, sex)]], axis=1)

    def fold_predictions(self, bank: torch.Tensor, sex: str) -> dict[str, np.ndarray]:
        """{kind: (n, k) months}: every fold model of `sex` on every image of the bank."""
        return {kind: self.kind_predictions(bank, sex, kind) for kind in self.kinds}

    def p_male(self, bank: torch.Tensor) -> np.ndarray:
        """(n,) P(male): the mean of the sex classifier's fold models (NaN without one)."""
        if self.sex_kind is None:
            return np.full(len(bank), np.nan)
        idx = np.arange(len(bank))
        return np.mean([train.predict_p_male(model, bank, idx, zone, device=self.device, views=self.sex_tta_views)
                        .float().cpu().numpy()
                        for model, zone in self.models[(self.sex_kind, cv.POOLED)]], axis=0)

    def score(self, bank: torch.Tensor, sex: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """(per-kind mean predictions, ensemble bone age, (n, k) fold-wise ensembles)."""
        return self.combine(self.fold_predictions(bank, sex), sex)

    def combine(self, folds: Mapping[str, np.ndarray], sex: str) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
        """`score` from fold_predictions' {kind: (n, k)}: the kinds' fold means, their ensemble, and the
        k fold-wise ensembles; the ensembles corrected for the bias at the extremes (age_calibration)."""
        male = np.full(len(next(iter(folds.values()))), sex == "M")
        means = pd.DataFrame({kind: p.mean(axis=1) for kind, p in folds.items()})
        k = min(p.shape[1] for p in folds.values())
        per_fold = np.stack([ensemble.predict(self.record, pd.DataFrame({kind: p[:, f] for kind, p in folds.items()}),
                                              male) for f in range(k)], axis=1)
        bone_age = ensemble.predict(self.record, means, male)
        return (means, age_calibration.apply(bone_age, sex, self.age_calibration),
                age_calibration.apply(per_fold, sex, self.age_calibration))


def spread(per_fold: np.ndarray) -> np.ndarray:
    """Standard deviation across fold-wise ensembles (NaN with a single fold)."""
    return per_fold.std(axis=1, ddof=1) if per_fold.shape[1] > 1 else np.full(len(per_fold), np.nan)


def interval_bounds(out: pd.DataFrame, calibration: Mapping[str, Any] | None) -> tuple[np.ndarray, np.ndarray]:
    """(lower, upper) of the bone age's prediction interval for scored rows (boneage.validation.intervals;
    NaN without a calibration). An image of unknown or predicted sex gets the union of its two sexes'
    intervals, each around that sex's estimate: it covers the bone age whichever the sex is (a wrong call
    moves the estimate to the other sex's: the interval widens by sex_uncertainty_months)."""
    lower, upper = intervals.apply_interval(out["boneage_months"], out["sex"], calibration)
    either = out["sex"].isna().to_numpy() | (out["sex_source"] == "predicted").to_numpy()
    unknown = either & out["boneage_if_female_months"].notna().to_numpy()
    if calibration is not None and unknown.any():
        f_lo, f_hi = intervals.apply_interval(out["boneage_if_female_months"].to_numpy(float)[unknown], "F", calibration)
        m_lo, m_hi = intervals.apply_interval(out["boneage_if_male_months"].to_numpy(float)[unknown], "M", calibration)
        lower[unknown], upper[unknown] = np.fmin(f_lo, m_lo), np.fmax(f_hi, m_hi)
    return lower, upper


def ensemble_record(bundle: Bundle) -> dict[str, Any]:
    """The ensemble weights scoring uses (the fit the bundle names as `use`)."""
    fits = bundle.ensemble.get("fits") or {}
    use = bundle.ensemble.get("use")
    if use not in fits:
        raise BundleError(f"bundle {bundle.uri}: ensemble.json names fit {use!r}, which it does not hold "
                         f"(has {sorted(fits)})")
    return fits[use]


def resolve_sex(rows: pd.DataFrame) -> tuple[list[str | None], list[str]]:
    """(sex 'F'/'M'/None, where it came from) per row: the CSV's `male`, else the image's DICOM
    PatientSex (`image_sex`), else unknown."""
    sexes, sources = [], []
    for male, image_sex in zip(rows.get("male", pd.Series([None] * len(rows))),
                               rows.get("image_sex", pd.Series([None] * len(rows)))):
        if not pd.isna(male):
            sexes.append("M" if bool(male) else "F")
            sources.append("csv")
        elif not pd.isna(image_sex) and image_sex in ("M", "F"):
            sexes.append(image_sex)
            sources.append("dicom")
        else:
            sexes.append(None)
            sources.append("unknown")
    return sexes, sources


def _confident(p_male: np.ndarray, p_low: float | None, p_high: float | None) -> tuple[np.ndarray, np.ndarray]:
    """(male, female) confident calls: P(male) ≥ p_high, ≤ p_low; none when the bundle has not earned
    them (p_low None: boneage.validation.sex_calls) or P(male) is NaN."""
    p = np.asarray(p_male, float)
    if p_low is None or p_high is None:
        return np.zeros(len(p), bool), np.zeros(len(p), bool)
    with np.errstate(invalid="ignore"):
        return p >= p_high, p <= p_low


def predicted_sex(p_male: np.ndarray, p_low: float | None, p_high: float | None) -> tuple[list[str | None], np.ndarray]:
    """(sex 'F'/'M', or None where unsure, unsure bool) per P(male): unsure strictly between the
    bundle's p_low and p_high (chosen out of fold, sex_calls), or NaN, or always when they are None."""
    male, female = _confident(p_male, p_low, p_high)
    return ["M" if m else "F" if f else None for m, f in zip(male, female)], ~(male | female)


def sex_mismatch(p_male: np.ndarray, sex, p_low: float | None, p_high: float | None) -> np.ndarray:
    """True where the sex classifier confidently contradicts a given sex: 'M' with P(male) at most
    p_low, 'F' with at least p_high (the bundle's earned thresholds, at which scoring would use a
    predicted sex; None: never). False where P(male) or the sex is missing. A flag to look at, not a
    rejection: docs/scoring.md says why."""
    male, female = _confident(p_male, p_low, p_high)
    sex = np.asarray(sex, dtype=object)
    return ((sex == "M") & female) | ((sex == "F") & male)


def sex_uncertainty(if_female: np.ndarray, if_male: np.ndarray, sex_source: np.ndarray) -> np.ndarray:
    """How far the bone age moves if the sex it was scored under is wrong, in months: |female − male|
    where the sex was predicted (a wrong call gives the other sex's estimate), half of it where the sex
    is unknown (the bone age is their mean, half-way between), 0 where the sex was given (the record is
    trusted; sex_mismatch flags a doubt)."""
    gap = np.abs(np.asarray(if_female, float) - np.asarray(if_male, float))
    source = np.asarray(sex_source, dtype=object)
    return np.where(source == "predicted", gap, np.where(source == "unknown", gap / 2, 0.0))


def resolve_age(rows: pd.DataFrame) -> tuple[np.ndarray, list[str | None]]:
    """(chronological age in months, its source) per row: the CSV's age_months, else the DICOM's; a DICOM
    age that was implausible (boneage.data.dicom) leaves the age NaN and its source "dicom_unused: why"."""
    ages = np.full(len(rows), np.nan)
    sources: list[str | None] = [None] * len(rows)
    csv = rows["age_months"].to_numpy(float, na_value=np.nan) if "age_months" in rows else ages.copy()
    image = rows["image_age_months"].to_numpy(float, na_value=np.nan) if "image_age_months" in rows else ages.copy()
    image_source = rows["image_age_source"].tolist() if "image_age_source" in rows else [None] * len(rows)
    for i in range(len(rows)):
        if np.isfinite(csv[i]):
            ages[i], sources[i] = csv[i], "csv"
        elif np.isfinite(image[i]):
            ages[i], sources[i] = image[i], f"dicom_{image_source[i] or 'dates'}"
        elif isinstance(image_source[i], str) and image_source[i]:  # the header's age, not used: why
            sources[i] = f"dicom_{image_source[i]}"
    return ages, sources


def score_rows(rows: pd.DataFrame, models: BundleModels, images: list | None = None) -> pd.DataFrame:
    """The output table (OUTPUT_COLUMNS + one column per kind) for registered rows (the registered
    table's columns, plus optional `male` and `age_months` from the user's CSV). Failed rows keep
    their status and error and get no bone age. `images`: each row's registered image as an array (or
    None), in place of decoding its registered_png (the per-image path: score_prepared)."""
    rows = rows.reset_index(drop=True)
    sexes, sex_sources = resolve_sex(rows)
    ages, age_sources = resolve_age(rows)
    out = pd.DataFrame({"id": rows["id"], "uri": rows.get("uri"), "path": rows.get("path"), "status": rows["status"], "error": rows["error"],
                        "sex": sexes, "sex_source": sex_sources, "sex_unknown": [s is None for s in sexes]})
    for column in ("boneage_months", "boneage_lower_months", "boneage_upper_months", "boneage_sd_months",
                   "boneage_if_female_months", "boneage_if_male_months", "sex_uncertainty_months"):
        out[column] = np.nan
    for kind in models.kinds:
        out[kind] = np.nan
    out[gate.ZONE_SPREAD] = np.nan
    out["p_male"], out["sex_unsure"], out["sex_mismatch"] = np.nan, False, False
    registered = rows["registered_png"].notna().to_numpy() if images is None else np.array([i is not None for i in images])
    ok = (rows["status"] == "ok").to_numpy() & registered
    if ok.any():
        at = np.flatnonzero(ok)
        bank = (cv.decode_bank(rows["registered_png"].iloc[at].tolist(), rows["id"].iloc[at].tolist()) if images is None
                else torch.from_numpy(np.stack([np.asarray(images[i], np.uint8) for i in at])[:, None]))
        if models.sex_kind is not None:  # P(male) of every image (QA where the sex is known)
            p_male = models.p_male(bank)
            p_low, p_high = models.sex_calls["p_low"], models.sex_calls["p_high"]
            out.loc[at, "sex_mismatch"] = sex_mismatch(p_male, [sexes[i] for i in at], p_low, p_high)  # given sexes only
            guess, unsure = predicted_sex(p_male, p_low, p_high)
            unknown = np.array([sexes[i] is None for i in at])
            use = at[unknown & ~unsure]  # unknown sex: the predicted one, unless unsure
            for i, sex in zip(use, np.asarray(guess, dtype=object)[unknown & ~unsure]):
                sexes[i] = sex
            out.loc[at, "p_male"] = p_male
            out.loc[at, "sex_unsure"] = unknown & unsure
            out.loc[use, "sex"] = [sexes[i] for i in use]
            out.loc[use, "sex_source"] = "predicted"
            out.loc[use, "sex_unknown"] = False
        sex_of = np.array([sexes[i] for i in at], dtype=object)
        unknown = pd.isna(sex_of)
        predicted = (out.loc[at, "sex_source"] == "predicted").to_numpy()
        both = {}
        for sex in ("F", "M"):
            # An image of unknown or predicted sex is scored by both sexes' models: both estimates are kept.
            mine = np.flatnonzero((sex_of == sex) | unknown | predicted)
            if not len(mine):
                continue
            folds = models.fold_predictions(bank[mine], sex)
            means, boneage, per_fold = models.combine(folds, sex)
            known = sex_of[mine] == sex  # scored as this sex (given or predicted)
            rows_at = at[mine[known]]
            out.loc[rows_at, gate.ZONE_SPREAD] = gate.one_fold_zone_spread(
                {kind: p[known] for kind, p in folds.items()}, rows["id"].iloc[rows_at].tolist())
            out.loc[rows_at, "boneage_months"] = boneage[known]
            out.loc[rows_at, "boneage_sd_months"] = spread(per_fold[known])
            for kind in models.kinds:
                out.loc[rows_at, kind] = means[kind].to_numpy()[known]
            column = "boneage_if_female_months" if sex == "F" else "boneage_if_male_months"
            keep = unknown[mine] | predicted[mine]
            out.loc[at[mine[keep]], column] = boneage[keep]
            both[sex] = per_fold[unknown[mine]]
        if unknown.any():
            # Unknown sex: the mean of both sexes' estimates; its spread counts both sexes' fold models.
            pooled = np.concatenate([both["F"], both["M"]], axis=1)
            out.loc[at[unknown], "boneage_months"] = out.loc[at[unknown], ["boneage_if_female_months",
                                                                           "boneage_if_male_months"]].mean(axis=1)
            out.loc[at[unknown], "boneage_sd_months"] = spread(pooled)
        out.loc[at, "sex_uncertainty_months"] = sex_uncertainty(
            out.loc[at, "boneage_if_female_months"].to_numpy(float), out.loc[at, "boneage_if_male_months"].to_numpy(float),
            out.loc[at, "sex_source"].to_numpy(object))
        out.loc[at, "boneage_lower_months"], out.loc[at, "boneage_upper_months"] = interval_bounds(
            out.loc[at], models.interval)
    out["chronological_age_months"] = ages
    out["age_source"] = age_sources
    out["boneage_minus_age_months"] = out["boneage_months"] - ages
    for column in ("registration_doubtful", "mask_doubtful", "keypoint_source", "keypoint_confidence",
                   "format", "height", "width", "mirrored", "transform"):
        out[column] = rows[column] if column in rows else None
    out = columns.add_columns(out, models.kinds, models.gate)
    return out[list(OUTPUT_COLUMNS) + list(models.kinds)]


def summary(table: pd.DataFrame) -> dict[str, Any]:
    """What the end of a scoring run prints: counts by status, error code, sex source and QA flag."""
    from boneage.errors import error_code

    ok = table[table["status"] == "ok"]
    failed = table[table["status"] != "ok"]
    return {
        "files": int(len(table)), "scored": int(ok["boneage_months"].notna().sum()), "failed": int(len(failed)),
        "failed_by_code": {str(k): int(v) for k, v in failed["error"].map(error_code).value_counts().items()},
        "sex_source": {str(k): int(v) for k, v in ok["sex_source"].value_counts().items()},
        "sex_unsure": int(ok["sex_unsure"].fillna(False).astype(bool).sum()) if "sex_unsure" in ok else 0,
        "registration_doubtful": int(ok["registration_doubtful"].fillna(False).astype(bool).sum()),
        "boneage_months_median": float(ok["boneage_months"].median()) if len(ok) else None,
    }


def latest_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per file (uri) of a scoring output made by several runs: the latest by `scored_at`, so a
    rerun's row replaces an earlier run's row of a transient error (parts are append-only)."""
    if "scored_at" not in table or not table["uri"].duplicated().any():
        return table
    order = table.sort_values("scored_at", kind="stable", na_position="first")
    has_uri = order["uri"].notna()
    latest = order[has_uri].drop_duplicates("uri", keep="last")
    return pd.concat([latest, order[~has_uri]]).sort_index(kind="stable")


def settled_uris(table: pd.DataFrame) -> set[str]:
    """The files a resumed run need not score again: those whose latest row (uri, error, scored_at) is
    not a transient error (errors.TRANSIENT_CODES: the network, not the file), nor a failed STOW-RS
    (dicom_stow "failed: ...": scored and sent again)."""
    from boneage.errors import TRANSIENT_CODES, error_code

    latest = latest_rows(table)
    transient = latest["error"].map(error_code).isin(TRANSIENT_CODES) if "error" in latest else False
    if "dicom_stow" in latest:
        transient = transient | latest["dicom_stow"].fillna("").str.startswith("failed")
    return {u for u in latest.loc[~transient, "uri"] if u}


def with_subjects(manifest: pd.DataFrame, subjects: pd.DataFrame | None,
                  errors: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The manifest with the user's CSV (sex, chronological age) joined by id; a CSV row that could
    not be read makes its image an error row (never a silent guess)."""
    out = manifest.copy()
    out["male"] = None
    out["age_months"] = np.nan
    if subjects is not None and len(subjects):
        by_id = subjects.set_index("id")
        known = out["id"].isin(by_id.index)
        out.loc[known, "male"] = by_id.loc[out.loc[known, "id"], "male"].to_numpy()
        out.loc[known, "age_months"] = by_id.loc[out.loc[known, "id"], "age_months"].to_numpy()
    for rid, err in (errors or {}).items():
        bad = (out["id"] == rid) & (out["status"] == "ok")
        out.loc[bad, "status"] = "error"
        out.loc[bad, "error"] = str(err)
    return out


# -- one image, without Ray: the service's path (boneage.distributed.ray_serve) -----------------------
# The same stages as batch scoring (decode, boneage.registration.prepare, the key point model, score_rows), on
# bytes in memory, with the registered image handed on as an array (no PNG encode and decode between them).

# Where a batch row says "csv" (the user's subjects CSV), a scored request says "request": given with it.
GIVEN_WITH_REQUEST = "request"


def prepare_one(data: bytes, rid: str = "image", keypoint_model: torch.nn.Module | None = None,
                device: str | torch.device = "cpu", max_pixels: int | None = None) -> dict[str, Any]:
    """One image's registered row (boneage.registration.prepare's columns, status and error) from its
    bytes (PNG, JPEG or DICOM), its registered image under prepare.REGISTERED_IMAGE. Never raises for a
    bad image: the row has status 'error' and the batch path's error text. `keypoint_model`: the bundle's
    (boneage.model.keypoint_model.load), None: geometric key points only (as batch scoring without one).
    `max_pixels`: a larger image is a bad_image row, refused from its header (the service's serve.max_pixels_mpx)."""
    from boneage.data.images import decode_image
    from boneage.errors import STATUS_OK
    from boneage.registration import prepare

    row: dict[str, Any] = {"id": rid, "uri": None, "path": None, "status": STATUS_OK, "error": None}
    try:
        image, meta = decode_image(data, rid, max_pixels)
    except Exception as err:
        return prepare.failed_row(row, err)
    return register_analysed([prepare.analyse_image(row, image, meta)], keypoint_model, device)[0]


def register_analysed(analysed: list[dict[str, Any]], keypoint_model: torch.nn.Module | None = None,
                      device: str | torch.device = "cpu") -> list[dict[str, Any]]:
    """prepare.register_row (encode=False) of analysed rows (prepare.analyse_row / analyse_image), the key
    point model run once on all of them: the registered images stay arrays (prepare.REGISTERED_IMAGE)."""
    from boneage.errors import STATUS_OK
    from boneage.model import keypoint_model as keypoint_model_mod
    from boneage.registration import prepare

    points: list[np.ndarray | None] = [None] * len(analysed)
    ok = [i for i, row in enumerate(analysed) if row["status"] == STATUS_OK and row.get("keypoint_input") is not None]
    if keypoint_model is not None and ok:
        predicted = keypoint_model_mod.predict_pixels(
            keypoint_model, np.stack([prepare.decode_png(analysed[i]["keypoint_input"]) for i in ok]),
            np.array([[analysed[i]["width"], analysed[i]["height"]] for i in ok], float), device)
        for i, p in zip(ok, predicted):
            points[i] = p
    return [prepare.register_row(row, p, encode=False) for row, p in zip(analysed, points)]


def score_prepared(prepared: list[Mapping[str, Any]], models: BundleModels, sexes: list[str | None],
                   ages: list[float | None]) -> list[dict[str, Any]]:
    """The scoring rows (OUTPUT_COLUMNS + the kinds, NaN as None) of prepare_one's rows, scored together
    by score_rows; `sexes` ('F', 'M' or None) and `ages` (months or None) as given with each image: its
    sex_source / age_source then say "request" (else the DICOM header's, or unknown, as in batch scoring)."""
    from boneage.registration import prepare

    rows = pd.DataFrame([{k: v for k, v in p.items() if k != prepare.REGISTERED_IMAGE} for p in prepared])
    rows["male"] = [None if s is None else s == "M" for s in sexes]
    rows["age_months"] = [np.nan if a is None else float(a) for a in ages]
    out = score_rows(rows, models, images=[p.get(prepare.REGISTERED_IMAGE) for p in prepared])
    out["sex_source"] = out["sex_source"].replace("csv", GIVEN_WITH_REQUEST)
    out["age_source"] = out["age_source"].replace("csv", GIVEN_WITH_REQUEST)
    return [{k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()}  # plain Python: JSON
            for row in out.astype(object).where(out.notna(), None).to_dict("records")]


def score_one(models: BundleModels, data: bytes, sex: str | None = None, age_months: float | None = None,
              rid: str = "image", keypoint_model: torch.nn.Module | None = None) -> dict[str, Any]:
    """One image's scoring row from its bytes: prepare_one, then score_prepared (the numbers of a
    `boneage score` row of that file; sex_source / age_source "request" where that row says "csv")."""
    return score_prepared([prepare_one(data, rid, keypoint_model, models.device)], models, [sex], [age_months])[0]
