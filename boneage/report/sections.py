"""The report's sections, each a function from results to an HTML fragment; a section whose input is
missing says so instead of failing."""

from __future__ import annotations

import html
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

from boneage.clinical import gate
from boneage.report import figures
from boneage.validation import cv, metrics


def escape(value: Any) -> str:
    return html.escape(str(value))


def number(value: Any, digits: int = 1) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return escape(value)
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}"


def missing(text: str) -> str:
    return f'<p class="missing">{escape(text)}</p>'


def worst_cases(oof: pd.DataFrame, pred: np.ndarray, n: int = 12) -> pd.DataFrame:
    """The n rows with the largest |pred - boneage| (id, male, boneage, pred, error), worst first:
    the ids whose registered images the report shows (read just those: see the module docstring)."""
    out = oof[["id", "male", "boneage"]].reset_index(drop=True).copy()
    out["pred"] = np.asarray(pred, float)
    out["error"] = out["pred"] - out["boneage"]
    out = out[np.isfinite(out["error"])]
    order = np.argsort(-np.abs(out["error"].to_numpy()), kind="stable")[:n]
    return out.iloc[order].reset_index(drop=True)


def headline(oof: pd.DataFrame, table: pd.DataFrame, primary: str | None, names: Sequence[str],
              ensembles: Mapping[str, Mapping[str, Any]], grouping: Mapping[str, Any] | None = None) -> str:
    rows = table.set_index("model")
    kind_rows = rows[rows["role"] == "kind"]
    best_kind = kind_rows["mae_all"].idxmin() if kind_rows["mae_all"].notna().any() else None
    cards = []
    if primary is not None:
        record = ensembles.get(primary, {})
        note = "nested CV" if record.get("nested") else "CV over folds"
        cards.append(("primary", f"{number(rows.loc[primary, 'mae_all'], 2)}",
                      f"ensemble <b>{escape(primary)}</b>, months MAE ({note})"))
    for name in [n for n in names if n != primary]:
        cards.append(("", number(rows.loc[name, "mae_all"], 2), f"ensemble <b>{escape(name)}</b>, months MAE"))
    if best_kind is not None:
        cards.append(("", number(rows.loc[best_kind, "mae_all"], 2), f"lowest single kind <b>{escape(best_kind)}</b> (picked on these labels: optimistic)"))
    cards.append(("", number(rows.loc["per-sex median", "mae_all"], 2), "per-sex median (learns nothing but sex)"))
    male = oof["male"].to_numpy(bool)
    cards.append(("", f"{len(oof)}", f"images ({int((~male).sum())} F, {int(male.sum())} M), "
                                     f"{oof['fold'].nunique()} folds{grouping_note(grouping)}"))
    body = "".join(f'<div class="card {c}"><div class="value">{v}</div><div class="label">{label}</div></div>'
                   for c, v, label in cards)
    return f'<div class="headline">{body}</div>'


def grouping_note(grouping: Mapping[str, Any] | None) -> str:
    """How folds and the test split were drawn (cv/summary.json's "grouping"; none: a run made before)."""
    if not grouping:
        return ""
    if grouping.get("by_patient"):
        return f", by patient ({grouping['patients']} patients: no child in two folds or the test split)"
    return ", per image (no patient column: one image per child assumed)"


