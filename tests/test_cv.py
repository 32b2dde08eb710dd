"""boneage.validation.cv without Ray: folds, trials, the bank, the out-of-fold tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from boneage.validation import cv
from boneage.registration import prepare
from boneage.config import CVConfig, load_config
from boneage.errors import UserError
from boneage.registration.frame import STORE_H, STORE_W


def _table(n_f=53, n_m=61, seed=0) -> pd.DataFrame:
    """A registered-like table: n_f girls and n_m boys with ages over 1-228 months, plus rows that
    must take no part (an error row, one without a label, one without a sex)."""
    rng = np.random.default_rng(seed)
    rows = [{"id": f"f{i}", "male": False, "boneage": float(rng.uniform(1, 228)), "status": "ok"} for i in range(n_f)]
    rows += [{"id": f"m{i}", "male": True, "boneage": float(rng.uniform(1, 228)), "status": "ok"} for i in range(n_m)]
    rows += [{"id": "bad", "male": True, "boneage": 100.0, "status": "error"},
             {"id": "nolabel", "male": False, "boneage": None, "status": "ok"},
             {"id": "nosex", "male": None, "boneage": 50.0, "status": "ok"}]
    return pd.DataFrame(rows)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_every_labelled_ok_image_is_in_exactly_one_fold(k):
    table = _table()
    folds = cv.assign_folds(table, k, seed=1)
    used = cv.labelled(table)
    assert used.sum() == 53 + 61
    assert ((folds >= 0) == used).all()  # each labelled ok image in one fold, the rest in none
    assert set(folds[used]) == set(range(k))
    # no image is in its own training folds: training and validation of a fold are disjoint, and
    # together they are every CV image
    ids = table.id.to_numpy()
    for f in range(k):
        train, val = set(ids[used & (folds != f)]), set(ids[used & (folds == f)])
        assert not train & val and train | val == set(ids[used])


@pytest.mark.parametrize("k", [3, 5])
def test_folds_are_stratified_by_sex_and_age(k):
    table = _table(n_f=200, n_m=230)
    folds = cv.assign_folds(table, k, seed=3)
    ages = table.boneage.to_numpy(float)
    for is_male, n in ((False, 200), (True, 230)):
        sex = cv.labelled(table) & (table.male == is_male).to_numpy()
        counts = np.bincount(folds[sex], minlength=k)
        assert counts.max() - counts.min() <= 1 and counts.sum() == n
        # dealing sorted runs of k: each fold's ages track the sex's whole distribution closely
        whole = np.percentile(ages[sex], [10, 25, 50, 75, 90])
        for f in range(k):
            per_fold = np.percentile(ages[sex & (folds == f)], [10, 25, 50, 75, 90])
            assert np.abs(per_fold - whole).max() < 10  # months; ages span 1-228
    # a plain random split is much less even (what stratification buys)
    rng = np.random.default_rng(3)
    female = cv.labelled(table) & (table.male == False).to_numpy()  # noqa: E712
    rand = rng.integers(0, k, female.sum())
    assert np.ptp(np.bincount(rand, minlength=k)) > 1


def test_folds_are_fixed_by_seed_and_row_order_free():
    table = _table()
    a = cv.assign_folds(table, 5, seed=7)
    np.testing.assert_array_equal(a, cv.assign_folds(table, 5, seed=7))
    assert (a != cv.assign_folds(table, 5, seed=8)).any()
    shuffled = table.sample(frac=1, random_state=0)
    b = cv.assign_folds(shuffled, 5, seed=7)
    np.testing.assert_array_equal(pd.Series(a, table.id).sort_index(), pd.Series(b, shuffled.id).sort_index())


def test_folds_need_enough_images():
    with pytest.raises(UserError, match="cannot fill 5 folds"):
        cv.assign_folds(_table(n_f=3, n_m=20), 5, seed=0)
    with pytest.raises(UserError, match="k >= 2"):
        cv.assign_folds(_table(), 1, seed=0)
    only_boys = cv.folds_table(_table(n_f=0, n_m=20), 4, seed=0)  # a sex with none: no trials for it
    assert cv.sexes_present(only_boys, ("F", "M")) == ["M"]


def test_inner_split_is_a_stratified_part_of_the_training_rows():
    rng = np.random.default_rng(0)
    ages = rng.uniform(0, 228, 300)
    train_idx = np.sort(rng.choice(300, 200, replace=False))
    fit, select = cv.inner_split(ages, train_idx, 0.15, seed=3)
    assert not set(fit) & set(select) and set(fit) | set(select) == set(train_idx)  # nothing from outside
    assert 0.12 <= len(select) / len(train_idx) <= 0.18
    # stratified: the selection split's ages cover the range like the training rows'
    assert abs(np.median(ages[select]) - np.median(ages[train_idx])) < 20
    assert ages[select].min() < 20 and ages[select].max() > 200
    again = cv.inner_split(ages, train_idx, 0.15, seed=3)
    np.testing.assert_array_equal(again[1], select)
    assert not np.array_equal(cv.inner_split(ages, train_idx, 0.15, seed=4)[1], select)
    fit0, select0 = cv.inner_split(ages, train_idx, 0.0, seed=3)  # a fixed schedule: no selection split
    np.testing.assert_array_equal(fit0, train_idx) and len(select0) == 0
    with pytest.raises(UserError, match="inner_val_fraction"):
        cv.inner_split(ages, train_idx, 0.7, seed=3)


def test_folds_table():
    folds = cv.folds_table(_table(), 3, seed=0)
    assert list(folds.columns) == ["id", "male", "boneage", "fold"]
    assert len(folds) == 114 and folds.id.is_monotonic_increasing and folds.male.dtype == bool


def test_trial_names_and_selection():
    trials = cv.cv_trials(["A-reg", "B-cls"], ["F", "M"], 3)
    assert len(trials) == 12 and len({t.name for t in trials}) == 12
    assert trials[0].name == "A-reg-F-fold0" and trials[-1].name == "B-cls-M-fold2"
    for t in trials:
        assert cv.parse_trial(t.name) == t
    assert cv.parse_trial("C-cls-M-fold4") == cv.Trial("C-cls", "M", 4) and cv.parse_trial("C-cls-M-fold4").male
    for bad in ("A-reg-X-fold0", "Z-reg-F-fold0", "A-reg-F-0", "A-reg-F-fold"):
        with pytest.raises(ValueError):
            cv.parse_trial(bad)
    with pytest.raises(UserError, match="unknown model kind"):
        cv.cv_trials(["A-xyz"], ["F"], 2)
    pending = cv.pending_trials(trials, {"A-reg-F-fold0", "B-cls-M-fold2", "not-a-trial"})
    assert len(pending) == 10 and trials[0] not in pending
    assert len(cv.cv_trials(CVConfig().kinds, CVConfig().sexes, 5)) == 60  # 12 model kinds x 5 folds


def test_sex_classifier_trials():
    trials = cv.sex_trials("A-sex", 3)
    assert [t.name for t in trials] == ["A-sex-all-fold0", "A-sex-all-fold1", "A-sex-all-fold2"]
    assert all(cv.parse_trial(t.name) == t and t.male is None and t.is_sex_classifier for t in trials)
    assert cv.sex_trials(None, 3) == [] and not cv.parse_trial("A-reg-F-fold0").is_sex_classifier
    with pytest.raises(ValueError):  # a sex classifier pools both sexes
        cv.parse_trial("A-sex-F-fold0")
    with pytest.raises(UserError, match="unknown sex classifier"):
        cv.sex_trials("A-reg", 3)
    assert not any(t.has_sex_input for t in trials)  # it is not told the sex it predicts


def test_pooled_trials_train_one_model_per_kind_and_fold_on_both_sexes():
    trials = cv.cv_trials(["A-reg", "B-cls"], ["F", "M"], 3, "pooled")
    assert [t.name for t in trials] == [f"{k}-all-fold{f}" for k in ("A-reg", "B-cls") for f in range(3)]
    assert all(cv.parse_trial(t.name) == t and t.male is None and t.has_sex_input and not t.is_sex_classifier
               for t in trials)
    assert cv.cv_trials(["A-reg"], [], 3, "pooled") == []  # no labelled sex: nothing to train
    assert not cv.parse_trial("A-reg-F-fold0").has_sex_input
    with pytest.raises(UserError, match="sex_models"):
        cv.cv_trials(["A-reg"], ["F", "M"], 3, "both")


def test_refit_trials_train_on_every_cv_image_and_ship_instead_of_the_fold_models():
    refits = cv.refit_trials(["A-reg", "B-cls"], ["F", "M"])
    assert [t.name for t in refits] == ["A-reg-F-refit", "A-reg-M-refit", "B-cls-F-refit", "B-cls-M-refit"]
    assert all(cv.parse_trial(t.name) == t and t.is_refit and t.fold == cv.REFIT for t in refits)
    assert [t.name for t in cv.refit_trials(["A-reg"], ["F", "M"], "pooled")] == ["A-reg-all-refit"]
    assert not cv.parse_trial("A-reg-F-fold0").is_refit
    with pytest.raises(ValueError):  # the sex classifier ships its fold models: its thresholds are theirs
        cv.parse_trial("A-sex-all-refit")
    folds_cfg = CVConfig(kinds=("A-reg", "B-cls"), k=3, sex_models="pooled", sex_kind="B-sex")
    refit_cfg = folds_cfg.model_copy(update={"ship": "refit"})
    sexes = ["F", "M"]
    folds = cv.cv_trials(folds_cfg.kinds, sexes, 3, "pooled")
    assert cv.all_trials(folds_cfg, sexes) == folds + cv.sex_trials("B-sex", 3)
    assert cv.all_trials(refit_cfg, sexes) == folds + cv.sex_trials("B-sex", 3) + cv.refit_trials(
        refit_cfg.kinds, sexes, "pooled")
    assert cv.shipped_trials(folds_cfg, sexes) == folds + cv.sex_trials("B-sex", 3)
    assert cv.shipped_trials(refit_cfg, sexes) == cv.refit_trials(refit_cfg.kinds, sexes, "pooled") + cv.sex_trials(
        "B-sex", 3)


def test_a_pooled_trials_part_fills_both_sexes_of_its_fold_in_the_oof_table():
    folds = cv.folds_table(_table(), 3, seed=0)
    parts = []
    for fold in range(3):
        mine = folds[folds.fold == fold]
        trial = cv.Trial("A-reg", cv.POOLED, fold)
        table = cv.part_table(trial, mine.id, mine.boneage, mine.boneage + 1.0, {})
        parts.append((table.to_pandas(), cv.part_record(table)))
    oof = cv.oof_table(folds, parts, ["A-reg"])
    assert len(oof) == len(folds) and oof["A-reg"].notna().all()  # one prediction per image, both sexes
    np.testing.assert_allclose(oof["A-reg"] - oof["boneage"], 1.0)
    wrong = folds[folds.fold == 1]
    table = cv.part_table(cv.Trial("A-reg", cv.POOLED, 0), wrong.id, wrong.boneage, wrong.boneage, {})
    with pytest.raises(ValueError, match="outside its fold"):
        cv.oof_table(folds, [(table.to_pandas(), cv.part_record(table))], ["A-reg"])


def test_p_male_joins_the_oof_table_by_fold():
    folds = cv.folds_table(_table(), 3, seed=0)
    parts = []
    for t in cv.sex_trials("A-sex", 3):
        mine = folds[folds.fold == t.fold]
        part = cv.part_table(t, mine.id, mine.boneage, mine.male.astype(float) * 0.5 + 0.25, {})
        parts.append((part.to_pandas(), cv.part_record(part)))
    oof = cv.with_p_male(cv.oof_table(folds, parts, ["A-reg"]), parts[:2], "A-sex")
    assert oof["A-reg"].isna().all()  # the sex classifier's parts are no bone age predictions
    done = oof.fold < 2
    np.testing.assert_allclose(oof.p_male[done], np.where(oof.male[done], 0.75, 0.25))
    assert oof.p_male[~done].isna().all()  # fold 2's trial has not finished
    record = cv.sex_record(oof.p_male[done], oof.male[done])
    assert record["oof_auc"] == 1.0 and record["oof_accuracy"] == 1.0
    assert record["oof_bce"] == pytest.approx(-np.log(0.75))
    with pytest.raises(ValueError, match="outside its fold") as info:
        cv.with_p_male(oof, [(parts[0][0], {**parts[0][1], "trial": "A-sex-all-fold1"})], "A-sex")
    assert not isinstance(info.value, UserError)  # a bug, not a setting: the CLI keeps its traceback


def test_train_config_per_trial():
    cfg = CVConfig(epochs=7, width_mult=0.5, fc=64, patience=3, schedule="cosine")
    a = cv.train_config(cfg, cv.Trial("A-reg", "F", 0), seed=0)
    assert (a.epochs, a.width_mult, a.fc, a.patience, a.schedule) == (7, 0.5, 64, 3, "cosine")
    b = cv.train_config(cfg, cv.Trial("A-reg", "F", 1), seed=0)
    assert a.seed != b.seed and a.seed == cv.train_config(cfg, cv.Trial("A-reg", "F", 0), seed=0).seed
    # The sex classifier's own epochs, where set; the bone age kinds keep cv.epochs.
    sex = cv.Trial("B-sex", cv.POOLED, 0)
    assert cv.train_config(cfg, sex, seed=0).epochs == 7
    longer = cfg.model_copy(update={"sex_epochs": 11})
    assert cv.train_config(longer, sex, seed=0).epochs == 11
    assert cv.train_config(longer, cv.Trial("A-reg", "F", 0), seed=0).epochs == 7


def test_load_bank_and_trial_rows(tmp_path):
    images = [np.full((STORE_H, STORE_W), v, np.uint8) for v in (10, 20, 30)]
    images[1][5, 7] = 255
    png = [prepare.encode_png(image) for image in images]
    registered = pd.DataFrame({
        "id": ["b", "a", "c", "d", "e"], "male": [True, True, False, True, False],
        "boneage": [20.0, 10.0, 30.0, 5.0, 40.0], "status": ["ok", "ok", "ok", "error", "ok"],
        "registered_png": [png[1], png[0], png[2], None, png[2]],
    })
    (tmp_path / "reg").mkdir()
    registered.to_parquet(tmp_path / "reg" / "part-0.parquet")
    folds = cv.folds_table(registered, 2, seed=0)
    assert list(folds.id) == ["a", "b", "c", "e"]
    rows = cv.read_trial_rows(str(tmp_path / "reg"), folds, male=True)
    assert list(rows.id) == ["a", "b"]  # boys only, sorted by id, error rows never
    bank, ages, male = cv.load_bank(rows)
    assert bank.shape == (2, 1, STORE_H, STORE_W) and bank.dtype == torch.uint8
    assert bank[0].float().mean() == 10 and bank[1, 0, 5, 7] == 255
    np.testing.assert_array_equal(ages, [10.0, 20.0]) and male.all()
    with pytest.raises(UserError, match="no registered image"):
        cv.read_trial_rows(str(tmp_path / "reg"), pd.concat([folds, folds.iloc[:1].assign(id="zz")]), male=True)


def _parts(folds):
    """Parts of kind A-reg (every sex and fold) predicting age + 1."""
    parts = []
    for t in cv.cv_trials(["A-reg"], ["F", "M"], int(folds.fold.max()) + 1):
        sel = folds[(folds.fold == t.fold) & (folds.male == t.male)]
        part = cv.part_table(t, sel.id, sel.boneage, sel.boneage + 1, {"oof_mae": 1.0, "seconds": 2.0})
        parts.append((part.to_pandas(), cv.part_record(part)))
    return parts


def test_oof_table_has_one_row_per_image_and_a_column_per_kind(tmp_path):
    folds = cv.folds_table(_table(), 3, seed=0)
    parts = _parts(folds)
    uri = str(tmp_path / "parts" / "x.parquet")
    cv.write_part(uri, cv.part_table(cv.Trial("A-reg", "F", 0), ["f1"], [3.0], [4.0], {"seconds": 1.0}))
    pred, record = cv.read_part(uri)
    assert list(pred.id) == ["f1"] and record["trial"] == "A-reg-F-fold0" and record["seconds"] == 1.0

    oof = cv.oof_table(folds, parts, ["A-reg", "B-cls"])
    assert list(oof.columns) == ["id", "male", "boneage", "fold", "A-reg", "B-cls"]
    assert len(oof) == len(folds) and oof.id.is_unique
    np.testing.assert_allclose(oof["A-reg"], oof.boneage + 1)
    assert oof["B-cls"].isna().all()  # no trial of that kind has finished
    records = cv.trials_table(parts)
    assert len(records) == 6 and list(records.trial)[:2] == ["A-reg-F-fold0", "A-reg-F-fold1"]

    # a part must only predict its own fold and sex
    t = cv.Trial("A-reg", "F", 0)
    wrong = folds[(folds.fold == 1) & ~folds.male].iloc[:2]
    bad = cv.part_table(t, wrong.id, wrong.boneage, wrong.boneage, {})
    with pytest.raises(ValueError, match="outside its fold") as info:
        cv.oof_table(folds, [(bad.to_pandas(), cv.part_record(bad))], ["A-reg"])
    assert not isinstance(info.value, UserError)


def test_summary_and_median_baseline():
    oof = pd.DataFrame({"id": list("abcdef"), "male": [False] * 3 + [True] * 3,
                        "boneage": [10.0, 20.0, 30.0, 100.0, 110.0, 130.0], "fold": [0, 1, 1, 0, 1, 1],
                        "A-reg": [12.0, 20.0, 30.0, 100.0, 110.0, np.nan]})
    # each image gets the median of its sex's other folds: a (fold 0) -> median(20, 30) = 25, ...
    np.testing.assert_allclose(cv.median_baseline(oof), [25, 10, 10, 120, 100, 100])
    s = cv.summary(oof, ["A-reg"]).set_index("model")
    assert s.loc["A-reg", "mae_F"] == pytest.approx(2 / 3) and s.loc["A-reg", "mae_M"] == 0
    assert s.loc["A-reg", "n_M"] == 2 and s.loc["A-reg", "n_all"] == 5
    assert s.loc["per-sex median", "mae_F"] == pytest.approx((15 + 10 + 20) / 3)


def test_cv_config_from_yaml(tmp_path):
    from pathlib import Path

    rsna = load_config(Path(__file__).resolve().parents[1] / "configs" / "rsna.yaml")
    assert (rsna.cv.k, rsna.cv.input_scale, rsna.cv.width_mult, rsna.cv.fc, rsna.cv.epochs) == (5, 1.0, 1.0, 2048, 50)
    assert rsna.cv.gpus_per_trial > 0 and rsna.cv.compile and len(rsna.cv.kinds) == 6
    (tmp_path / "x.yaml").write_text("cv:\n  k: 4\n  kinds: [A-reg]\n")
    config = load_config(tmp_path / "x.yaml")
    assert config.cv.k == 4 and config.cv.kinds == ("A-reg",)


def test_embedded_yaml_writes_out_the_defaults():
    """configs/embedded.yaml says it is the embedded default written out: it must not drift."""
    from pathlib import Path

    import yaml

    from boneage.config import Config

    text = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "embedded.yaml").read_text())
    defaults = Config()
    for section, values in text.items():
        if not isinstance(values, dict):
            continue
        fields = getattr(defaults, section).model_dump()
        for key, value in values.items():
            expected = fields[key]
            assert (list(expected) if isinstance(expected, tuple) else expected) == value, (section, key)


def test_cv_flags_override_the_config(tmp_path):
    from boneage.cli import build_parser, config_from_args, main

    args = build_parser().parse_args(["cv", "--folds", "5", "--kinds", "A-reg,B-cls", "--cv-epochs", "3",
                                      "--gpus-per-trial", "0.25", "--output", str(tmp_path)])
    config = config_from_args(args)
    assert (config.cv.k, config.cv.kinds, config.cv.epochs, config.cv.gpus_per_trial) == \
        (5, ("A-reg", "B-cls"), 3, 0.25)
    assert config.cv.cpus_per_trial == CVConfig().cpus_per_trial  # unset flags keep the config's value
    assert main(["cv", "--output", str(tmp_path / "empty")]) == 2  # no registered table: a message, not Ray


# -- patient groups -------------------------------------------------------------------------------


def test_folds_without_groups_are_the_per_image_folds_of_before():
    """Runs made before patient groups keep their folds: a table without a group column (or with
    empty groups) gets exactly the folds the per-image assignment gave (frozen here)."""
    table = _table(n_f=13, n_m=11, seed=3)
    before = [0, 2, 2, 2, 2, 1, 2, 1, 1, 1, 0, 0, 0, 1, 2, 0, 2, 0, 1, 0, 1, 2, 0, 2, -1, -1, -1]
    assert cv.assign_folds(table, 3, seed=7).tolist() == before
    assert cv.assign_folds(table.assign(group=None), 3, seed=7).tolist() == before
    assert not cv.grouped(table) and not cv.grouped(table.assign(group=None))
    assert "group" not in cv.folds_table(table, 3, seed=7)


def _repeat_radiographs(seed=0, patients=40) -> pd.DataFrame:
    """Patients with 1-4 radiographs each (follow-ups a year apart: ages rise), both sexes, ids shuffled
    so that a patient's images are not neighbours, and a few images without a patient."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(patients):
        male, first = bool(p % 2), float(rng.uniform(12, 180))
        for visit in range(int(rng.integers(1, 5))):
            rows.append({"id": f"img{rng.integers(1_000_000):07d}", "male": male, "boneage": first + 12 * visit,
                         "status": "ok", "group": f"g{p:03d}"})
    rows += [{"id": f"solo{i}", "male": bool(i % 2), "boneage": float(rng.uniform(1, 228)), "status": "ok",
              "group": None} for i in range(6)]
    return pd.DataFrame(rows).sample(frac=1, random_state=seed).reset_index(drop=True)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_no_patient_crosses_a_fold(k):
    table = _repeat_radiographs()
    folds = cv.assign_folds(table, k, seed=1)
    assert (folds >= 0).all() and cv.grouped(table)
    per_patient = pd.Series(folds).groupby(table["group"].to_numpy()).nunique()
    assert (per_patient == 1).all(), per_patient[per_patient > 1]
    for male in (False, True):  # each sex's patients (not images) are dealt evenly
        mine = table["male"].to_numpy() == male
        patients = pd.Series(cv.group_keys(table)[mine]).groupby(folds[mine]).nunique()
        assert len(patients) == k and patients.max() - patients.min() <= 1
    assert set(cv.folds_table(table, k, seed=1)["group"].dropna()) == set(table["group"].dropna())


