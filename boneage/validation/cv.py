"""k-fold cross-validation of the zone models, without Ray: folds, the trial list, the image bank of
one sex, and the out-of-fold tables. boneage.distributed.ray_cv runs the trials on Ray Tune + Ray Train.

A trial is one (model kind, sex, fold): kind `A-reg` trained on the females of every fold but 0 and
scored on the females of fold 0 is trial `A-reg-F-fold0`. With cv.sex_models "pooled" a bone age kind
has one trial per fold on both sexes, the sex an input of the network (`A-reg-all-fold0`), as the sex
classifier always has (`A-sex-all-fold0`); the out-of-fold table is the same either way. With cv.ship
"refit" each bone age kind (and sex) also has a refit trial on every CV image (`A-reg-all-refit`), which
scores no fold: the bundle ships it instead of the fold models. Every finished trial leaves its out-of-fold
predictions in CV/parts/<trial>.parquet (its record in the file's metadata); the experiment's tables
are assembled from those parts, so a rerun trains only the trials that have none.
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from boneage.registration import prepare
from boneage.data import storage
from boneage.config import CVConfig
from boneage.errors import STATUS_OK, UserError
from boneage.registration.frame import STORE_H, STORE_W
from boneage.model.choices import SEX_MODELS
from boneage.model.networks import MODEL_KINDS, SEX_KINDS
from boneage.model.train import TrainConfig

SEXES = ("F", "M")
POOLED = "all"  # the sex of a pooled trial (a sex classifier's, or any with cv.sex_models "pooled")
REFIT = -1  # the fold of a refit trial: it trains on every CV image and scores none (cv.ship "refit")
TRIAL_META_KEY = b"boneage_trial"  # parquet metadata key of a part's trial record


# -- folds ----------------------------------------------------------------------------------------


def labelled(table: pd.DataFrame) -> np.ndarray:
    """Rows that take part in CV: status ok, with a bone age and a sex."""
    return ((table["status"] == STATUS_OK) & table["boneage"].notna() & table["male"].notna()).to_numpy()


def group_keys(table: pd.DataFrame) -> np.ndarray:
    """Each row's patient group: its `group` (boneage.data.ingest: hashed) where it has one, else a key of
    its own (no group column, or an empty cell: the image is taken to be the only one of its child)."""
    ids = table["id"].astype(str).to_numpy()
    if "group" not in table:
        return np.array(["id:" + i for i in ids], dtype=object)
    groups = table["group"].to_numpy(dtype=object)
    return np.array([f"group:{g}" if isinstance(g, str) and g else "id:" + i for g, i in zip(groups, ids)],
                    dtype=object)


def grouped(table: pd.DataFrame) -> bool:
    """Whether any two rows share a patient group (else every image is its own group)."""
    keys = group_keys(table)
    return len(set(keys)) < len(keys)


def grouping_record(folds: pd.DataFrame) -> dict:
    """What cv/summary.json and the report say about patients, from the folds table (folds_table): whether
    the folds were drawn by patient, and how many images and patients they hold."""
    patients = len(set(group_keys(folds)))
    return {"by_patient": bool(patients < len(folds)), "images": int(len(folds)), "patients": int(patients)}


def _group_units(rows: np.ndarray, keys: np.ndarray, ages: np.ndarray, ids: np.ndarray
                 ) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The patients among `rows`, in the order of their first row: (each one's rows, median age, smallest
    id). An image of its own is a unit of one with its own age and id, so that without groups the units
    are the rows themselves and everything drawn on them is drawn exactly as on rows."""
    members: dict[Any, list[int]] = {}
    for row in rows:
        members.setdefault(keys[row], []).append(int(row))
    units = [np.asarray(m, dtype=np.int64) for m in members.values()]
    unit_ages = np.array([float(np.median(ages[m])) for m in units])
    unit_ids = np.array([min(ids[m]) for m in units], dtype=object)
    return units, unit_ages, unit_ids