def accuracy_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per group ({group: metrics.accuracy}), a column per metric, with intervals if any."""
    head = "".join(f"<th>{escape(metrics.METRIC_NAMES[m])}</th>" for m in metrics.METRICS)
    body = []
    for group, acc in rows.items():
        cells = []
        for m in metrics.METRICS:
            pct = m == "within_12"
            fmt = (lambda v: f"{100 * v:.0f} %") if pct else (lambda v: number(v, 2))
            text = fmt(acc[m]) if m in acc else "–"
            if m in acc.get("ci", {}):
                lo, hi = acc["ci"][m]
                text += f"<br><span class='meta'>{fmt(lo)} … {fmt(hi)}</span>"
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr><td class='text'>{escape(group)}</td><td>{acc.get('n', 0)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th class='text'>group</th><th>n</th>{head}</tr>{''.join(body)}</table>"


def test_section(test: Mapping[str, Any] | None, png: str | None) -> str:
    """The locked test split, scored by the shipped bundle: the report's headline."""
    out = ["<h2>Locked test split: the shipped bundle</h2>"]
    if not test or not test.get("accuracy", {}).get("all", {}).get("n"):
        return "".join(out) + missing("No locked test split was scored (test_fraction 0 and no --test-images).")
    acc = test["accuracy"]
    a = acc["all"]
    ci = a.get("ci", {})
    cards = [("primary", number(a["mae"], 2), f"months MAE, 95 % interval {number(ci.get('mae', [np.nan])[0], 2)} … "
                                           f"{number(ci.get('mae', [np.nan, np.nan])[1], 2)}"),
             ("", number(a["rmse"], 2), "months RMSE"),
             ("", f"{100 * a['within_12']:.0f} %", "within ±12 months"),
             ("", f"{a['bias']:+.2f}", "months bias (predicted − true)"),
             ("", f"{test['scored']}/{test['images']}", "test images scored")]
    out.append('<div class="headline">' + "".join(
        f'<div class="card {c}"><div class="value">{v}</div><div class="label">{label}</div></div>'
        for c, v, label in cards) + "</div>")
    out.append(f"<p class='note'>Images set aside before anything was fit ({escape(test.get('source', ''))}): no stage "
               "saw their labels. The finished bundle scored them through <code>boneage score</code> ("
               + ("one model per kind refit on every CV image" if test.get("ship") == "refit"
                  else "fold-averaged models")
               + f", ensemble, QA). Intervals: 95 % bootstrap over images ({test.get('bootstrap_resamples')} "
               "resamples).</p>")
    out.append(accuracy_table({"all": a, **acc.get("by_sex", {}), **acc.get("by_age_band", {})}))
    out.append(evaluations_note(test.get("evaluations")))
    if test.get("failed"):
        out.append("<p class='note'>Not scored: " + ", ".join(f"{escape(f['id'])} ({escape(f['error'])})"
                                                            for f in test["failed"]) + "</p>")
    if png:
        out.append(f'<img class="plot" src="{escape(png)}" alt="test split: predicted vs true">')
    return "".join(out)


def interval_section(interval: Mapping[str, Any] | None, test: Mapping[str, Any] | None) -> str:
    """The bone age's prediction interval: its level and method (boneage.validation.intervals), its
    coverage and mean width cross-fitted out of fold (every method compared) and on the locked test split
    (overall, by sex and age band, with counts)."""
    out = ["<h2>Bone age interval</h2>"]
    if not interval or "half_width" not in interval:
        why = (interval or {}).get("error", "the bundle has no interval calibration")
        return "".join(out) + missing(f"No prediction interval: {why}.")
    level = interval["level"]
    out.append(f"<p class='note'>Every scored image gets a {100 * level:.0f} % interval (boneage_lower_months … "
               f"boneage_upper_months), conformal on the ensemble's out-of-fold residuals; method "
               f"<b>{escape(interval['method'])}</b>, chosen by a fixed rule: {escape(interval.get('why', ''))}. "
               "Out of fold: each fold's interval fitted on the other folds. The fold spread is not the interval.</p>")

    def table(rows: Mapping[str, Mapping[str, Any]]) -> str:
        body = "".join(f"<tr><td class='text'>{escape(name)}</td><td>{cell.get('n', 0)}</td>"
                       f"<td>{number(100 * cell['coverage'] if cell.get('coverage') is not None else None, 1)} %</td>"
                       f"<td>{number(cell.get('mean_width'), 1)}</td></tr>" for name, cell in rows.items())
        return ("<table><tr><th class='text'>group</th><th>n</th><th>coverage</th><th>mean width (months)</th></tr>"
                f"{body}</table>")

    def groups(report: Mapping[str, Any]) -> dict[str, Mapping[str, Any]]:
        return {"all": report.get("all", {}), **report.get("by_sex", {}), **report.get("by_age_band", {})}

    if test and test.get("all", {}).get("n"):
        out.append(f"<p class='note'>Locked test split, shipped bundle ({100 * level:.0f} % nominal):</p>")
        out.append(table(groups(test)))
    else:
        out.append(missing("The interval was not measured on a locked test split."))
    out.append(f"<p class='note'>Out of fold, cross-fitted over the folds ({100 * level:.0f} % nominal), every method "
               "compared:</p>")
    out.append(table({m: c.get("all", {}) for m, c in interval.get("comparison", {}).items()}))
    out.append(f"<p class='note'>Out of fold, the chosen method ({escape(interval['method'])}) by group (age bands "
               "by true bone age):</p>")
    out.append(table(groups(interval.get("cross_fitted", {}))))
    return "".join(out)