def test_no_patient_crosses_the_test_split_or_the_selection_split():
    from boneage.run.holdout import pick_test_rows

    table = _repeat_radiographs(seed=2, patients=60)
    test = pick_test_rows(table, 0.2, seed=3)
    keys = table["group"].fillna(table["id"]).to_numpy()  # the patient, or the image where none
    assert 0 < len(test) < len(table)
    assert not set(keys[test]) & set(np.delete(keys, test))
    train = np.setdiff1d(np.arange(len(table)), test)
    fit, select = cv.grouped_inner_split(table, train, 0.25, seed=4)
    assert len(select) and not set(keys[fit]) & set(keys[select])
    assert sorted(np.concatenate([fit, select])) == train.tolist()


def test_the_test_split_without_groups_is_the_per_image_split_of_before():
    from boneage.run.holdout import pick_test_rows

    table = _table(seed=5)
    table = table[cv.labelled(table)].reset_index(drop=True)
    before = np.sort(np.concatenate([cv.inner_split(table["boneage"].to_numpy(float),
                                                    np.flatnonzero(table["male"].to_numpy(bool) == male), 0.1, 6)[1]
                                     for male in (False, True)]))
    assert pick_test_rows(table, 0.1, seed=6).tolist() == before.tolist()
    assert pick_test_rows(table.assign(group=None), 0.1, seed=6).tolist() == before.tolist()