def assign_folds(table: pd.DataFrame, k: int, seed: int) -> np.ndarray:
    """Fold (0..k-1) of every row, -1 for rows that take no part (error rows, no label or sex).

    By patient (`group` column, see group_keys): all images of one child are in one fold. Stratified by
    sex and age: within each sex the patients are sorted by age (their images' median; ties by smallest
    id) and each consecutive run of k is dealt to the k folds in a random order, so every fold of a sex
    holds the same number of patients (±1) and nearly the same age distribution. Without groups a
    patient is an image, and the folds are those of the per-image assignment. Deterministic by seed.
    """
    if k < 2:
        raise UserError(f"k-fold CV needs k >= 2, got {k}")
    rng = np.random.default_rng(seed)
    folds = np.full(len(table), -1, dtype=np.int64)
    use = labelled(table)
    ids = table["id"].astype(str).to_numpy()
    ages = table["boneage"].to_numpy(dtype=float, na_value=np.nan)
    male = table["male"].to_numpy(dtype=object)
    keys = group_keys(table)
    sexes_of: dict[Any, set] = {}
    for row in np.flatnonzero(use):
        sexes_of.setdefault(keys[row], set()).add(bool(male[row]))
    mixed = [key for key, sexes in sexes_of.items() if len(sexes) > 1]
    if mixed:
        raise UserError(f"{len(mixed)} patient groups have images of both sexes (e.g. {sorted(mixed)[0]}): "
                        "the manifest makes those rows bad_label errors; fix the labels")
    for is_male in (False, True):
        rows = np.flatnonzero(use & (male == is_male))
        units, unit_ages, unit_ids = _group_units(rows, keys, ages, ids)
        if 0 < len(units) < k:
            sex = "M" if is_male else "F"
            hint = ("" if len(units) == len(rows) else "; one PatientID for everyone (de-identified)? a "
                    "patient_id column in the labels sets the patients (an empty cell: an image of its own)")
            what = "images" if len(units) == len(rows) else "patients"  # no grouping: one image, one child
            raise UserError(f"{len(units)} labelled {sex} {what} cannot fill {k} folds: need at least {k}{hint}")
        order = np.lexsort((unit_ids, unit_ages))
        for start in range(0, len(order), k):
            run = order[start : start + k]
            for unit, fold in zip(run, rng.permutation(k)[: len(run)]):
                folds[units[unit]] = fold
    return folds


def inner_split(ages: np.ndarray, train_idx: np.ndarray, fraction: float, seed: int
                ) -> tuple[np.ndarray, np.ndarray]:
    """(fit, select): the training rows split into the rows a model fits on and its selection split,
    `fraction` of them stratified by age (sorted by age, one row drawn from each consecutive run of
    ~1/fraction). Deterministic by seed. fraction 0: (train_idx, empty)."""
    train_idx = np.asarray(train_idx)
    if fraction <= 0:
        return train_idx, train_idx[:0]
    if not 0 < fraction < 0.5:
        raise UserError(f"cv.inner_val_fraction must be 0 (fixed schedule) or in (0, 0.5), not {fraction}")
    rng = np.random.default_rng(seed)
    order = train_idx[np.argsort(np.asarray(ages)[train_idx], kind="stable")]
    run = max(2, int(round(1 / fraction)))
    picks = []
    for start in range(0, len(order), run):
        block = order[start : start + run]
        # a short last run gets a pick in proportion to its length: the share stays `fraction`
        if len(block) == run or rng.random() < len(block) / run:
            picks.append(block[rng.integers(len(block))])
    select = np.sort(np.asarray(picks, dtype=train_idx.dtype))
    return np.setdiff1d(train_idx, select), select


