"""report.html itself: the page's style, and write_report, which puts the figures and sections together and
writes the page with its PNGs beside it."""

from __future__ import annotations

import datetime as dt
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from boneage.report import figures, sections
from boneage.validation import ensemble, metrics
from boneage.clinical import gate
from boneage.data import storage


CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px auto; max-width: 1180px;
       color: #222; line-height: 1.4; padding: 0 16px; }
h1 { font-size: 26px; margin-bottom: 4px; } h2 { font-size: 20px; border-bottom: 1px solid #ddd; padding-bottom: 4px;
margin-top: 32px; } h3 { font-size: 16px; margin-bottom: 6px; }
.meta { color: #666; font-size: 13px; }
.headline { display: flex; gap: 16px; flex-wrap: wrap; margin: 16px 0; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 10px 16px; min-width: 170px; background: #fafafa; }
.card .value { font-size: 26px; font-weight: 600; } .card .label { color: #555; font-size: 13px; }
.card.primary { border-color: #2c7fb8; background: #eef5fb; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td.text, th.text { text-align: left; }
tr.ensemble td { background: #eef5fb; } tr.baseline td { color: #666; font-style: italic; }
td.best { font-weight: 700; }
.missing { color: #a33; font-style: italic; }
.note { color: #555; font-size: 13px; max-width: 900px; }
img.plot { max-width: 100%; border: 1px solid #eee; }
.cases { display: flex; flex-wrap: wrap; gap: 12px; }
.case { border: 1px solid #ddd; border-radius: 4px; padding: 6px; font-size: 12px; width: 210px; }
.case img { width: 200px; display: block; background: #000; } .case .noimg { width: 200px; height: 120px;
background: #eee; display: flex; align-items: center; justify-content: center; color: #888; }
"""


def write_report(out_uri: str, oof: pd.DataFrame, kinds: Sequence[str],
                 ensembles: Mapping[str, Mapping[str, Any]], ensemble_oof: Mapping[str, np.ndarray], *,
                 trials: pd.DataFrame | None = None, preprocess_summary: Mapping[str, Any] | None = None,
                 worst_images: pd.DataFrame | None = None, primary: str | None = None, n_worst: int = 12,
                 storage_options: Mapping[str, Any] | None = None,
                 test: Mapping[str, Any] | None = None, test_table: pd.DataFrame | None = None,
                 sex_classifier: Mapping[str, Any] | None = None,
                 sex_prediction: Mapping[str, Any] | None = None,
                 gate_flags: pd.DataFrame | None = None, test_gate: pd.DataFrame | None = None,
                 gate_quantile: float = gate.QUANTILE, interval: Mapping[str, Any] | None = None,
                 grouping: Mapping[str, Any] | None = None, age_calibration: Mapping[str, Any] | None = None,
                 title: str = "Bone age: accuracy report") -> str:
    """Write `out_uri`/report.html and its PNGs (local folder or s3://); return the report's URI.

    oof: the OOF table (id, male, boneage, fold, one column per kind). ensembles: {name: weights
    record}; ensemble_oof: {name: its cross-validated prediction of every oof row}; primary: the
    ensemble of the headline, Bland-Altman and worst cases (the first one by default). worst_images:
    rows with id and registered_png (and optionally registration_doubtful, keypoint_source) for the
    worst cases' thumbnails. test: the locked test split's result (run.evaluate_test), test_table its
    rows (boneage, male, pred) for the plot; they come first. sex_classifier: cv/summary.json's
    "sex_classifier" (its section is left out without one); sex_prediction: training.json's
    "sex_prediction" (whether scoring may use a predicted sex, said there). gate_flags: id, registration_doubtful,
    mask_doubtful of the oof rows (the registered table's QA flags) for the rejection gate's effect,
    cross-fitted on the OOF table with `gate_quantile`; test_gate: the locked test split's rows (boneage,
    boneage_months, accepted, reject_reason), gated with the shipped thresholds. Anything else missing is
    said in its section. interval: the bundle's interval calibration (training.json "interval"), shown
    with the test split's coverage (test["interval"]). grouping: cv/summary.json's "grouping" (folds by
    patient or per image), said in the headline. age_calibration: the bundle's correction of the bias at
    the extremes (training.json "age_calibration"), with the bias by age band before and after."""
    oof = oof.reset_index(drop=True)
    kinds = [k for k in kinds if k in oof.columns]
    ensemble_oof = {name: np.asarray(p, float) for name, p in ensemble_oof.items()}
    for name, pred in ensemble_oof.items():
        if len(pred) != len(oof):
            raise ValueError(f"ensemble {name!r} predicts {len(pred)} rows, the OOF table has {len(oof)}")
    primary = primary if primary is not None else next(iter(ensemble_oof), None)
    if primary is not None and primary not in ensemble_oof:
        raise ValueError(f"primary ensemble {primary!r} has no out-of-fold prediction")

    files: dict[str, bytes] = {}
    table = ensemble.mae_table(oof, kinds, ensemble_oof)
    kind_rows = table[table["role"] == "kind"].dropna(subset=["mae_all"])
    best_kind = str(kind_rows.loc[kind_rows["mae_all"].idxmin(), "model"]) if len(kind_rows) else None
    y = oof["boneage"].to_numpy(float)

    band_names = ["per-sex median", *([best_kind] if best_kind else []), *ensemble_oof]
    files["mae_by_band.png"] = figures.plot_mae_by_band(table, band_names)
    panels = [(n, ensemble_oof[n]) for n in ensemble_oof][:2]
    if best_kind:
        panels.append((f"lowest kind {best_kind}", oof[best_kind].to_numpy(float)))
    test_png = None
    if test_table is not None and len(test_table):
        files["test_pred_vs_true.png"] = figures.plot_pred_vs_true(
            test_table, [("shipped bundle, locked test split", test_table["pred"].to_numpy(float))])
        test_png = "test_pred_vs_true.png"
    parts = [f"<h1>{sections.escape(title)}</h1><p class='meta'>written {sections.escape(dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}; "
                "months</p>",
                sections.test_section(test, test_png),
                sections.interval_section(interval, (test or {}).get("interval")),
                sections.age_calibration_section(age_calibration),
                "<h2>Cross-validation (out of fold)</h2><p class='note'>Every image predicted by models that "
                "never saw its label; no trial chose anything on the fold it scores (its epoch came from a selection "
                "split of its training folds, or a fixed schedule), and the ensemble's weights (and its Tune "
                "setting) were fit without the fold they predict.</p>",
                sections.headline(oof, table, primary, list(ensemble_oof), ensembles, grouping),
                sections.mae_section(table, "mae_by_band.png")]
    if primary is not None:
        parts.append(f"<p class='note'>Ensemble {sections.escape(primary)}, out of fold, every metric:</p>")
        acc = metrics.accuracy_report(ensemble_oof[primary], y, oof["male"].to_numpy(bool))
        parts.append(sections.accuracy_table({"all": acc["all"], **acc["by_sex"], **acc["by_age_band"]}))

    parts.append("<h2>Predicted vs true</h2>")
    if panels:
        files["pred_vs_true.png"] = figures.plot_pred_vs_true(oof, panels)
        parts.append('<img class="plot" src="pred_vs_true.png" alt="predicted vs true">')
    else:
        parts.append(sections.missing("No model predictions to plot."))

    parts.append("<h2>Bland-Altman</h2>")
    if primary is not None:
        pred = ensemble_oof[primary]
        files["bland_altman.png"] = figures.plot_bland_altman(oof, primary, pred)
        stats = figures.bland_altman(pred, y)
        by_sex = {s: figures.bland_altman(pred[figures.sexes_of(oof) == s], y[figures.sexes_of(oof) == s]) for s in ensemble.SEXES
                  if (figures.sexes_of(oof) == s).sum() > 1}
        rows = "".join(f'<tr><td class="text">{sections.escape(g)}</td><td>{st["n"]}</td><td>{sections.number(st["bias"], 2)}</td>'
                       f'<td>{sections.number(st["sd"], 2)}</td><td>{sections.number(st["lower"], 1)} … {sections.number(st["upper"], 1)}</td></tr>'
                       for g, st in {"all": stats, **by_sex}.items())
        parts.append(f"<p class='note'>Ensemble {sections.escape(primary)}: difference predicted − true against their "
                        "mean; a slope shows the ensemble pulling ages towards the mean.</p>"
                        '<table><tr><th class="text">group</th><th>n</th><th>bias</th><th>SD</th>'
                        f"<th>95 % limits</th></tr>{rows}</table>"
                        '<img class="plot" src="bland_altman.png" alt="Bland-Altman plot">')
    else:
        parts.append(sections.missing("No ensemble prediction was given."))

    weighted = {n: r for n, r in ensembles.items() if r.get("by_sex")}
    if weighted:
        files["weights.png"] = figures.plot_weights(weighted)
    parts.append(sections.weights_section(weighted, "weights.png" if weighted else None))

    if primary is not None:
        cases = sections.worst_cases(oof, ensemble_oof[primary], n_worst)
        thumbs: dict[str, str] = {}
        if worst_images is not None and len(worst_images):
            pngs = worst_images.drop_duplicates("id").set_index("id")["registered_png"]
            for i, cid in enumerate(cases["id"].astype(str), start=1):
                data = pngs.get(cid)
                if isinstance(data, (bytes, bytearray)) and data:
                    name = f"worst_{i:02d}.png"
                    files[name] = figures.thumbnail(bytes(data))
                    thumbs[cid] = name
        parts.append(sections.cases_section(cases, primary, worst_images, thumbs))
    else:
        parts.append("<h2>Worst cases</h2>" + sections.missing("No ensemble prediction was given."))

    parts.append(sections.sex_section(sex_classifier, sex_prediction))
    parts.append(sections.gate_effect(oof, kinds, ensemble_oof.get(primary) if primary is not None else None,
                                 gate_flags, test_gate, gate_quantile, files))
    parts.append(sections.qa_section(preprocess_summary))
    parts.append(sections.trials_section(trials, ensembles))

    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{sections.escape(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>")
    for name, data in files.items():
        storage.write_bytes(storage.join_uri(out_uri, name), data, storage_options)
    report_uri = storage.join_uri(out_uri, "report.html")
    storage.write_bytes(report_uri, page.encode("utf-8"), storage_options)
    return report_uri
