"""The ensemble's weights fit on Ray Tune: each trial is one setting of boneage.validation.ensemble.fit_gd (the
same per-sex form as the direct solvers, intercept + non-negative weights, fit by projected Adam on
an L1 or Huber loss; the settings: learning rate, steps, loss, Huber width, shrinkage towards equal
weights, start), scored by the cross-validated MAE over the OOF table's CV folds. Tune picks the
setting with the lowest CV MAE and the final weights are that setting refit on all rows ("tune").

Honesty: the winning trial's CV MAE was also what picked it, so it is optimistic by the selection
(slightly, with a dozen smooth settings). Every trial therefore also reports, for each outer fold f,
its CV MAE over the other folds only; the driver picks a setting per fold by those and predicts
fold f with it (nested CV). That nested prediction is what tune_ensemble returns and its MAE is the
record's "cv_mae"; the winner's own CV MAE is kept as "selection_cv_mae". With 2 folds there is no
inner CV: the plain CV prediction is returned and the record says "nested": false.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
import ray
import ray.tune
from ray.tune.search.basic_variant import BasicVariantGenerator

from boneage.validation import ensemble
from boneage.data import storage

METRIC = "cv_mae"

# Tried first: plain L1, equal start, a light pull to equal weights (fit_gd reaches the LAD optimum).
DEFAULT_CONFIG = {"lr": 0.05, "steps": 500, "loss": "l1", "huber_delta": 5.0, "shrink": 1e-4, "init": "equal"}


def search_space() -> dict[str, Any]:
    return {
        "lr": ray.tune.loguniform(5e-3, 2e-1),
        "steps": ray.tune.choice([200, 500, 1000]),
        "loss": ray.tune.choice(["l1", "huber"]),
        "huber_delta": ray.tune.uniform(1.0, 12.0),  # months; used by the Huber loss only
        "shrink": ray.tune.loguniform(1e-5, 1.0),
        "init": ray.tune.choice(["equal", "best"]),
    }


def gd_fit(config: Mapping[str, Any]) -> ensemble.Fit:
    """The fit of one Tune config (only fit_gd's arguments are taken from it)."""
    keys = ("lr", "steps", "loss", "huber_delta", "shrink", "init")
    return functools.partial(ensemble.fit_gd, **{k: config[k] for k in keys if k in config})


def _trial(config: dict[str, Any], oof: pd.DataFrame, kinds: list[str]) -> None:
    """One Tune trial: the CV MAE of this setting (overall, per sex) and its inner CV MAE per outer fold."""
    started = time.time()
    fit = gd_fit(config)
    pred = ensemble.cross_validated(oof, kinds, fit)
    metrics = {METRIC: ensemble.mae(pred, oof["boneage"].to_numpy(float))}
    metrics.update({f"cv_mae_{sex}": v for sex, v in ensemble.mae_by_sex(oof, pred).items() if sex != "all"})
    if oof["fold"].nunique() >= 3:
        metrics.update({f"inner_mae_fold{f}": v for f, v in ensemble.inner_cv_mae(oof, kinds, fit).items()})
    metrics["seconds"] = time.time() - started
    ray.tune.report(metrics)


def tune_ensemble(oof: pd.DataFrame, kinds: Sequence[str], storage_uri: str,
                  storage_options: Mapping[str, Any] | None = None, num_samples: int = 12, seed: int = 0,
                  name: str = "tune", cpus_per_trial: float = 1.0) -> tuple[dict[str, Any], np.ndarray]:
    """(record, cv_pred): the Tune-fitted per-sex weights (method "tune") and the honest (nested when
    there are >= 3 folds) cross-validated ensemble prediction of every OOF row. `num_samples` settings
    (the first DEFAULT_CONFIG, the rest drawn from search_space() with `seed`) run as Tune trials of
    `cpus_per_trial` CPUs; Tune's experiment goes to `storage_uri`/`name` (local or s3://). The record
    also carries the chosen config, the selection-biased "selection_cv_mae" and every trial's result."""
    kinds = list(kinds)
    oof = oof[["male", "boneage", "fold", *kinds]].reset_index(drop=True)
    for sex, rows in ensemble.sex_rows(oof).items():  # fail here, not in every trial
        if not ensemble.usable_kinds(oof, kinds, rows):
            raise ValueError(f"no model kind has out-of-fold predictions for every {sex} image")
    storage_path, storage_filesystem = storage.arrow_location(storage_uri, storage_options)
    tuner = ray.tune.Tuner(
        ray.tune.with_resources(ray.tune.with_parameters(_trial, oof=oof, kinds=kinds), {"CPU": cpus_per_trial}),
        param_space=search_space(),
        tune_config=ray.tune.TuneConfig(
            metric=METRIC, mode="min", num_samples=num_samples, reuse_actors=True,
            trial_dirname_creator=lambda t: f"trial_{t.trial_id}",
            search_alg=BasicVariantGenerator(points_to_evaluate=[dict(DEFAULT_CONFIG)], random_state=seed),
        ),
        run_config=ray.tune.RunConfig(name=name, storage_path=storage_path, storage_filesystem=storage_filesystem,
                                      failure_config=ray.tune.FailureConfig(max_failures=0), verbose=0),
    )
    results = tuner.fit()
    finished = [r for r in results if r.error is None and r.metrics and METRIC in r.metrics]
    if not finished:
        errors = [str(r.error).split("\n")[0] for r in results if r.error is not None]
        raise RuntimeError(f"no ensemble Tune trial finished: {errors[:3]}")
    configs = [{k: r.config[k] for k in DEFAULT_CONFIG} for r in finished]
    scores = np.array([r.metrics[METRIC] for r in finished])
    best = int(np.argmin(scores))
    best_fit = gd_fit(configs[best])

    nested = oof["fold"].nunique() >= 3
    if nested:
        inner = [{int(k[len("inner_mae_fold"):]): v for k, v in r.metrics.items() if k.startswith("inner_mae_fold")}
                 for r in finished]
        cv_pred, chosen = ensemble.nested_cross_validated(oof, kinds, [gd_fit(c) for c in configs], inner)
    else:  # no inner CV possible: the selected setting's own CV prediction, flagged as optimistic
        cv_pred, chosen = ensemble.cross_validated(oof, kinds, best_fit), {}

    by_sex = ensemble.fit_all(oof, kinds, best_fit)
    trials = [{**c, METRIC: float(r.metrics[METRIC]), "seconds": round(float(r.metrics.get("seconds", 0.0)), 3)}
              for c, r in zip(configs, finished)]
    record = ensemble.make_record(
        "tune", kinds, by_sex,
        cv_mae=ensemble.mae_by_sex(oof, cv_pred), nested=nested,
        selection_cv_mae={"all": float(scores[best]),
                          **{s: float(finished[best].metrics[f"cv_mae_{s}"])
                             for s in ensemble.SEXES if f"cv_mae_{s}" in finished[best].metrics}},
        config=configs[best], nested_choice={str(f): configs[i] for f, i in chosen.items()},
        excluded={sex: [k for k in kinds if k not in w] for sex, (_, w) in by_sex.items()},
        n={sex: int(len(rows)) for sex, rows in ensemble.sex_rows(oof).items()},
        folds=int(oof["fold"].nunique()), trials=trials, failed_trials=len(results) - len(finished),
    )
    return record, cv_pred