def grouped_inner_split(table: pd.DataFrame, train_idx: np.ndarray, fraction: float, seed: int,
                        ages: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """inner_split by patient (see group_keys): `fraction` of the patients among the rows `train_idx` of
    `table` (id, boneage or `ages`, optional group), stratified by their median age; all of a patient's
    rows go to the same side. Without groups it is inner_split on the rows, draw for draw."""
    train_idx = np.asarray(train_idx)
    ids = table["id"].astype(str).to_numpy()
    ages = table["boneage"].to_numpy(float) if ages is None else np.asarray(ages)
    units, unit_ages, _ = _group_units(train_idx, group_keys(table), ages, ids)
    _, picked = inner_split(unit_ages, np.arange(len(units)), fraction, seed)
    select = np.sort(np.concatenate([units[u] for u in picked])).astype(train_idx.dtype) if len(picked) \
        else train_idx[:0]
    return np.setdiff1d(train_idx, select), select


def folds_table(table: pd.DataFrame, k: int, seed: int) -> pd.DataFrame:
    """id, male, boneage, fold of every labelled ok row, sorted by id (CV/folds.parquet); with patient
    groups also `group` (hashed), so that later stages can keep a patient together."""
    folds = assign_folds(table, k, seed)
    out = table.loc[folds >= 0, ["id", "male", "boneage"] + (["group"] if grouped(table) else [])].copy()
    out["male"] = out["male"].astype(bool)
    out["boneage"] = out["boneage"].astype(float)
    out["fold"] = folds[folds >= 0]
    return out.sort_values("id", kind="stable").reset_index(drop=True)


# -- trials ---------------------------------------------------------------------------------------


@dataclass(frozen=True, order=True)
class Trial:
    kind: str  # 'A-reg', ... (a key of models.MODEL_KINDS), or a sex classifier 'A-sex' (SEX_KINDS)
    sex: str  # 'F' or 'M'; POOLED for a sex classifier, or a pooled bone age model (sex input)
    fold: int

    @property
    def name(self) -> str:
        return f"{self.kind}-{self.sex}-" + ("refit" if self.is_refit else f"fold{self.fold}")

    @property
    def is_refit(self) -> bool:
        """A model refit on every CV image after the CV (cv.ship "refit"): no scored fold, no OOF rows."""
        return self.fold == REFIT

    @property
    def male(self) -> bool | None:
        """The sex of the images it trains on (None: both, a sex classifier or a pooled model)."""
        return None if self.sex == POOLED else self.sex == "M"

    @property
    def is_sex_classifier(self) -> bool:
        return self.kind in SEX_KINDS

    @property
    def has_sex_input(self) -> bool:
        """A bone age model for both sexes, which takes the sex as an input (cv.sex_models "pooled")."""
        return self.sex == POOLED and not self.is_sex_classifier


_TRIAL_NAME = re.compile(r"^(?P<kind>[A-Z]+-[a-z]+)-(?P<sex>[FM]|all)-(fold(?P<fold>\d+)|(?P<refit>refit))$")


def parse_trial(name: str) -> Trial:
    m = _TRIAL_NAME.match(name)
    sex_kind = m is not None and m["kind"] in SEX_KINDS
    # a sex classifier is always pooled; a bone age kind per sex or pooled
    if (not m or (m["kind"] not in MODEL_KINDS and not sex_kind) or (sex_kind and m["sex"] != POOLED)
            or (sex_kind and m["refit"])):
        raise ValueError(f"not a trial name: {name!r} (expected e.g. 'A-reg-F-fold0', 'A-reg-all-fold0', "
                         "'A-reg-all-refit' or 'A-sex-all-fold0')")
    return Trial(m["kind"], m["sex"], REFIT if m["refit"] else int(m["fold"]))


def cv_trials(kinds: Iterable[str], sexes: Iterable[str], k: int, sex_models: str = "per_sex") -> list[Trial]:
    """Every (kind, sex, fold), in a stable order: kind, then sex, then fold. sex_models "pooled": one
    trial per (kind, fold) on the images of all `sexes`, named with sex POOLED."""
    if sex_models not in SEX_MODELS:
        raise UserError(f"cv.sex_models must be one of {SEX_MODELS}, got {sex_models!r}")
    kinds, sexes = list(kinds), list(sexes)
    for kind in kinds:
        if kind not in MODEL_KINDS:
            raise UserError(f"unknown model kind {kind!r}; known: {', '.join(MODEL_KINDS)}")
    for sex in sexes:
        if sex not in SEXES:
            raise UserError(f"sex must be one of {SEXES}, got {sex!r}")
    if sex_models == "pooled":
        return [Trial(kind, POOLED, fold) for kind in kinds for fold in range(k)] if sexes else []
    return [Trial(kind, sex, fold) for kind in kinds for sex in sexes for fold in range(k)]


def refit_trials(kinds: Iterable[str], sexes: Iterable[str], sex_models: str = "per_sex") -> list[Trial]:
    """One trial per (kind, sex) (pooled: per kind) on every CV image, after the CV: the bone age models
    of a bundle with cv.ship "refit". They score no fold, so they add nothing to the out-of-fold table."""
    return [Trial(t.kind, t.sex, REFIT) for t in cv_trials(kinds, sexes, 1, sex_models)]


def all_trials(cvc: CVConfig, sexes: Iterable[str]) -> list[Trial]:
    """Every trial a run trains: the bone age kinds' k folds, the sex classifier's, and the refits
    (cv.ship "refit")."""
    sexes = list(sexes)
    return (cv_trials(cvc.kinds, sexes, cvc.k, cvc.sex_models) + sex_trials(cvc.sex_kind, cvc.k)
            + (refit_trials(cvc.kinds, sexes, cvc.sex_models) if cvc.ship == "refit" else []))


def shipped_trials(cvc: CVConfig, sexes: Iterable[str]) -> list[Trial]:
    """The trials whose models the bundle holds: the bone age models cv.ship names (the k fold models, or
    the refits) and the sex classifier's fold models."""
    sexes = list(sexes)
    bone_age = (refit_trials(cvc.kinds, sexes, cvc.sex_models) if cvc.ship == "refit"
                else cv_trials(cvc.kinds, sexes, cvc.k, cvc.sex_models))
    return bone_age + sex_trials(cvc.sex_kind, cvc.k)


def sex_trials(sex_kind: str | None, k: int) -> list[Trial]:
    """The sex classifier's trials, one per fold on both sexes pooled ([] when sex_kind is None)."""
    if sex_kind is None:
        return []
    if sex_kind not in SEX_KINDS:
        raise UserError(f"unknown sex classifier kind {sex_kind!r}; known: {', '.join(SEX_KINDS)}")
    return [Trial(sex_kind, POOLED, fold) for fold in range(k)]


def pending_trials(trials: Sequence[Trial], finished: Iterable[str]) -> list[Trial]:
    """The trials still to train: those without a finished part."""
    done = set(finished)
    return [t for t in trials if t.name not in done]


def sexes_present(folds: pd.DataFrame, sexes: Iterable[str]) -> list[str]:
    """The configured sexes that have labelled images (no trials for a sex with none)."""
    present = {"M" if m else "F" for m in folds["male"].unique()}
    return [s for s in sexes if s in present]


def train_config(cv: CVConfig, trial: Trial, seed: int) -> TrainConfig:
    """The TrainConfig of one trial; each trial has its own seed derived from the run's. A sex classifier
    trial trains cv.sex_epochs where set."""
    trial_seed = int(np.random.SeedSequence([seed, zlib.crc32(trial.name.encode())]).generate_state(1)[0])
    return TrainConfig(
        epochs=cv.sex_epochs if trial.is_sex_classifier and cv.sex_epochs else cv.epochs, batch_size=cv.batch_size, lr=cv.lr, weight_decay=cv.weight_decay,
        schedule=cv.schedule, patience=cv.patience, width_mult=cv.width_mult, fc=cv.fc,
        dropout=cv.dropout, cls_loss=cv.cls_loss, cls_sigma=cv.cls_sigma,
        cls_ce_weight=cv.cls_ce_weight, bf16=cv.bf16, channels_last=cv.channels_last, compile=cv.compile,
        seed=trial_seed % (2**31),
    )


# -- the bank -------------------------------------------------------------------------------------


def read_trial_rows(registered_uri: str, folds: pd.DataFrame, male: bool | None,
                    storage_options: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """The CV rows of one sex (None: both) with their registered images: id, male, boneage, fold,
    registered_png, sorted by id. Reads only that sex's rows of the registered parquet."""
    mine = folds if male is None else folds[folds["male"] == male]
    path, filesystem = storage.arrow_location(registered_uri, storage_options)
    filters = [("status", "==", STATUS_OK)] + ([] if male is None else [("male", "==", male)])
    images = pq.read_table(path, filesystem=filesystem, columns=["id", "registered_png"],
                           filters=filters).to_pandas()
    images = images[images["id"].isin(mine["id"])]
    rows = mine.merge(images, on="id", how="left", validate="one_to_one")
    missing = rows["registered_png"].isna()
    if missing.any():
        raise UserError(f"{int(missing.sum())} CV images have no registered image in {registered_uri}, "
                         f"e.g. {rows.id[missing].iloc[0]}")
    return rows.sort_values("id", kind="stable").reset_index(drop=True)


def decode_bank(pngs: Sequence[bytes], ids: Sequence[str] | None = None) -> torch.Tensor:
    """uint8 bank (N, 1, 1040, 800) from registered PNGs (training and scoring read them alike)."""
    bank = torch.empty((len(pngs), 1, STORE_H, STORE_W), dtype=torch.uint8)
    for i, data in enumerate(pngs):
        image = prepare.decode_png(data)
        if image.shape != (STORE_H, STORE_W):
            name = ids[i] if ids is not None else f"#{i}"
            raise ValueError(f"registered image {name} is {image.shape}, not {(STORE_H, STORE_W)}")
        bank[i, 0] = torch.from_numpy(image.copy())
    return bank


def load_bank(rows: pd.DataFrame) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(uint8 bank (N, 1, 1040, 800), ages (N,) months float32, male (N,) bool) from registered rows."""
    bank = decode_bank(rows["registered_png"].tolist(), rows["id"].tolist())
    ages = rows["boneage"].to_numpy(dtype=np.float32)
    male = rows["male"].to_numpy(dtype=bool) if "male" in rows else np.zeros(len(rows), bool)
    return bank, ages, male


# -- parts and tables -----------------------------------------------------------------------------


def part_table(trial: Trial, ids: Sequence[str], ages: np.ndarray, pred: np.ndarray,
               record: Mapping[str, Any]) -> pa.Table:
    """A finished trial's out-of-fold predictions (id, boneage, pred), its record in the metadata."""
    table = pa.table({"id": pa.array(list(ids), pa.string()),
                      "boneage": pa.array(np.asarray(ages, float)),
                      "pred": pa.array(np.asarray(pred, float))})
    meta = {"trial": trial.name, "kind": trial.kind, "sex": trial.sex, "fold": trial.fold, **record}
    return table.replace_schema_metadata({TRIAL_META_KEY: json.dumps(meta).encode()})


def write_part(uri: str, table: pa.Table, storage_options: Mapping[str, Any] | None = None) -> None:
    with storage.open_output(uri, "wb", storage_options) as f:
        pq.write_table(table, f)


def part_record(table: pa.Table) -> dict:
    """The trial record a part carries in its metadata."""
    return json.loads(table.schema.metadata[TRIAL_META_KEY])


def read_part(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[pd.DataFrame, dict]:
    """(predictions, trial record) of one part."""
    with storage.open_output(uri, "rb", storage_options) as f:
        table = pq.read_table(f)
    return table.to_pandas(), part_record(table)


def oof_table(folds: pd.DataFrame, parts: Sequence[tuple[pd.DataFrame, dict]], kinds: Sequence[str]) -> pd.DataFrame:
    """One row per CV image (id, male, boneage, fold) and one column per model kind holding the
    image's out-of-fold prediction by its sex's model of that kind, or the pooled model of that kind
    given its sex (NaN where the trial has not finished). Raises if a part predicts an image outside
    its trial's fold and sex."""
    out = folds[["id", "male", "boneage", "fold"]].sort_values("id", kind="stable").reset_index(drop=True)
    position = pd.Series(np.arange(len(out)), index=out["id"])
    columns = {kind: np.full(len(out), np.nan) for kind in kinds}
    for pred, record in parts:
        trial = parse_trial(record["trial"])
        if trial.kind not in columns:
            continue
        at = position.reindex(pred["id"]).to_numpy()
        if np.isnan(at.astype(float)).any():
            raise ValueError(f"part {trial.name} predicts images that are not in the folds")
        at = at.astype(int)
        wrong = out["fold"].to_numpy()[at] != trial.fold
        if trial.male is not None:  # a pooled trial scores both sexes of its fold
            wrong |= out["male"].to_numpy()[at] != trial.male
        if wrong.any():
            raise ValueError(f"part {trial.name} predicts images outside its fold and sex "
                             f"(e.g. {pred['id'].iloc[int(np.flatnonzero(wrong)[0])]})")
        columns[trial.kind][at] = pred["pred"].to_numpy(float)
    for kind in kinds:
        out[kind] = columns[kind]
    return out


def with_p_male(oof: pd.DataFrame, parts: Sequence[tuple[pd.DataFrame, dict]], sex_kind: str) -> pd.DataFrame:
    """The OOF table with `p_male`: each image's out-of-fold P(male) from the sex classifier's trial
    that scored its fold (NaN where that trial has not finished). Never an input of the ensemble."""
    out = oof.copy()
    position = pd.Series(np.arange(len(out)), index=out["id"])
    p_male = np.full(len(out), np.nan)
    for pred, record in parts:
        trial = parse_trial(record["trial"])
        if trial.kind != sex_kind:
            continue
        at = position.reindex(pred["id"]).to_numpy()
        if np.isnan(at.astype(float)).any() or (out["fold"].to_numpy()[at.astype(int)] != trial.fold).any():
            raise ValueError(f"part {trial.name} predicts images outside its fold")
        p_male[at.astype(int)] = pred["pred"].to_numpy(float)
    out["p_male"] = p_male
    return out


def sex_record(p_male: np.ndarray, male: np.ndarray) -> dict:
    """A sex classifier trial's out-of-fold numbers on its scored fold: ROC AUC, accuracy at 0.5,
    cross-entropy."""
    from boneage.validation.metrics import roc_auc

    p, y = np.asarray(p_male, float), np.asarray(male, bool)
    clipped = np.clip(p, 1e-6, 1 - 1e-6)
    return {"oof_auc": roc_auc(p, y), "oof_accuracy": float(((p > 0.5) == y).mean()) if len(p) else float("nan"),
            "oof_bce": float(-np.mean(np.where(y, np.log(clipped), np.log(1 - clipped)))) if len(p) else float("nan")}


def trials_table(parts: Sequence[tuple[pd.DataFrame, dict]]) -> pd.DataFrame:
    """One row per finished trial: its record (kind, sex, fold, best epoch, val MAE, epochs, seconds...)."""
    columns = ["trial", "kind", "sex", "fold", "best_epoch", "select_mae", "oof_mae", "epochs_run", "seconds",
               "n_train", "n_select", "n_val", "finished_at"]
    records = [record for _, record in parts]
    table = pd.DataFrame(records, columns=list(dict.fromkeys(columns + [c for r in records for c in r])))
    return table.sort_values(["kind", "sex", "fold"], kind="stable").reset_index(drop=True)


def median_baseline(oof: pd.DataFrame) -> np.ndarray:
    """Out-of-fold prediction by the per-sex median: each image gets the median age of its sex's
    images in the other folds (what a model that learnt nothing but the sex would predict)."""
    pred = np.full(len(oof), np.nan)
    for (male, fold), group in oof.groupby(["male", "fold"]):
        train = oof[(oof["male"] == male) & (oof["fold"] != fold)]
        pred[group.index.to_numpy()] = float(np.median(train["boneage"])) if len(train) else np.nan
    return pred


def summary(oof: pd.DataFrame, kinds: Sequence[str]) -> pd.DataFrame:
    """Out-of-fold MAE (months) per kind and sex, and of the per-sex median baseline."""
    oof = oof.reset_index(drop=True)
    baseline = median_baseline(oof)
    rows = []
    for name, pred in [*((k, oof[k].to_numpy(float)) for k in kinds), ("per-sex median", baseline)]:
        row = {"model": name}
        for sex, mask in (("F", ~oof["male"].to_numpy(bool)), ("M", oof["male"].to_numpy(bool)),
                          ("all", np.ones(len(oof), bool))):
            err = np.abs(pred[mask] - oof["boneage"].to_numpy(float)[mask])
            row[f"mae_{sex}"] = float(np.nanmean(err)) if np.isfinite(err).any() else float("nan")
            row[f"n_{sex}"] = int(np.isfinite(err).sum())
        rows.append(row)
    return pd.DataFrame(rows)


def record_from_state(state: Mapping[str, Any], n_train: int, n_select: int, n_val: int,
                      oof_mae: float, seconds: float) -> dict:
    """A trial's record from fit_zone_model's final state. best_epoch and select_mae come from the
    selection split (NaN select_mae: a fixed schedule); oof_mae is the chosen model's MAE on the scored
    fold, which chose nothing. With the scored fold watched (a diagnostic), watch_best_mae is the MAE
    that choosing the epoch on the scored fold would have reported, watch_best_epoch its epoch and
    watch_last_mae the last epoch's."""
    best = state["best"]
    record = {"best_epoch": int(best["epoch"]), "select_mae": float(best["value"]), "oof_mae": float(oof_mae),
              "epochs_run": int(state["epoch"]) + 1, "seconds": round(float(seconds), 1),
              "n_train": int(n_train), "n_select": int(n_select), "n_val": int(n_val)}
    watched = [h["watch_mae"] for h in state["history"] if "watch_mae" in h]
    if watched:
        record["watch_best_mae"] = float(min(watched))
        record["watch_best_epoch"] = int(state["history"][int(np.argmin(watched))]["epoch"])
        record["watch_last_mae"] = float(watched[-1])
    return record


def compact_model(state: Mapping[str, Any], trial: Trial, config: CVConfig) -> dict:
    """What the bundle needs of a trial: spec, best weights, metrics, the CV settings."""
    return {"spec": state["spec"], "best": {"model": state["best"]["model"]}, "metrics": state["best"]["metrics"],
            "trial": trial.name, "sex": trial.sex, "fold": trial.fold, "cv": config.model_dump(),
            "train": state["config"]}