def test_a_patient_with_both_sexes_or_too_few_patients_is_an_error():
    table = _repeat_radiographs()
    one = table.index[table["group"] == "g000"][0]
    table.loc[one, "male"] = not table.loc[one, "male"]
    with pytest.raises(UserError, match="both sexes"):
        cv.assign_folds(table, 3, seed=0)
    few = pd.DataFrame({"id": [f"i{j}" for j in range(8)], "male": False, "boneage": np.arange(8) * 10.0,
                        "status": "ok", "group": ["a", "a", "a", "a", "b", "b", "b", "b"]})
    with pytest.raises(UserError, match="2 labelled F patients cannot fill 3 folds"):
        cv.assign_folds(few, 3, seed=0)


def test_the_summary_and_the_report_say_whether_folds_are_by_patient():
    from boneage.report.sections import grouping_note

    by_patient = cv.grouping_record(cv.folds_table(_repeat_radiographs(), 3, seed=0))
    assert by_patient["by_patient"] and by_patient["patients"] == 46 and by_patient["images"] > 46
    per_image = cv.grouping_record(cv.folds_table(_table(), 3, seed=0))
    assert per_image == {"by_patient": False, "images": 114, "patients": 114}
    assert "by patient (46 patients" in grouping_note(by_patient)
    assert "one image per child assumed" in grouping_note(per_image) and grouping_note(None) == ""