def age_calibration_section(calibration: Mapping[str, Any] | None) -> str:
    """The correction of the bias at the extreme ages (boneage.validation.age_calibration): the fitted
    line per sex and the out-of-fold bias and MAE by age band before and after (cross-fitted)."""
    out = ["<h2>Bias at the extreme ages</h2>"]
    if not calibration or "before" not in calibration:
        return "".join(out) + missing("The bundle has no age correction (an older bundle): the bone age is the "
                                      "ensemble's as it is.")
    fits = []
    for sex, fitted in calibration.get("by_sex", {}).items():
        line = fitted.get("line", fitted)  # (the full line; a partial correction ships a blend of it)
        fits.append(f"{escape(sex)}: prediction = {line['a']:.1f} + {line['b']:.3f} × true age, inverted"
                    if "b" in fitted else f"{escape(sex)}: not corrected ({escape(fitted.get('skipped'))})")
    strength = calibration.get("strength", 1.0)
    if calibration.get("applied", True):
        out.append("<p class='note'>Out of fold the ensemble pulls ages towards the mean. The shipped bone age is "
                   f"corrected per sex ({escape(calibration.get('method'))}; {'; '.join(fits)}), "
                   + (f"at strength {strength:g}: the bone age moves {strength:.0%} of the way from the ensemble's "
                      "to the inverted line's, " if strength < 1 else "")
                   + "fitted on out-of-fold predictions only; below, each fold corrected by the fit on the other "
                   "folds" + (" at the strength chosen on the other folds" if "tried" in calibration else "")
                   + ".</p>")
    else:
        out.append("<p class='note'>Out of fold the ensemble pulls ages towards the mean. The shipped bone age is "
                   f"<b>not corrected</b>: {escape(calibration.get('why', 'cv.age_calibration is off'))}. Below, what "
                   "the correction would have done (each fold corrected by the fit on the other folds).</p>")
    before, after = calibration["before"], calibration["after"]
    rows = "".join(
        f'<tr><td class="text">{escape(group)}</td><td>{cell["n"]}</td><td>{number(cell["bias"], 1)}</td>'
        f'<td>{number(after_cell["bias"], 1)}</td><td>{number(cell["mae"], 2)}</td><td>{number(after_cell["mae"], 2)}</td></tr>'
        for group, cell, after_cell in [("all", before["all"], after["all"]),
                                        *((g, c, after["by_sex"][g]) for g, c in before["by_sex"].items()),
                                        *((g, c, after["by_age_band"][g]) for g, c in before["by_age_band"].items())])
    out.append('<table><tr><th class="text">group</th><th>n</th><th>bias before</th><th>bias after</th>'
               f"<th>MAE before</th><th>MAE after</th></tr>{rows}</table>")
    if calibration.get("tried"):
        tried = "".join(f'<tr><td>{t["strength"]:g}</td><td>{number(t["mae"], 2)}</td>'
                        f'<td>{number(t["worst_band_bias"], 1)}</td></tr>' for t in calibration["tried"])
        out.append(f"<p class='note'>How auto chose the strength: the weakest whose largest bias in an age band of "
                   f"30+ images is within ±{calibration.get('bias_target', 0):g} months, among those raising the MAE "
                   f"by at most {calibration.get('max_mae_increase', 0):.0%}. Measured on every out-of-fold row "
                   "(the labels that chose; the table above is the honest, nested estimate).</p>"
                   "<table><tr><th>strength</th><th>MAE</th><th>largest band bias</th></tr>" + tried + "</table>")
    return "".join(out)


