"""k-fold CV through Ray Tune + Ray Train on a real local Ray: 30 small synthetic radiographs, 2 folds,
2 model kinds, the girls only (4 trials; both sexes and the sex classifier run in test_workflows), 2 epochs of a tiny net (this
checks the wiring, the tables and resuming, not accuracy; accuracy: workflows/full_cv.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from boneage.validation import cv
from boneage import run
from boneage.data import synth
from boneage.config import load_config
from boneage.model.train import model_from_state

pytestmark = pytest.mark.slow

KINDS = ["A-reg", "B-cls"]


@pytest.fixture(scope="module")
def registered_30(tmp_path_factory, ray_local):
    """30 synthetic radiographs, registered with geometric key points (no key point CNN: faster)."""
    folder = tmp_path_factory.mktemp("cv30")
    data = synth.write_dataset(30, folder / "synthetic", seed=5, size=(384, 288), progress=False)
    config = load_config(overrides={
        "data": {"images": str(data["images"]), "labels": str(data["labels"])},
        "keypoints": {"source": "geometric"},
        "output": str(folder / "run"),
    })
    run.preprocess(config)
    return config.output


def _cv_config(output: str):
    return load_config(overrides={
        "cv": {"k": 2, "kinds": KINDS, "sexes": ["F"], "sex_kind": None, "input_scale": 0.125, "width_mult": 0.0625, "fc": 32,
               "epochs": 3, "batch_size": 4, "patience": 0,
               # a selection split (the embedded default is a fixed schedule): ~1 girl in 4 of the
               # training folds chooses the epoch
               "inner_val_fraction": 0.25,
               # 4 trials at once on the 2 CPUs of ray_local: these trials are mostly Ray start-up
               "cpus_per_trial": 0.5},
        "output": output,
    })


def test_cv_end_to_end_then_resume(registered_30, tmp_path):
    import shutil

    output = str(tmp_path / "run")
    shutil.copytree(f"{registered_30}/registered", f"{output}/registered")
    config = _cv_config(output)
    summary = run.cross_validate(config)

    oof = pd.read_parquet(f"{output}/cv/oof.parquet")
    registered = pd.read_parquet(f"{output}/registered", columns=["id", "status", "boneage"])
    n_cv = int(((registered.status == "ok") & registered.boneage.notna()).sum())
    assert len(oof) == n_cv and oof.id.is_unique  # one row per labelled ok image
    assert set(oof.fold) == {0, 1} and 0 < (~oof.male).sum() < n_cv
    girls = ~oof.male
    for kind in KINDS:  # one out-of-fold prediction per girl per kind, in the model's range
        assert oof.loc[girls, kind].notna().all() and oof.loc[girls, kind].between(0, 240).all()
        assert oof.loc[~girls, kind].isna().all()  # no trials for the boys here: no prediction
    trials = pd.read_parquet(f"{output}/cv/trials.parquet")
    assert len(trials) == 2 * 1 * 2 == summary["trials"]
    assert set(trials.trial) == {t.name for t in cv.cv_trials(KINDS, "F", 2)}
    assert (trials.epochs_run == 3).all() and trials.best_epoch.between(0, 2).all()
    assert trials.local_train.all()  # CPU trials train inside the Tune trial (Ray Train's local mode)
    # Every girl is in exactly one of a trial's three sets: fit, selection split, scored fold.
    assert (trials.n_train + trials.n_select + trials.n_val).eq(int(girls.sum())).all()
    assert (trials.n_select > 0).all() and trials.select_mae.notna().all()
    for row in trials.itertuples():  # oof_mae: the chosen model's MAE on the scored fold
        sel = (oof.fold == row.fold) & (oof.male == (row.sex == "M"))
        assert row.n_val == sel.sum()
        assert np.isclose(np.abs(oof.loc[sel, row.kind] - oof.loc[sel, "boneage"]).mean(), row.oof_mae, atol=1e-3)

    # the models: compact state that scores like the trial did
    state = torch.load(f"{output}/cv/models/A-reg-F-fold0.pt", weights_only=False)
    assert state["trial"] == "A-reg-F-fold0" and state["spec"]["kind"] == "A-reg"
    assert isinstance(model_from_state(state), torch.nn.Module)
    # Ray Tune kept its records under OUTPUT/cv; local-mode Train runs keep no checkpoints (the fault
    # tests cover the Train-worker path, which does)
    assert (tmp_path / "run" / "cv" / "tune").is_dir()
    assert not list((tmp_path / "run" / "cv").glob("train/*/checkpoint_*"))

    # Resume: one part gone → only that trial trains again; the others are untouched.
    parts = tmp_path / "run" / "cv" / "parts"
    mtimes = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    gone = "B-cls-F-fold1.parquet"
    (parts / gone).unlink()
    run.cross_validate(config)
    after = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    assert set(after) == set(mtimes)
    changed = {name for name in after if after[name] != mtimes.get(name)}
    assert changed == {gone}
    trials2 = pd.read_parquet(f"{output}/cv/trials.parquet")
    kept = trials2.trial != gone[: -len(".parquet")]
    pd.testing.assert_frame_equal(trials2[kept].reset_index(drop=True), trials[trials.trial != "B-cls-F-fold1"]
                                  .reset_index(drop=True))
    assert trials2.loc[~kept, "finished_at"].item() > trials.finished_at.max()
    oof2 = pd.read_parquet(f"{output}/cv/oof.parquet")
    pd.testing.assert_frame_equal(oof2.drop(columns="B-cls"), oof.drop(columns="B-cls"))
    assert oof2.loc[girls, "B-cls"].notna().all()

    # A third run with every part present trains nothing.
    run.cross_validate(config)
    assert {p.name: p.stat().st_mtime_ns for p in parts.iterdir()} == after


def test_the_scored_folds_labels_choose_nothing(registered_30, tmp_path):
    """Corrupt the labels of fold 0 in the folds table: the trials that score fold 0 choose the same
    epoch and predict exactly the same (its labels never reach them); the trials that train on fold 0
    do change (so the corruption did reach the CV)."""
    import shutil

    runs = {}
    for name, corrupt in (("clean", False), ("corrupt", True)):
        output = str(tmp_path / name)
        shutil.copytree(f"{registered_30}/registered", f"{output}/registered")
        config = _cv_config(output)
        table = pd.read_parquet(f"{output}/registered", columns=["id", "status", "boneage", "male"])
        folds = cv.folds_table(table, config.cv.k, config.data.seed)
        if corrupt:
            scored = folds.fold == 0
            folds.loc[scored, "boneage"] = np.random.default_rng(1).uniform(0, 228, int(scored.sum()))
        (tmp_path / name / "cv").mkdir(parents=True)
        folds.to_parquet(tmp_path / name / "cv" / "folds.parquet", index=False)
        run.cross_validate(config)
        runs[name] = pd.read_parquet(f"{output}/cv/trials.parquet").set_index("trial")
    for trial in runs["clean"].index:
        clean = pd.read_parquet(tmp_path / "clean" / "cv" / "parts" / f"{trial}.parquet")
        corrupt = pd.read_parquet(tmp_path / "corrupt" / "cv" / "parts" / f"{trial}.parquet")
        if trial.endswith("fold0"):
            assert runs["clean"].loc[trial, "best_epoch"] == runs["corrupt"].loc[trial, "best_epoch"]
            np.testing.assert_array_equal(clean["pred"], corrupt["pred"])
        else:
            assert not np.allclose(clean["pred"], corrupt["pred"])


def test_an_error_every_trial_would_meet_stops_the_cv_with_one_message(registered_30, tmp_path):
    import shutil

    from boneage.distributed.ray_cv import CVFailed

    output = str(tmp_path / "run")
    shutil.copytree(f"{registered_30}/registered", f"{output}/registered")
    config = _cv_config(output)
    config.cv.input_scale = 0.001  # a zone crop of a pixel or two: building the net fails in every trial
    with pytest.raises(CVFailed) as caught:
        run.cross_validate(config)
    message = str(caught.value)
    assert message.startswith("CV stopped at the first failed trial") and "fix:" in message
    assert "Traceback" not in message and len(message.splitlines()) == 4
    assert not list((tmp_path / "run" / "cv").glob("parts/*.parquet"))


def test_train_device_is_the_cpu_where_torch_has_no_cuda(ray_local):
    from boneage.distributed import ray_env

    @ray_local.remote(num_cpus=0)
    def device_in_a_worker():
        return str(ray_env.train_device()), ray_env.torch_config().backend, str(ray_env.actor_device(False, "score"))

    assert ray_local.get(device_in_a_worker.remote()) == ("cpu", "gloo", "cpu")


def test_a_worker_group_that_did_not_shut_down_leaves_no_placement_group(ray_local):
    """The workaround for Ray Train V2's leak (ray_env.ReleaseOrphanedPlacementGroups), on real
    placement groups: a controller's group left behind is removed when its next worker group starts
    and when the controller ends; another creator's group is left alone."""
    import asyncio

    from ray.util.placement_group import placement_group, placement_group_table

    from boneage.distributed import ray_env

    @ray_local.remote(num_cpus=0)
    class Controller:  # in Train, the controller actor creates its worker groups' placement groups
        def __init__(self):
            self.callback = ray_env.ReleaseOrphanedPlacementGroups()

        def start_worker_group(self):
            group = placement_group([{"CPU": 0.01}])
            ray_local.get(group.ready(), timeout=60)
            return group

        def before_worker_group_start(self):
            self.callback.before_worker_group_start(None)

        def shutdown(self):
            asyncio.run(self.callback.before_controller_shutdown())

    def state(group):
        return placement_group_table(group)["state"]

    controller = Controller.remote()
    left_behind = ray_local.get(controller.start_worker_group.remote())
    someone_elses = placement_group([{"CPU": 0.01}])
    ray_local.get(someone_elses.ready(), timeout=60)
    ray_local.get(controller.before_worker_group_start.remote())
    assert (state(left_behind), state(someone_elses)) == ("REMOVED", "CREATED")

    last = ray_local.get(controller.start_worker_group.remote())
    ray_local.get(controller.shutdown.remote())
    assert (state(last), state(someone_elses)) == ("REMOVED", "CREATED")
    ray_local.util.remove_placement_group(someone_elses)