def test_pooled_models_need_both_sexes_and_test_time_views_come_in_pairs():
    from pydantic import ValidationError

    assert CVConfig().sex_models == "per_sex" and CVConfig().tta_views == 1  # the defaults: as before
    assert CVConfig(sex_models="pooled", tta_views=5).tta_views == 5
    with pytest.raises(ValidationError, match="sexes must be"):
        CVConfig(sex_models="pooled", sexes=["F"])
    with pytest.raises(ValidationError, match="odd"):
        CVConfig(tta_views=4)
    with pytest.raises(ValidationError):
        CVConfig(tta_views=11)
    # the sex classifier's own views: the zone models' unless set, odd as theirs
    assert CVConfig(tta_views=3).sex_views == 3 and CVConfig(tta_views=3, sex_tta_views=5).sex_views == 5
    assert CVConfig(input_scale=0.25).input_scale_of("A-sex") == 0.25
    assert CVConfig(input_scale=0.33, sex_kind="B-sex", sex_input_scale=0.25).input_scale_of("B-sex") == 0.25
    assert CVConfig(input_scale=0.33, sex_kind="B-sex", sex_input_scale=0.25).input_scale_of("B-cls") == 0.33
    with pytest.raises(ValidationError, match="sex_tta_views must be odd"):
        CVConfig(sex_tta_views=2)