def evaluations_note(evaluations: Sequence[Mapping[str, Any]] | None) -> str:
    """How many times the locked test split has been scored (OUTPUT/test/evaluations.jsonl), by which
    bundles: a number seen, then acted on, is no longer a clean estimate."""
    if evaluations is None:
        return ""
    n = len(evaluations)
    bundles = len({e.get("bundle_sha256") for e in evaluations})
    text = (f"This split has been scored {n} time{'s' if n != 1 else ''}, by {bundles} bundle{'s' if bundles != 1 else ''} "
            "(test/evaluations.jsonl). A split scored more than once is no longer a clean estimate if anything "
            "was changed in between: what was changed was chosen on it.")
    if n > 1:
        text += " Earlier: " + "; ".join(f"{escape(str(e.get('at')))} bundle {escape(str(e.get('bundle_sha256'))[:12])} "
                                         f"MAE {number(e.get('mae', float('nan')), 2)}" for e in evaluations[:-1][-5:])
    return f"<p class='note' data-evaluations='{n}'>{text}</p>"


def mae_section(table: pd.DataFrame, png: str) -> str:
    groups = ["all", "F", "M", *[label for label, _, _ in metrics.AGE_BANDS]]
    head = "".join(f"<th>{escape(g)}<br><span class='meta'>n={int(table[f'n_{g}'].max())}</span></th>" for g in groups)
    best = {g: table.loc[table["role"] != "baseline", f"mae_{g}"].min() for g in groups}
    body = []
    for _, row in table.iterrows():
        cells = []
        for g in groups:
            mae, n, full = row[f"mae_{g}"], int(row[f"n_{g}"]), int(table[f"n_{g}"].max())
            extra = f" <span class='meta'>(n={n})</span>" if n != full else ""
            cls = ' class="best"' if np.isfinite(mae) and mae == best[g] and row["role"] != "baseline" else ""
            cells.append(f"<td{cls}>{number(mae)}{extra}</td>")
        body.append(f'<tr class="{escape(row["role"])}"><td class="text">{escape(row["model"])}</td>'
                    f'<td class="text">{escape(row["role"])}</td>{"".join(cells)}</tr>')
    return (f"<h2>Out-of-fold MAE (months)</h2>"
            f"<p class='note'>Each kind: its sex's model of that kind (cv.sex_models pooled: the model of both "
            f"sexes, given the image's sex), scored on the fold it did not train on. "
            f"Ensembles: weights refit without the scored fold (cross-validated over the OOF table). "
            f"Bold: lowest in the column. Age bands by true bone age.</p>"
            f'<table><tr><th class="text">model</th><th class="text">role</th>{head}</tr>{"".join(body)}</table>'
            f'<img class="plot" src="{escape(png)}" alt="MAE by age band">')