def _pooled_run(registered_30: str, tmp_path, **cv_settings):
    """(output, config) of a run folder holding registered_30's registered images and QA: pooled models
    on both sexes, k = 2, KINDS, no sex classifier, 2 epochs of a tiny net, plus `cv_settings`."""
    import shutil
    from pathlib import Path

    output = str(tmp_path / "run")
    for stage in ("registered", "qa"):
        shutil.copytree(f"{registered_30}/{stage}", f"{output}/{stage}")
    data = Path(registered_30).parent / "synthetic"
    return output, load_config(overrides={
        "data": {"images": str(data / "images"), "labels": str(data / "labels.csv")},
        "keypoints": {"source": "geometric"},
        "cv": {"k": 2, "kinds": KINDS, "sexes": ["F", "M"], "sex_kind": None, "sex_models": "pooled",
               "input_scale": 0.125, "width_mult": 0.0625, "fc": 32, "epochs": 2, "batch_size": 4,
               "cpus_per_trial": 0.5, **cv_settings},
        "output": output,
    })


def test_pooled_cv_with_test_time_augmentation_fills_the_same_table_and_ships_a_bundle_that_scores(
        registered_30, tmp_path):
    """cv.sex_models "pooled" and cv.tta_views 3 on both sexes: one trial per (kind, fold), an OOF table of
    the per-sex shape (every image, both sexes, one prediction per kind), and a bundle whose fold model of
    an image's fold, scored under its sex with the same views, gives back its out-of-fold prediction.
    The sex classifier has views and an input size of its own (cv.sex_tta_views 5, cv.sex_input_scale 0.1),
    out of fold and at scoring."""
    from boneage import score
    from boneage.bundle import load_bundle
    from boneage.model.networks import model_kind
    from boneage.model.train import predict_p_male

    output, config = _pooled_run(registered_30, tmp_path, tta_views=3, sex_kind="A-sex", sex_tta_views=5,
                                 sex_input_scale=0.1)
    run.cross_validate(config)
    oof = pd.read_parquet(f"{output}/cv/oof.parquet")
    registered = pd.read_parquet(f"{output}/registered")
    n_cv = int(((registered.status == "ok") & registered.boneage.notna()).sum())
    assert list(oof.columns) == ["id", "male", "boneage", "fold", *KINDS, "p_male"] and len(oof) == n_cv
    assert oof.male.nunique() == 2 and oof[KINDS].notna().all().all() and oof[KINDS].stack().between(0, 240).all()
    trials = pd.read_parquet(f"{output}/cv/trials.parquet")
    sex_trials = ["A-sex-all-fold0", "A-sex-all-fold1"]
    assert sorted(trials.trial) == sorted([t.name for t in cv.cv_trials(KINDS, ["F", "M"], 2, "pooled")] + sex_trials)
    assert (trials.n_train + trials.n_val).eq(n_cv).all()  # each trained on both sexes' training folds
    state = torch.load(f"{output}/cv/models/A-reg-all-fold0.pt", weights_only=False)
    assert state["spec"]["sex_input"] is True and state["sex"] == cv.POOLED and state["spec"]["input_scale"] == 0.125
    assert torch.load(f"{output}/cv/models/A-sex-all-fold0.pt", weights_only=False)["spec"]["input_scale"] == 0.1

    run.fit_ensembles(config)
    run.write_bundle(config)
    bundle = load_bundle(f"{output}/bundle")
    assert bundle.manifest["sex_models"] == "pooled" and bundle.manifest["tta_views"] == 3
    assert bundle.manifest["sex_tta_views"] == 5 and bundle.manifest["sex_input_scale"] == 0.1
    assert bundle.manifest["sexes"] == ["F", "M"] and {s for _, s in bundle.models} == {cv.POOLED}
    assert all(m["sex_input"] and m["sex"] == cv.POOLED for m in bundle.manifest["models"] if m["kind"] != "A-sex")
    models = score.BundleModels(bundle)
    assert models.tta_views == 3 and models.sex_tta_views == 5
    rows = registered[registered.id.isin(oof.id)].sort_values("id").reset_index(drop=True)
    bank = cv.decode_bank(rows.registered_png.tolist())
    truth = oof.set_index("id").loc[rows.id]
    # P(male) out of fold is each fold's sex classifier over its own 5 views, not the zone models' 3
    sex_kind, fold = model_kind("A-sex", 0.1), truth.fold.to_numpy()
    for f, (model, _) in enumerate(models.models[("A-sex", cv.POOLED)]):
        mine = np.flatnonzero(fold == f)
        five, three = (predict_p_male(model, bank, mine, sex_kind, views=v).numpy() for v in (5, 3))
        # (a 2-epoch classifier says ~0.5 to every image: its views differ by ~1e-5, so compare the gaps)
        off_by = np.abs(five - truth.p_male.to_numpy()[mine]).max()
        assert off_by < 1e-4 and off_by < np.abs(three - five).max() / 10
    np.testing.assert_allclose(models.p_male(bank), np.mean(
        [predict_p_male(m, bank, np.arange(len(bank)), sex_kind, views=5).numpy()
         for m, _ in models.models[("A-sex", cv.POOLED)]], axis=0), atol=1e-6)
    for sex, male in (("F", False), ("M", True)):
        mine = np.flatnonzero(truth.male.to_numpy() == male)
        for kind in KINDS:
            folds = models.kind_predictions(bank, sex, kind, mine)  # (n, k): fold f's model in column f
            own = folds[np.arange(len(mine)), truth.fold.to_numpy()[mine]]
            np.testing.assert_allclose(own, truth[kind].to_numpy()[mine], atol=1e-3)
    # The sex input matters: the same images under the other sex score differently.
    assert not np.allclose(models.kind_predictions(bank, "F", "A-reg"), models.kind_predictions(bank, "M", "A-reg"))
    rows["male"] = rows["male"].astype(object)
    rows.loc[:3, "male"] = None  # unknown sex: scored under both sex inputs
    table = score.score_rows(rows, models)
    assert table.boneage_months.notna().all() and table.boneage_months.between(0, 240).all()
    unknown = table.sex_unknown.to_numpy()
    assert unknown[:4].all() and not unknown[4:].any()
    assert table.loc[unknown, ["boneage_if_female_months", "boneage_if_male_months"]].notna().all().all()


