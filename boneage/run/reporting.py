"""What a run shows: report.html (boneage.report) from the CV's tables, the stage timer, and the closing
summary on the console."""

from __future__ import annotations

import contextlib
import json
import time
from typing import Any

import pandas as pd

from boneage import progress
from boneage.config import Config
from boneage.data import storage
from boneage.errors import STATUS_OK
from boneage.progress import fmt_seconds
from boneage.run.holdout import read_evaluations, read_test_split


def report(config: Config, ensembles: dict[str, Any] | None = None, test: dict[str, Any] | None = None,
           n_worst: int = 12) -> str:
    """OUTPUT/report/report.html and its PNGs (boneage.report) from the CV's tables, the ensemble fits,
    the preprocessing summary and the worst cases' registered images."""
    from boneage.clinical import gate
    from boneage.distributed import ray_prepare
    from boneage.validation import age_calibration
    from boneage import report as report_mod

    options = config.data.storage_options
    cv_uri = storage.join_uri(config.output, "cv")
    ensembles = ensembles or storage.read_json(storage.join_uri(cv_uri, "ensemble.json"), options)
    table = pd.read_parquet(storage.join_uri(cv_uri, "ensemble_oof.parquet"), storage_options=options or None)
    kinds = list(config.cv.kinds)
    names = list(ensembles["fits"])
    predictions = {m: table[f"ensemble_{m}"].to_numpy(float) for m in names}
    primary = ensembles["use"]
    training = storage.read_json(storage.join_uri(config.output, "bundle", "training.json"), options) or {}
    corrected = training.get("age_calibration") or {}
    if corrected.get("applied"):  # the shipped bone age: the ensemble corrected at the extremes, cross-fitted
        primary = f"{primary}, age-corrected"
        # (a record without a strength is from before partial corrections: applied meant in full)
        method = corrected["method"] if "strength" in corrected else "linear"
        predictions = {primary: age_calibration.cross_fitted(
            table, corrected["prediction"], method, corrected.get("bias_target", age_calibration.BIAS_TARGET),
            corrected.get("max_mae_increase", age_calibration.MAX_MAE_INCREASE)), **predictions}
    worst = report_mod.worst_cases(table, predictions[primary], n_worst)["id"].tolist()
    images = ray_prepare.read_registered(storage.join_uri(config.output, "registered"), options, ids=worst)
    trials = pd.read_parquet(storage.join_uri(cv_uri, "trials.parquet"), storage_options=options or None)
    test = test or storage.read_json(storage.join_uri(config.output, "test", "metrics.json"), options) or None
    test_table = test_gate = None
    if test:
        test = {**test, "evaluations": read_evaluations(config)}  # how many times the split was scored
        scored = pd.read_parquet(storage.join_uri(config.output, "test", "predictions.parquet"),
                                 storage_options=options or None)
        split = read_test_split(config)
        test_table = split.merge(scored[scored.status == STATUS_OK][["id", "boneage_months"]], on="id")
        test_table = test_table.rename(columns={"boneage_months": "pred"})
        # The gate again with the shipped thresholds (as scoring applied them; an older run's split was
        # scored before its fold spread threshold was added to the bundle).
        test_gate = split[["id", "boneage"]].merge(scored.drop(columns=["boneage"], errors="ignore"), on="id", how="left")
        test_gate["accepted"], test_gate["reject_reason"] = gate.gate(
            test_gate, [k for k in kinds if k in test_gate], gate.calibration_of(training))
    # The QA flags of every registered image: the gate's effect out of fold.
    flags = ray_prepare.read_registered(storage.join_uri(config.output, "registered"), options, with_images=False)
    cv_summary = storage.read_json(storage.join_uri(cv_uri, "summary.json"), options)
    uri = report_mod.write_report(
        storage.join_uri(config.output, "report"), table[["id", "male", "boneage", "fold", *kinds]], kinds,
        ensembles["fits"], predictions, trials=trials,
        preprocess_summary=storage.read_json(storage.join_uri(config.output, "qa", "preprocess_summary.json"), options) or None,
        worst_images=images, primary=primary, n_worst=n_worst, storage_options=options,
        test=test, test_table=test_table, gate_flags=flags[["id", "registration_doubtful", "mask_doubtful"]],
        test_gate=test_gate, interval=training.get("interval"), age_calibration=training.get("age_calibration"),
        sex_classifier=cv_summary.get("sex_classifier"), sex_prediction=training.get("sex_prediction"),
        grouping=cv_summary.get("grouping"))
    print(f"[report] {uri}")
    return uri


class StageTimer:
    """`with timer("title"):` prints the stage's header and records its wall time."""

    def __init__(self):
        self.started, self.seconds = time.time(), {}

    @contextlib.contextmanager
    def __call__(self, title: str):
        progress.stage(title)
        began = time.time()
        try:
            yield
        finally:
            self.seconds[title] = round(time.time() - began, 1)

    @property
    def total(self) -> float:
        return time.time() - self.started


def print_final_summary(config: Config, test: dict[str, Any] | None, timings: StageTimer) -> None:
    """The run's closing table: out-of-fold MAE per kind and of the ensemble, the locked test split's
    accuracy, the time of each stage (also OUTPUT/timings.json), and where each output is."""
    from boneage.validation import metrics

    options = config.data.storage_options
    cv_uri = storage.join_uri(config.output, "cv")
    summary = storage.read_json(storage.join_uri(cv_uri, "summary.json"), options)
    ensembles = storage.read_json(storage.join_uri(cv_uri, "ensemble.json"), options)
    storage.write_bytes(storage.join_uri(config.output, "timings.json"), json.dumps(
        {"total_seconds": round(timings.total, 1), "stages": timings.seconds}, indent=2).encode(), options)
    print(f"\n== done in {timings.total / 60:.1f} min ==")
    print("  " + ", ".join(f"{title.split(' ', 1)[1].split(' (')[0]} {fmt_seconds(s)}"
                           for title, s in timings.seconds.items()))
    print(f"  {'out-of-fold MAE, months':<28}{'F':>8}{'M':>8}{'all':>8}")
    for row in summary.get("mae", []):
        print(f"  {row['model']:<28}{row['mae_F']:>8.2f}{row['mae_M']:>8.2f}{row['mae_all']:>8.2f}")
    for name, fit in ensembles.get("fits", {}).items():
        mae = fit["cv_mae"]
        label = f"ensemble {name}" + (" (ships)" if name == ensembles.get("use") else "")
        print(f"  {label:<28}{mae.get('F', float('nan')):>8.2f}{mae.get('M', float('nan')):>8.2f}{mae['all']:>8.2f}")
    if test:
        print(f"  locked test split, shipped bundle: {metrics.describe(test['accuracy']['all'])}")
    for what, where in (("report", storage.join_uri(config.output, "report", "report.html")),
                        ("bundle", storage.join_uri(config.output, "bundle")),
                        ("out-of-fold table", storage.join_uri(cv_uri, "oof.parquet")),
                        ("test predictions", storage.join_uri(config.output, "test", "predictions.parquet"))):
        print(f"  {what:<18} {where}")