def weights_section(ensembles: Mapping[str, Mapping[str, Any]], png: str | None) -> str:
    if not ensembles:
        return "<h2>Ensemble weights</h2>" + missing("No ensemble was given.")
    kinds = list(dict.fromkeys(k for r in ensembles.values() for k in r["kinds"]))
    head = "".join(f"<th>{escape(k)}</th>" for k in kinds)
    rows = []
    for name, record in ensembles.items():
        for sex, fit in record["by_sex"].items():
            cv_mae = record.get("cv_mae", {}).get(sex)
            excluded = record.get("excluded", {}).get(sex) or []
            cells = "".join(f"<td>{number(fit['weights'].get(k, 0.0), 3)}</td>" for k in kinds)
            rows.append(f'<tr><td class="text">{escape(name)}</td><td class="text">{escape(sex)}</td>'
                        f"<td>{number(fit['intercept'], 2)}</td>{cells}<td>{number(cv_mae, 2)}</td>"
                        f'<td class="text">{escape(", ".join(excluded)) or "–"}</td></tr>')
    notes = []
    for name, record in ensembles.items():
        if record.get("method") == "tune":
            sel = record.get("selection_cv_mae", {}).get("all")
            honest = "nested CV (setting chosen without the scored fold)" if record.get("nested") else \
                "the chosen setting's own CV MAE: optimistic by the selection (fewer than 3 folds, no nested CV)"
            notes.append(f"<b>{escape(name)}</b>: Ray Tune over {len(record.get('trials', []))} settings of a gradient "
                         f"fit; chosen setting {escape(config_text(record.get('config', {})))}; its CV MAE "
                         f"{number(sel, 2)} months picked it (optimistic), the CV MAE in the table is {honest}.")
        else:
            notes.append(f"<b>{escape(name)}</b>: direct solver ({escape(record.get('method'))}), weights refit per fold.")
    image = f'<img class="plot" src="{escape(png)}" alt="ensemble weights">' if png else ""
    return ("<h2>Ensemble weights</h2><p class='note'>age = intercept + Σ weight × kind's prediction, per sex, "
            "weights ≥ 0; fit on all out-of-fold rows (what scores new images). CV MAE: months, cross-validated. "
            "Excluded: kinds with a missing OOF prediction for that sex.</p>"
            f'<table><tr><th class="text">ensemble</th><th class="text">sex</th><th>intercept</th>{head}'
            f'<th>CV MAE</th><th class="text">excluded</th></tr>{"".join(rows)}</table>'
            + "".join(f"<p class='note'>{n}</p>" for n in notes) + image)