def test_refit_trains_one_model_per_kind_on_every_cv_image_and_the_bundle_scores_with_it(registered_30, tmp_path):
    """cv.ship "refit": the fold models fill the out-of-fold table as before, one more trial per kind
    trains on every CV image, and the bundle holds those refits (one model per kind) and scores with them."""
    from boneage import score
    from boneage.bundle import load_bundle
    from boneage.model.networks import model_kind
    from boneage.model.train import predict

    output, config = _pooled_run(registered_30, tmp_path, ship="refit")
    run.cross_validate(config)
    oof = pd.read_parquet(f"{output}/cv/oof.parquet")
    assert list(oof.columns) == ["id", "male", "boneage", "fold", *KINDS] and oof[KINDS].notna().all().all()
    trials = pd.read_parquet(f"{output}/cv/trials.parquet").set_index("trial")
    folds = [t.name for t in cv.cv_trials(KINDS, ["F", "M"], 2, "pooled")]
    refits = [f"{kind}-all-refit" for kind in KINDS]
    assert sorted(trials.index) == sorted(folds + refits)
    assert (trials.loc[refits, "n_train"] == len(oof)).all() and (trials.loc[refits, "n_val"] == 0).all()
    assert trials.loc[refits, "oof_mae"].isna().all() and trials.loc[folds, "oof_mae"].notna().all()

    run.fit_ensembles(config)
    run.write_bundle(config)
    bundle = load_bundle(f"{output}/bundle")
    assert bundle.manifest["ship"] == "refit"
    assert sorted(m["file"] for m in bundle.manifest["models"]) == [f"models/{r}.safetensors" for r in refits]
    assert all(m["refit"] and m["fold"] == cv.REFIT and "oof_mae" not in m for m in bundle.manifest["models"])
    models = score.BundleModels(bundle)
    registered = pd.read_parquet(f"{output}/registered")
    rows = registered[registered.id.isin(oof.id)].sort_values("id").reset_index(drop=True)
    bank = cv.decode_bank(rows.registered_png.tolist())
    refit_state = torch.load(f"{output}/cv/models/A-reg-all-refit.pt", weights_only=False)
    assert refit_state["fold"] == cv.REFIT
    own = predict(model_from_state(refit_state), bank, np.arange(len(bank)), model_kind("A-reg", 0.125),
                  male=False).numpy()
    shipped = models.kind_predictions(bank, "F", "A-reg")
    assert shipped.shape == (len(bank), 1)  # one model per kind: the refit
    np.testing.assert_allclose(shipped[:, 0], own, atol=1e-3)
    table = score.score_rows(rows, models)
    assert table.boneage_months.notna().all() and table.boneage_months.between(0, 240).all()
    assert table.boneage_sd_months.isna().all()  # no fold spread with one model per kind
    assert table.zone_spread_months.notna().all()  # the gate's zone spread: the refit's kinds
    assert table.boneage_lower_months.notna().all()  # the interval, calibrated on the fold models' OOF residuals