def config_text(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={number(v, 4) if isinstance(v, float) else v}" for k, v in config.items())


def tune_trials(ensembles: Mapping[str, Mapping[str, Any]]) -> str:
    out = []
    for name, record in ensembles.items():
        trials = record.get("trials")
        if not trials:
            continue
        frame = pd.DataFrame(trials).sort_values("cv_mae", kind="stable")
        out.append(f"<h3>Ray Tune settings of ensemble {escape(name)} ({len(frame)} trials, best first)</h3>"
                   + frame_table(frame, digits=2, general=("lr", "huber_delta", "shrink", "seconds")))
    return "".join(out)


def frame_table(frame: pd.DataFrame, digits: int = 1, general: Sequence[str] = ()) -> str:
    """A plain HTML table of a small frame: numbers right-aligned to `digits` decimals (the columns
    in `general` to 3 significant digits), text left-aligned and escaped."""
    def numeric(column: str) -> bool:
        return pd.api.types.is_numeric_dtype(frame[column]) and not pd.api.types.is_bool_dtype(frame[column])

    head = "".join(f"<th>{escape(c)}</th>" if numeric(c) else f'<th class="text">{escape(c)}</th>' for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for column, value in row.items():
            if not numeric(column) or value is None:
                cells.append(f'<td class="text">{escape(value)}</td>')
            elif pd.api.types.is_integer_dtype(frame[column]):
                cells.append(f"<td>{int(value)}</td>")
            elif column in general:
                cells.append(f"<td>{float(value):.3g}</td>" if np.isfinite(value) else "<td>–</td>")
            else:
                cells.append(f"<td>{number(value, digits)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def sex_section(sex: Mapping[str, Any] | None, calls: Mapping[str, Any] | None = None) -> str:
    """The sex classifier's out-of-fold ROC AUC and accuracy, overall and by age band, and whether the
    bundle lets scoring use a predicted sex (`calls`: training.json's "sex_prediction"); '' without one."""
    if not sex:
        return ""
    low, high = sex.get("unsure_between", (0.2, 0.8))
    views = int(sex.get("views") or 1)
    rows = "".join(
        f'<tr><td class="text">{escape(group)}</td><td>{a.get("n", 0)}</td><td>{number(a.get("auc"), 3)}</td>'
        f'<td>{number(100 * a.get("accuracy", float("nan")), 1)}</td><td>{number(100 * a.get("unsure", float("nan")), 1)}</td>'
        f'<td>{number(100 * a.get("accuracy_sure", float("nan")), 1)}</td></tr>'
        for group, a in {"all": sex.get("all", {}), **sex.get("by_age_band", {})}.items())
    averaged = (f", the mean logit over {views} test-time views of its crop, as scoring computes it" if views > 1
                else "")
    return (f"<h2>Sex classifier {escape(sex.get('kind', ''))} (out of fold)</h2><p class='note'>P(male) of every "
            "image from the fold model that never saw it (trained on both sexes pooled, in the same folds; not part "
            f"of the ensemble){averaged}. Accuracy at 0.5; unsure: P(male) between {low} and {high}; sure: accuracy "
            "of the others. Age bands by true bone age.</p>" + _sex_calls_note(calls) +
            '<table><tr><th class="text">group</th><th>n</th><th>ROC AUC</th><th>accuracy %</th><th>unsure %</th>'
            f"<th>accuracy of the sure %</th></tr>{rows}</table>")


def _sex_calls_note(calls: Mapping[str, Any] | None) -> str:
    """Whether an image of unknown sex is scored as its predicted sex (boneage.validation.sex_calls)."""
    if not calls:
        return ""
    if not calls.get("on"):
        return (f"<p class='note' data-sex-prediction='off'><b>Predicted sex is off for this bundle</b>: "
                f"{escape(str(calls.get('off_reason')))}. An image of unknown sex is scored under both sexes and "
                "rejected <code>sex_unknown</code>.</p>")
    crossed = calls["cross_fitted"]
    return (f"<p class='note' data-sex-prediction='on'><b>Predicted sex is on for this bundle</b>: an image of "
            f"unknown sex is scored as the predicted sex where P(male) ≤ {calls['p_low']:.3f} or ≥ "
            f"{calls['p_high']:.3f} (<code>sex_source</code> 'predicted'); out of fold those calls were wrong "
            f"{crossed['wrong']} of {crossed['calls']} times (cross-fitted; target "
            f"{100 * calls['max_error_rate']:.0f} %).</p>")


def gate_section(effects: Mapping[str, Mapping[str, Any]], notes: Sequence[str], png: str | None) -> str:
    """The rejection gate's effect on labelled images: {set name: gate.effect(...)}."""
    out = ["<h2>Rejection gate: its effect</h2><p class='note'>What <code>boneage score</code>'s gate "
           "(<code>accepted</code>, <code>reject_reason</code>; docs/scoring.md) does to the error on images "
           "with labels. Out of fold: the ensemble's cross-validated prediction, gated with thresholds "
           "calibrated on the other folds only (each fold in turn), so no row sets the threshold it is judged by; "
           "the fold spread check cannot run there (each row was predicted by one fold model). A row rejected "
           "for several reasons counts under each.</p>"]
    out += [f"<p class='note'>{escape(n)}</p>" for n in notes]
    if not effects:
        return "".join(out)
    head = "".join(f"<th>{escape(name)}</th>" for name in effects)

    def row(label: str, cell, key: str) -> str:
        return (f'<tr data-row="{escape(key)}"><td class="text">{label}</td>'
                + "".join(f"<td>{cell(e)}</td>" for e in effects.values()) + "</tr>")

    rows = [row("images", lambda e: e["images"], "images"),
            row("rejected", lambda e: f"{e['rejected']} ({number(100 * e['rejected_fraction'], 1)} %)", "rejected"),
            row("MAE of the accepted (n)", lambda e: f"{number(e['mae_accepted'], 2)} ({e['n_accepted_scored']})",
                "mae_accepted"),
            row("MAE of the rejected (n)", lambda e: f"{number(e['mae_rejected'], 2)} ({e['n_rejected_scored']})",
                "mae_rejected")]
    for check in sorted({c for e in effects.values() for c in e.get("rates", {})}):
        rows.append(row(f"{escape(check)}: measured rate (nominal)", lambda e, c=check: (
            f"{number(100 * e['rates'][c]['measured'], 1)} % ({number(100 * e['rates'][c]['nominal'], 1)} %)"
            if c in e.get("rates", {}) else "–"), f"rate_{check}"))
    for reason in gate.REASONS:
        if any(reason in e["by_reason"] for e in effects.values()):
            rows.append(row(f"&nbsp;&nbsp;{escape(reason)}: n, MAE", lambda e, r=reason: (
                f"{e['by_reason'][r]['n']}, {number(e['by_reason'][r]['mae'], 1)}" if r in e["by_reason"] else "0"),
                reason))
    out.append(f'<table class="gate"><tr><th class="text">months</th>{head}</tr>{"".join(rows)}</table>')
    if png:
        out.append(f'<img class="plot" src="{escape(png)}" alt="error of accepted and rejected images">')
    return "".join(out)


def trials_section(trials: pd.DataFrame | None, ensembles) -> str:
    out = ["<h2>Trials</h2>"]
    if trials is None or len(trials) == 0:
        out.append(missing("No CV trials table was given (cv/trials.parquet)."))
    else:
        refit = trials["fold"].eq(cv.REFIT) if "fold" in trials else False
        trials = trials.assign(models=np.where(refit, "refit", "folds"))  # cv.ship refit: a row of its own
        summary = trials.groupby(["kind", "sex", "models"], sort=True).agg(
            trials=("trial", "size") if "trial" in trials else ("fold", "size"),
            select_mae=("select_mae", "mean"), oof_mae=("oof_mae", "mean"), best_epoch=("best_epoch", "mean"),
            epochs_run=("epochs_run", "mean"), seconds=("seconds", "sum")).reset_index()
        total = float(trials["seconds"].sum()) if "seconds" in trials else float("nan")
        out.append(f"<p class='note'>{len(trials)} CV trials, {number(total / 60, 1)} trial-minutes in all. "
                   "select_mae: MAE on the trial's selection split (carved from its training folds; it chose "
                   "the epoch; – for a fixed schedule); oof_mae: the chosen model's MAE on the scored fold, "
                   "which chose nothing (months, means over folds); best_epoch, epochs_run: means over folds; "
                   "seconds: sum. models refit: one model per kind trained on every CV image after the CV "
                   "(cv.ship refit: what the bundle ships), with no scored fold.</p>")
        out.append(frame_table(summary))
    out.append(tune_trials(ensembles))
    return "".join(out)


def qa_value(value: Any) -> str:
    if isinstance(value, Mapping):
        if not value:
            return "–"
        return ("<table>" + "".join(f'<tr><td class="text">{escape(k)}</td><td>{qa_value(v)}</td></tr>'
                                    for k, v in value.items()) + "</table>")
    if isinstance(value, float):
        return number(value, 2)
    if value is None:
        return "–"
    return escape(value)


def qa_section(summary: Mapping[str, Any] | None) -> str:
    out = ["<h2>Registration QA</h2>"]
    if not summary:
        out.append(missing("No preprocessing summary was given (qa/preprocess_summary.json)."))
        return "".join(out)
    order = ["items", "ok", "errors", "errors_by_code", "registration_doubtful", "mask_doubtful",
             "keypoint_model", "keypoint_error_on_held_out_annotations", "seconds"]
    keys = [k for k in order if k in summary] + [k for k in summary if k not in order and k != "failed_items"]
    rows = "".join(f'<tr><td class="text">{escape(k)}</td><td class="text">{qa_value(summary[k])}</td></tr>'
                   for k in keys)
    out.append(f"<table>{rows}</table>")
    failed = summary.get("failed_items") or []
    if failed:
        shown = pd.DataFrame(list(failed)[:20])
        out.append(f"<h3>Failed items ({len(failed)}{', first 20' if len(failed) > 20 else ''})</h3>"
                   + frame_table(shown))
    return "".join(out)


def cases_section(cases: pd.DataFrame, name: str, images: pd.DataFrame | None,
                   thumbs: Mapping[str, str]) -> str:
    out = [f"<h2>Worst cases of ensemble {escape(name)}</h2><p class='note'>The {len(cases)} images with the largest "
           "|predicted − true| (cross-validated prediction), with their registered images.</p>"]
    if images is None:
        out.append(missing("No registered images were given: the cases are listed without them."))
    extra = images.set_index("id") if images is not None and len(images) else None
    cards = []
    for _, case in cases.iterrows():
        cid = str(case["id"])
        image = (f'<img src="{escape(thumbs[cid])}" alt="registered image {escape(cid)}">' if cid in thumbs
                 else '<div class="noimg">no image</div>')
        flags = []
        if extra is not None and cid in extra.index:
            row = extra.loc[cid]
            if bool(row.get("registration_doubtful", False)):
                flags.append("registration doubtful")
            if "keypoint_source" in row and isinstance(row["keypoint_source"], str):
                flags.append(f"key points: {row['keypoint_source']}")
        cards.append(f'<div class="case">{image}<b>{escape(cid)}</b> ({"M" if case["male"] else "F"})<br>'
                     f"true {number(case['boneage'])}, predicted {number(case['pred'])}<br>"
                     f"error {float(case['error']):+.1f} months"
                     + (f"<br><span class='meta'>{escape('; '.join(flags))}</span>" if flags else "") + "</div>")
    out.append(f'<div class="cases">{"".join(cards)}</div>')
    return "".join(out)


def gate_effect(oof: pd.DataFrame, kinds: Sequence[str], pred: np.ndarray | None, flags: pd.DataFrame | None,
                 test_gate: pd.DataFrame | None, quantile: float, files: dict[str, bytes]) -> str:
    """The gate's section: cross-fitted on the OOF table, and the test split as scored; adds its PNG."""
    effects, sets, notes = {}, [], []
    if pred is None or oof["fold"].nunique() < 2:
        notes.append("The out-of-fold gate needs an ensemble prediction and at least two folds: not measured.")
    else:
        table = oof.drop(columns=["registration_doubtful", "mask_doubtful"], errors="ignore")
        if flags is None:
            notes.append("No QA flags were given: out of fold, only the threshold checks were applied.")
        else:
            table = table.merge(flags.drop_duplicates("id")[["id", "registration_doubtful", "mask_doubtful"]],
                                on="id", how="left")
        accepted, reasons = gate.cross_fitted(table, kinds, pred, quantile)
        name = f"out of fold, cross-fitted (q={quantile:g})"
        effects[name] = gate.effect(accepted, reasons, pred, table["boneage"])
        effects[name]["rates"] = gate.rates(reasons, pred, {"zone_models_disagree": 1 - quantile})
        sets.append((name, accepted, reasons, np.abs(np.asarray(pred, float) - table["boneage"].to_numpy(float))))
    if test_gate is not None and len(test_gate):
        pred_t, truth = test_gate["boneage_months"].to_numpy(float), test_gate["boneage"].to_numpy(float)
        accepted = test_gate["accepted"].fillna(False).astype(bool).to_numpy()
        reasons = test_gate["reject_reason"].astype(object).where(test_gate["reject_reason"].notna(), None).to_numpy()
        name = "locked test split, shipped thresholds"
        effects[name] = gate.effect(accepted, reasons, pred_t, truth)
        effects[name]["rates"] = gate.rates(reasons, pred_t, {"zone_models_disagree": 1 - quantile})
        sets.append((name, accepted, reasons, np.abs(pred_t - truth)))
        notes.append("Test split: the shipped bundle's thresholds, all set before the split was scored (none on "
                     "it). The zone spread check's nominal rate is the share of images like the training data it "
                     "rejects by construction (its threshold and the scorer test the same statistic: one fold's "
                     "kinds); the measured rate beside it is what it did on the split. Bundles of this version "
                     "have no fold spread check: only the test split could calibrate it.")
    else:
        notes.append("No locked test split was scored: its part is left out.")
    png = None
    if sets:
        files["gate_effect.png"] = figures.plot_gate_effect(sets)
        png = "gate_effect.png"
    return gate_section(effects, notes, png)
