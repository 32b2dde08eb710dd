"""The cross-validation report: one static report.html with its PNGs beside it (relative links, so the
folder can be copied or served from S3 as is). No Ray; matplotlib through its object API (Figure +
Agg canvas), so writing a report never changes the process's pyplot backend.

Every number in it is out-of-fold: the kinds' OOF predictions, the ensembles' cross-validated (never
in-sample) predictions and the per-sex median baseline. Each section says so when its input is
missing (no trials table, no preprocessing summary, no images) instead of failing.

From the pipeline::

    worst = report.worst_cases(oof, ensemble_oof["tune"], n=12)
    images = ray_prepare.read_registered(registered_uri, options, ids=worst["id"].tolist())
    report.write_report(out_uri, oof, kinds, ensembles, ensemble_oof, trials=trials,
                        preprocess_summary=summary, worst_images=images, storage_options=options)
"""

from __future__ import annotations

import datetime as dt
import html
import io as _bytes_io
import math
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from boneage.validation import ensemble, metrics
from boneage.clinical import gate
from boneage.registration import prepare
from boneage.data import storage

SEX_COLOURS = {"F": "#d6604d", "M": "#4393c3"}
THUMB_WIDTH = 200  # px of a worst case's registered image in the report (the image is 800 wide)

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


# -- small helpers --------------------------------------------------------------------------------


def _e(value: Any) -> str:
    return html.escape(str(value))


def _num(value: Any, digits: int = 1) -> str:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return _e(value)
    return "–" if not math.isfinite(v) else f"{v:.{digits}f}"


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _png(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def _sexes(oof: pd.DataFrame) -> np.ndarray:
    return np.where(oof["male"].to_numpy(bool), "M", "F")


def worst_cases(oof: pd.DataFrame, pred: np.ndarray, n: int = 12) -> pd.DataFrame:
    """The n rows with the largest |pred - boneage| (id, male, boneage, pred, error), worst first:
    the ids whose registered images the report shows (read just those: see the module docstring)."""
    out = oof[["id", "male", "boneage"]].reset_index(drop=True).copy()
    out["pred"] = np.asarray(pred, float)
    out["error"] = out["pred"] - out["boneage"]
    out = out[np.isfinite(out["error"])]
    order = np.argsort(-np.abs(out["error"].to_numpy()), kind="stable")[:n]
    return out.iloc[order].reset_index(drop=True)


# -- figures --------------------------------------------------------------------------------------


def plot_pred_vs_true(oof: pd.DataFrame, panels: Sequence[tuple[str, np.ndarray]]) -> bytes:
    """Predicted vs true bone age, one panel per (name, prediction), coloured by sex, with y = x."""
    fig = Figure(figsize=(5.2 * len(panels), 5.0))
    y, sex = oof["boneage"].to_numpy(float), _sexes(oof)
    hi = max(240.0, float(np.nanmax(y)))
    for i, (name, pred) in enumerate(panels, start=1):
        ax = fig.add_subplot(1, len(panels), i)
        ax.plot([0, hi], [0, hi], color="#333", lw=1, ls="--", label="y = x")
        for s, colour in SEX_COLOURS.items():
            m = sex == s
            ax.scatter(y[m], pred[m], s=12, alpha=0.7, color=colour, label=f"{s} (n={int(m.sum())})")
        ax.set(xlim=(0, hi), ylim=(0, hi), xlabel="true bone age (months)", ylabel="predicted (months)",
               title=f"{name}: MAE {ensemble.mae(pred, y):.1f} months")
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def bland_altman(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean bias (pred - true) and its 95 % limits of agreement (bias ± 1.96 SD), months."""
    d = np.asarray(pred, float) - np.asarray(y, float)
    d = d[np.isfinite(d)]
    bias, sd = float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    return {"bias": bias, "sd": sd, "lower": bias - 1.96 * sd, "upper": bias + 1.96 * sd, "n": int(len(d))}


def plot_bland_altman(oof: pd.DataFrame, name: str, pred: np.ndarray) -> bytes:
    y, sex = oof["boneage"].to_numpy(float), _sexes(oof)
    mean, diff = (pred + y) / 2, pred - y
    stats = bland_altman(pred, y)
    fig = Figure(figsize=(8.5, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    for s, colour in SEX_COLOURS.items():
        m = sex == s
        ax.scatter(mean[m], diff[m], s=12, alpha=0.7, color=colour, label=s)
    for value, style, label in ((stats["bias"], "-", "bias"), (stats["lower"], "--", "-1.96 SD"),
                                (stats["upper"], "--", "+1.96 SD")):
        ax.axhline(value, color="#333", ls=style, lw=1)
        ax.annotate(f"{label} {value:+.1f}", (1.0, value), xycoords=("axes fraction", "data"),
                    xytext=(-4, 3), textcoords="offset points", ha="right", fontsize=9,
                    bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
    ax.axhline(0, color="#aaa", lw=0.8)
    ax.set(xlabel="mean of predicted and true (months)", ylabel="predicted - true (months)",
           title=f"Bland-Altman, {name} (n={stats['n']})")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def plot_gate_effect(sets: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> bytes:
    """|predicted - true| of the accepted images and of those rejected for each reason, one panel per
    (name, accepted, reject_reason, absolute error): boxes with every image as a dot."""
    fig = Figure(figsize=(max(6.0, 5.0 * len(sets)), 4.4))
    top = max([1.0] + [float(np.nanmax(e)) for *_, e in sets if np.isfinite(e).any()])
    for i, (name, accepted, reasons, error) in enumerate(sets, start=1):
        ax = fig.add_subplot(1, len(sets), i, sharey=fig.axes[0] if fig.axes else None)
        groups = [("accepted", accepted)] + [
            (reason, gate.rejected_for(reasons, reason)) for reason in gate.REASONS]
        groups = [(label, rows & np.isfinite(error)) for label, rows in groups]
        groups = [(label, rows) for label, rows in groups if rows.any()]
        for x, (label, rows) in enumerate(groups):
            values = error[rows]
            colour = "#1a7f37" if label == "accepted" else "#c0392b"
            if len(values) >= 5:
                ax.boxplot([values], positions=[x], widths=0.5, showfliers=False,
                           medianprops={"color": colour}, boxprops={"color": "#555"})
            jitter = np.random.default_rng(x).uniform(-0.18, 0.18, len(values))  # fixed: the same picture each time
            ax.scatter(x + jitter, values, s=8 if len(values) > 100 else 14, alpha=0.35 if len(values) > 100 else 0.8,
                       color=colour, zorder=3)
            ax.annotate(f"n={len(values)}\nMAE {values.mean():.1f}", (x, 1.0), xycoords=("data", "axes fraction"),
                        xytext=(0, -3), textcoords="offset points", ha="center", va="top", fontsize=8)
        ax.set_xticks(range(len(groups)), [label.replace("_", "\n") for label, _ in groups], fontsize=8)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.set_ylim(0, top * 1.18)
        ax.set(ylabel="|predicted - true| (months)", title=name)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def plot_mae_by_band(table: pd.DataFrame, names: Sequence[str]) -> bytes:
    """Grouped bars: MAE per age band (and overall) for the named rows of a mae_table."""
    groups = ["all", *[label for label, _, _ in metrics.AGE_BANDS]]
    fig = Figure(figsize=(10, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    rows = table.set_index("model")
    width = 0.8 / max(1, len(names))
    x = np.arange(len(groups))
    for i, name in enumerate(names):
        values = [rows.loc[name, f"mae_{g}"] for g in groups]
        ax.bar(x + (i - (len(names) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(x, [f"{g}\n(n={int(rows[f'n_{g}'].max())})" for g in groups])
    ax.set(ylabel="MAE (months)", title="Out-of-fold MAE by age band")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    return _png(fig)


def plot_weights(ensembles: Mapping[str, Mapping[str, Any]]) -> bytes:
    """Per sex: each ensemble's weight of every kind (bars), intercepts in the legend."""
    sexes = [s for s in ensemble.SEXES if any(s in r["by_sex"] for r in ensembles.values())]
    kinds = list(dict.fromkeys(k for r in ensembles.values() for k in r["kinds"]))
    fig = Figure(figsize=(5.2 * max(1, len(sexes)), 3.8))
    width = 0.8 / max(1, len(ensembles))
    for j, sex in enumerate(sexes, start=1):
        ax = fig.add_subplot(1, len(sexes), j)
        x = np.arange(len(kinds))
        for i, (name, record) in enumerate(ensembles.items()):
            fit = record["by_sex"].get(sex)
            if fit is None:
                continue
            ax.bar(x + (i - (len(ensembles) - 1) / 2) * width, [fit["weights"].get(k, 0.0) for k in kinds], width,
                   label=f"{name} (intercept {fit['intercept']:+.1f})")
        ax.set_xticks(x, kinds)
        ax.set(title=f"{sex}: weight of each kind", ylabel="weight")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)


def thumbnail(png: bytes, width: int = THUMB_WIDTH) -> bytes:
    image = prepare.decode_png(png)
    h, w = image.shape
    small = Image.fromarray(image).resize((width, max(1, round(h * width / w))), Image.BILINEAR, reducing_gap=2.0)
    return prepare.encode_png(np.asarray(small), compress_level=6)


# -- sections -------------------------------------------------------------------------------------


def _headline(oof: pd.DataFrame, table: pd.DataFrame, primary: str | None, names: Sequence[str],
              ensembles: Mapping[str, Mapping[str, Any]]) -> str:
    rows = table.set_index("model")
    kind_rows = rows[rows["role"] == "kind"]
    best_kind = kind_rows["mae_all"].idxmin() if kind_rows["mae_all"].notna().any() else None
    cards = []
    if primary is not None:
        record = ensembles.get(primary, {})
        note = "nested CV" if record.get("nested") else "CV over folds"
        cards.append(("primary", f"{_num(rows.loc[primary, 'mae_all'], 2)}",
                      f"ensemble <b>{_e(primary)}</b>, months MAE ({note})"))
    for name in [n for n in names if n != primary]:
        cards.append(("", _num(rows.loc[name, "mae_all"], 2), f"ensemble <b>{_e(name)}</b>, months MAE"))
    if best_kind is not None:
        cards.append(("", _num(rows.loc[best_kind, "mae_all"], 2), f"lowest single kind <b>{_e(best_kind)}</b> (picked on these labels: optimistic)"))
    cards.append(("", _num(rows.loc["per-sex median", "mae_all"], 2), "per-sex median (learns nothing but sex)"))
    male = oof["male"].to_numpy(bool)
    cards.append(("", f"{len(oof)}", f"images ({int((~male).sum())} F, {int(male.sum())} M), "
                                     f"{oof['fold'].nunique()} folds"))
    body = "".join(f'<div class="card {c}"><div class="value">{v}</div><div class="label">{label}</div></div>'
                   for c, v, label in cards)
    return f'<div class="headline">{body}</div>'


def _accuracy_table(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per group ({group: metrics.accuracy}), a column per metric, with intervals if any."""
    head = "".join(f"<th>{_e(metrics.METRIC_NAMES[m])}</th>" for m in metrics.METRICS)
    body = []
    for group, acc in rows.items():
        cells = []
        for m in metrics.METRICS:
            pct = m == "within_12"
            fmt = (lambda v: f"{100 * v:.0f} %") if pct else (lambda v: _num(v, 2))
            text = fmt(acc[m]) if m in acc else "–"
            if m in acc.get("ci", {}):
                lo, hi = acc["ci"][m]
                text += f"<br><span class='meta'>{fmt(lo)} … {fmt(hi)}</span>"
            cells.append(f"<td>{text}</td>")
        body.append(f"<tr><td class='text'>{_e(group)}</td><td>{acc.get('n', 0)}</td>{''.join(cells)}</tr>")
    return f"<table><tr><th class='text'>group</th><th>n</th>{head}</tr>{''.join(body)}</table>"


def _test_section(test: Mapping[str, Any] | None, png: str | None) -> str:
    """The locked test split, scored by the shipped bundle: the report's headline."""
    out = ["<h2>Locked test split: the shipped bundle</h2>"]
    if not test or not test.get("accuracy", {}).get("all", {}).get("n"):
        return "".join(out) + _missing("No locked test split was scored (test_fraction 0 and no --test-images).")
    acc = test["accuracy"]
    a = acc["all"]
    ci = a.get("ci", {})
    cards = [("primary", _num(a["mae"], 2), f"months MAE, 95 % interval {_num(ci.get('mae', [np.nan])[0], 2)} … "
                                           f"{_num(ci.get('mae', [np.nan, np.nan])[1], 2)}"),
             ("", _num(a["rmse"], 2), "months RMSE"),
             ("", f"{100 * a['within_12']:.0f} %", "within ±12 months"),
             ("", f"{a['bias']:+.2f}", "months bias (predicted − true)"),
             ("", f"{test['scored']}/{test['images']}", "test images scored")]
    out.append('<div class="headline">' + "".join(
        f'<div class="card {c}"><div class="value">{v}</div><div class="label">{label}</div></div>'
        for c, v, label in cards) + "</div>")
    out.append(f"<p class='note'>Images set aside before anything was fit ({_e(test.get('source', ''))}): no stage "
               "saw their labels. The finished bundle scored them through <code>boneage score</code> (fold-averaged "
               f"models, ensemble, QA). Intervals: 95 % bootstrap over images ({test.get('bootstrap_resamples')} "
               "resamples).</p>")
    out.append(_accuracy_table({"all": a, **acc.get("by_sex", {}), **acc.get("by_age_band", {})}))
    if test.get("failed"):
        out.append("<p class='note'>Not scored: " + ", ".join(f"{_e(f['id'])} ({_e(f['error'])})"
                                                            for f in test["failed"]) + "</p>")
    if png:
        out.append(f'<img class="plot" src="{_e(png)}" alt="test split: predicted vs true">')
    return "".join(out)


def _mae_section(table: pd.DataFrame, png: str) -> str:
    groups = ["all", "F", "M", *[label for label, _, _ in metrics.AGE_BANDS]]
    head = "".join(f"<th>{_e(g)}<br><span class='meta'>n={int(table[f'n_{g}'].max())}</span></th>" for g in groups)
    best = {g: table.loc[table["role"] != "baseline", f"mae_{g}"].min() for g in groups}
    body = []
    for _, row in table.iterrows():
        cells = []
        for g in groups:
            mae, n, full = row[f"mae_{g}"], int(row[f"n_{g}"]), int(table[f"n_{g}"].max())
            extra = f" <span class='meta'>(n={n})</span>" if n != full else ""
            cls = ' class="best"' if np.isfinite(mae) and mae == best[g] and row["role"] != "baseline" else ""
            cells.append(f"<td{cls}>{_num(mae)}{extra}</td>")
        body.append(f'<tr class="{_e(row["role"])}"><td class="text">{_e(row["model"])}</td>'
                    f'<td class="text">{_e(row["role"])}</td>{"".join(cells)}</tr>')
    return (f"<h2>Out-of-fold MAE (months)</h2>"
            f"<p class='note'>Each kind: its sex's model of that kind, scored on the fold it did not train on. "
            f"Ensembles: weights refit without the scored fold (cross-validated over the OOF table). "
            f"Bold: lowest in the column. Age bands by true bone age.</p>"
            f'<table><tr><th class="text">model</th><th class="text">role</th>{head}</tr>{"".join(body)}</table>'
            f'<img class="plot" src="{_e(png)}" alt="MAE by age band">')


def _weights_section(ensembles: Mapping[str, Mapping[str, Any]], png: str | None) -> str:
    if not ensembles:
        return "<h2>Ensemble weights</h2>" + _missing("No ensemble was given.")
    kinds = list(dict.fromkeys(k for r in ensembles.values() for k in r["kinds"]))
    head = "".join(f"<th>{_e(k)}</th>" for k in kinds)
    rows = []
    for name, record in ensembles.items():
        for sex, fit in record["by_sex"].items():
            cv_mae = record.get("cv_mae", {}).get(sex)
            excluded = record.get("excluded", {}).get(sex) or []
            cells = "".join(f"<td>{_num(fit['weights'].get(k, 0.0), 3)}</td>" for k in kinds)
            rows.append(f'<tr><td class="text">{_e(name)}</td><td class="text">{_e(sex)}</td>'
                        f"<td>{_num(fit['intercept'], 2)}</td>{cells}<td>{_num(cv_mae, 2)}</td>"
                        f'<td class="text">{_e(", ".join(excluded)) or "–"}</td></tr>')
    notes = []
    for name, record in ensembles.items():
        if record.get("method") == "tune":
            sel = record.get("selection_cv_mae", {}).get("all")
            honest = "nested CV (setting chosen without the scored fold)" if record.get("nested") else \
                "the chosen setting's own CV MAE: optimistic by the selection (fewer than 3 folds, no nested CV)"
            notes.append(f"<b>{_e(name)}</b>: Ray Tune over {len(record.get('trials', []))} settings of a gradient "
                         f"fit; chosen setting {_e(_config_text(record.get('config', {})))}; its CV MAE "
                         f"{_num(sel, 2)} months picked it (optimistic), the CV MAE in the table is {honest}.")
        else:
            notes.append(f"<b>{_e(name)}</b>: direct solver ({_e(record.get('method'))}), weights refit per fold.")
    image = f'<img class="plot" src="{_e(png)}" alt="ensemble weights">' if png else ""
    return ("<h2>Ensemble weights</h2><p class='note'>age = intercept + Σ weight × kind's prediction, per sex, "
            "weights ≥ 0; fit on all out-of-fold rows (what scores new images). CV MAE: months, cross-validated. "
            "Excluded: kinds with a missing OOF prediction for that sex.</p>"
            f'<table><tr><th class="text">ensemble</th><th class="text">sex</th><th>intercept</th>{head}'
            f'<th>CV MAE</th><th class="text">excluded</th></tr>{"".join(rows)}</table>'
            + "".join(f"<p class='note'>{n}</p>" for n in notes) + image)


def _config_text(config: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={_num(v, 4) if isinstance(v, float) else v}" for k, v in config.items())


def _tune_trials(ensembles: Mapping[str, Mapping[str, Any]]) -> str:
    out = []
    for name, record in ensembles.items():
        trials = record.get("trials")
        if not trials:
            continue
        frame = pd.DataFrame(trials).sort_values("cv_mae", kind="stable")
        out.append(f"<h3>Ray Tune settings of ensemble {_e(name)} ({len(frame)} trials, best first)</h3>"
                   + _frame_table(frame, digits=2, general=("lr", "huber_delta", "shrink", "seconds")))
    return "".join(out)


def _frame_table(frame: pd.DataFrame, digits: int = 1, general: Sequence[str] = ()) -> str:
    """A plain HTML table of a small frame: numbers right-aligned to `digits` decimals (the columns
    in `general` to 3 significant digits), text left-aligned and escaped."""
    def numeric(column: str) -> bool:
        return pd.api.types.is_numeric_dtype(frame[column]) and not pd.api.types.is_bool_dtype(frame[column])

    head = "".join(f"<th>{_e(c)}</th>" if numeric(c) else f'<th class="text">{_e(c)}</th>' for c in frame.columns)
    rows = []
    for _, row in frame.iterrows():
        cells = []
        for column, value in row.items():
            if not numeric(column) or value is None:
                cells.append(f'<td class="text">{_e(value)}</td>')
            elif pd.api.types.is_integer_dtype(frame[column]):
                cells.append(f"<td>{int(value)}</td>")
            elif column in general:
                cells.append(f"<td>{float(value):.3g}</td>" if np.isfinite(value) else "<td>–</td>")
            else:
                cells.append(f"<td>{_num(value, digits)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f"<table><tr>{head}</tr>{''.join(rows)}</table>"


def _sex_section(sex: Mapping[str, Any] | None) -> str:
    """The sex classifier's out-of-fold ROC AUC and accuracy, overall and by age band ('' without one)."""
    if not sex:
        return ""
    low, high = sex.get("unsure_between", (0.2, 0.8))
    rows = "".join(
        f'<tr><td class="text">{_e(group)}</td><td>{a.get("n", 0)}</td><td>{_num(a.get("auc"), 3)}</td>'
        f'<td>{_num(100 * a.get("accuracy", float("nan")), 1)}</td><td>{_num(100 * a.get("unsure", float("nan")), 1)}</td>'
        f'<td>{_num(100 * a.get("accuracy_sure", float("nan")), 1)}</td></tr>'
        for group, a in {"all": sex.get("all", {}), **sex.get("by_age_band", {})}.items())
    return (f"<h2>Sex classifier {_e(sex.get('kind', ''))} (out of fold)</h2><p class='note'>P(male) of every "
            "image from the fold model that never saw it (trained on both sexes pooled, in the same folds; not part "
            f"of the ensemble). Scoring uses the predicted sex of an image of unknown sex when P(male) ≤ {low} or ≥ "
            f"{high}; in between it is unsure and the image gets the mean of both sexes' readings. Accuracy at 0.5; "
            "unsure: share of images in between; sure: accuracy of the others. Age bands by true bone age.</p>"
            '<table><tr><th class="text">group</th><th>n</th><th>ROC AUC</th><th>accuracy %</th><th>unsure %</th>'
            f"<th>accuracy of the sure %</th></tr>{rows}</table>")


def _gate_section(effects: Mapping[str, Mapping[str, Any]], notes: Sequence[str], png: str | None) -> str:
    """The rejection gate's effect on labelled images: {set name: gate.effect(...)}."""
    out = ["<h2>Rejection gate: its effect</h2><p class='note'>What <code>boneage score</code>'s gate "
           "(<code>accepted</code>, <code>reject_reason</code>; docs/scoring.md) does to the error on images "
           "with labels. Out of fold: the ensemble's cross-validated prediction, gated with thresholds "
           "calibrated on the other folds only (each fold in turn), so no row sets the threshold it is judged by; "
           "the fold spread check cannot run there (each row was predicted by one fold model). A row rejected "
           "for several reasons counts under each.</p>"]
    out += [f"<p class='note'>{_e(n)}</p>" for n in notes]
    if not effects:
        return "".join(out)
    head = "".join(f"<th>{_e(name)}</th>" for name in effects)

    def row(label: str, cell, key: str) -> str:
        return (f'<tr data-row="{_e(key)}"><td class="text">{label}</td>'
                + "".join(f"<td>{cell(e)}</td>" for e in effects.values()) + "</tr>")

    rows = [row("images", lambda e: e["images"], "images"),
            row("rejected", lambda e: f"{e['rejected']} ({_num(100 * e['rejected_fraction'], 1)} %)", "rejected"),
            row("MAE of the accepted (n)", lambda e: f"{_num(e['mae_accepted'], 2)} ({e['n_accepted_scored']})",
                "mae_accepted"),
            row("MAE of the rejected (n)", lambda e: f"{_num(e['mae_rejected'], 2)} ({e['n_rejected_scored']})",
                "mae_rejected")]
    for reason in gate.REASONS:
        if any(reason in e["by_reason"] for e in effects.values()):
            rows.append(row(f"&nbsp;&nbsp;{_e(reason)}: n, MAE", lambda e, r=reason: (
                f"{e['by_reason'][r]['n']}, {_num(e['by_reason'][r]['mae'], 1)}" if r in e["by_reason"] else "0"),
                reason))
    out.append(f'<table class="gate"><tr><th class="text">months</th>{head}</tr>{"".join(rows)}</table>')
    if png:
        out.append(f'<img class="plot" src="{_e(png)}" alt="error of accepted and rejected images">')
    return "".join(out)


def _trials_section(trials: pd.DataFrame | None, ensembles) -> str:
    out = ["<h2>Trials</h2>"]
    if trials is None or len(trials) == 0:
        out.append(_missing("No CV trials table was given (cv/trials.parquet)."))
    else:
        summary = trials.groupby(["kind", "sex"], sort=True).agg(
            trials=("trial", "size") if "trial" in trials else ("fold", "size"),
            select_mae=("select_mae", "mean"), oof_mae=("oof_mae", "mean"), best_epoch=("best_epoch", "mean"),
            epochs_run=("epochs_run", "mean"), seconds=("seconds", "sum")).reset_index()
        total = float(trials["seconds"].sum()) if "seconds" in trials else float("nan")
        out.append(f"<p class='note'>{len(trials)} CV trials, {_num(total / 60, 1)} trial-minutes in all. "
                   "select_mae: MAE on the trial's selection split (carved from its training folds; it chose "
                   "the epoch; – for a fixed schedule); oof_mae: the chosen model's MAE on the scored fold, "
                   "which chose nothing (months, means over folds); best_epoch, epochs_run: means over folds; "
                   "seconds: sum.</p>")
        out.append(_frame_table(summary))
    out.append(_tune_trials(ensembles))
    return "".join(out)


def _qa_value(value: Any) -> str:
    if isinstance(value, Mapping):
        if not value:
            return "–"
        return ("<table>" + "".join(f'<tr><td class="text">{_e(k)}</td><td>{_qa_value(v)}</td></tr>'
                                    for k, v in value.items()) + "</table>")
    if isinstance(value, float):
        return _num(value, 2)
    if value is None:
        return "–"
    return _e(value)


def _qa_section(summary: Mapping[str, Any] | None) -> str:
    out = ["<h2>Registration QA</h2>"]
    if not summary:
        out.append(_missing("No preprocessing summary was given (qa/preprocess_summary.json)."))
        return "".join(out)
    order = ["items", "ok", "errors", "errors_by_code", "registration_doubtful", "mask_doubtful",
             "keypoint_model", "keypoint_error_on_held_out_annotations", "seconds"]
    keys = [k for k in order if k in summary] + [k for k in summary if k not in order and k != "failed_items"]
    rows = "".join(f'<tr><td class="text">{_e(k)}</td><td class="text">{_qa_value(summary[k])}</td></tr>'
                   for k in keys)
    out.append(f"<table>{rows}</table>")
    failed = summary.get("failed_items") or []
    if failed:
        shown = pd.DataFrame(list(failed)[:20])
        out.append(f"<h3>Failed items ({len(failed)}{', first 20' if len(failed) > 20 else ''})</h3>"
                   + _frame_table(shown))
    return "".join(out)


def _cases_section(cases: pd.DataFrame, name: str, images: pd.DataFrame | None,
                   thumbs: Mapping[str, str]) -> str:
    out = [f"<h2>Worst cases of ensemble {_e(name)}</h2><p class='note'>The {len(cases)} images with the largest "
           "|predicted − true| (cross-validated prediction), with their registered images.</p>"]
    if images is None:
        out.append(_missing("No registered images were given: the cases are listed without them."))
    extra = images.set_index("id") if images is not None and len(images) else None
    cards = []
    for _, case in cases.iterrows():
        cid = str(case["id"])
        image = (f'<img src="{_e(thumbs[cid])}" alt="registered image {_e(cid)}">' if cid in thumbs
                 else '<div class="noimg">no image</div>')
        flags = []
        if extra is not None and cid in extra.index:
            row = extra.loc[cid]
            if bool(row.get("registration_doubtful", False)):
                flags.append("registration doubtful")
            if "keypoint_source" in row and isinstance(row["keypoint_source"], str):
                flags.append(f"key points: {row['keypoint_source']}")
        cards.append(f'<div class="case">{image}<b>{_e(cid)}</b> ({"M" if case["male"] else "F"})<br>'
                     f"true {_num(case['boneage'])}, predicted {_num(case['pred'])}<br>"
                     f"error {float(case['error']):+.1f} months"
                     + (f"<br><span class='meta'>{_e('; '.join(flags))}</span>" if flags else "") + "</div>")
    out.append(f'<div class="cases">{"".join(cards)}</div>')
    return "".join(out)


def _gate_effect(oof: pd.DataFrame, kinds: Sequence[str], pred: np.ndarray | None, flags: pd.DataFrame | None,
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
        sets.append((name, accepted, reasons, np.abs(np.asarray(pred, float) - table["boneage"].to_numpy(float))))
    if test_gate is not None and len(test_gate):
        pred_t, truth = test_gate["boneage_months"].to_numpy(float), test_gate["boneage"].to_numpy(float)
        accepted = test_gate["accepted"].fillna(False).astype(bool).to_numpy()
        reasons = test_gate["reject_reason"].astype(object).where(test_gate["reject_reason"].notna(), None).to_numpy()
        name = "locked test split, shipped thresholds"
        effects[name] = gate.effect(accepted, reasons, pred_t, truth)
        sets.append((name, accepted, reasons, np.abs(pred_t - truth)))
        notes.append("Test split: the shipped bundle's thresholds; its fold spread threshold is the 99th "
                     "percentile of these same images' spreads (no labels), so about 1 in 100 is rejected for it "
                     "by construction.")
    else:
        notes.append("No locked test split was scored: its part is left out.")
    png = None
    if sets:
        files["gate_effect.png"] = plot_gate_effect(sets)
        png = "gate_effect.png"
    return _gate_section(effects, notes, png)


# -- the report -----------------------------------------------------------------------------------


def write_report(out_uri: str, oof: pd.DataFrame, kinds: Sequence[str],
                 ensembles: Mapping[str, Mapping[str, Any]], ensemble_oof: Mapping[str, np.ndarray], *,
                 trials: pd.DataFrame | None = None, preprocess_summary: Mapping[str, Any] | None = None,
                 worst_images: pd.DataFrame | None = None, primary: str | None = None, n_worst: int = 12,
                 storage_options: Mapping[str, Any] | None = None,
                 test: Mapping[str, Any] | None = None, test_table: pd.DataFrame | None = None,
                 sex_classifier: Mapping[str, Any] | None = None,
                 gate_flags: pd.DataFrame | None = None, test_gate: pd.DataFrame | None = None,
                 gate_quantile: float = gate.QUANTILE,
                 title: str = "Bone age: accuracy report") -> str:
    """Write `out_uri`/report.html and its PNGs (local folder or s3://); return the report's URI.

    oof: the OOF table (id, male, boneage, fold, one column per kind). ensembles: {name: weights
    record}; ensemble_oof: {name: its cross-validated prediction of every oof row}; primary: the
    ensemble of the headline, Bland-Altman and worst cases (the first one by default). worst_images:
    rows with id and registered_png (and optionally registration_doubtful, keypoint_source) for the
    worst cases' thumbnails. test: the locked test split's result (run.evaluate_test), test_table its
    rows (boneage, male, pred) for the plot; they come first. sex_classifier: cv/summary.json's
    "sex_classifier" (its section is left out without one). gate_flags: id, registration_doubtful,
    mask_doubtful of the oof rows (the registered table's QA flags) for the rejection gate's effect,
    cross-fitted on the OOF table with `gate_quantile`; test_gate: the locked test split's rows (boneage,
    boneage_months, accepted, reject_reason), gated with the shipped thresholds. Anything else missing is
    said in its section."""
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
    files["mae_by_band.png"] = plot_mae_by_band(table, band_names)
    panels = [(n, ensemble_oof[n]) for n in ensemble_oof][:2]
    if best_kind:
        panels.append((f"lowest kind {best_kind}", oof[best_kind].to_numpy(float)))
    test_png = None
    if test_table is not None and len(test_table):
        files["test_pred_vs_true.png"] = plot_pred_vs_true(
            test_table, [("shipped bundle, locked test split", test_table["pred"].to_numpy(float))])
        test_png = "test_pred_vs_true.png"
    sections = [f"<h1>{_e(title)}</h1><p class='meta'>written {_e(dt.datetime.now().strftime('%Y-%m-%d %H:%M'))}; "
                "months</p>",
                _test_section(test, test_png),
                "<h2>Cross-validation (out of fold)</h2><p class='note'>Every image predicted by models that "
                "never saw its label; no trial chose anything on the fold it scores (its epoch came from a selection "
                "split of its training folds, or a fixed schedule), and the ensemble's weights (and its Tune "
                "setting) were fit without the fold they predict.</p>",
                _headline(oof, table, primary, list(ensemble_oof), ensembles),
                _mae_section(table, "mae_by_band.png")]
    if primary is not None:
        sections.append(f"<p class='note'>Ensemble {_e(primary)}, out of fold, every metric:</p>")
        acc = metrics.accuracy_report(ensemble_oof[primary], y, oof["male"].to_numpy(bool))
        sections.append(_accuracy_table({"all": acc["all"], **acc["by_sex"], **acc["by_age_band"]}))

    sections.append("<h2>Predicted vs true</h2>")
    if panels:
        files["pred_vs_true.png"] = plot_pred_vs_true(oof, panels)
        sections.append('<img class="plot" src="pred_vs_true.png" alt="predicted vs true">')
    else:
        sections.append(_missing("No model predictions to plot."))

    sections.append("<h2>Bland-Altman</h2>")
    if primary is not None:
        pred = ensemble_oof[primary]
        files["bland_altman.png"] = plot_bland_altman(oof, primary, pred)
        stats = bland_altman(pred, y)
        by_sex = {s: bland_altman(pred[_sexes(oof) == s], y[_sexes(oof) == s]) for s in ensemble.SEXES
                  if (_sexes(oof) == s).sum() > 1}
        rows = "".join(f'<tr><td class="text">{_e(g)}</td><td>{st["n"]}</td><td>{_num(st["bias"], 2)}</td>'
                       f'<td>{_num(st["sd"], 2)}</td><td>{_num(st["lower"], 1)} … {_num(st["upper"], 1)}</td></tr>'
                       for g, st in {"all": stats, **by_sex}.items())
        sections.append(f"<p class='note'>Ensemble {_e(primary)}: difference predicted − true against their "
                        "mean; a slope shows the ensemble pulling ages towards the mean.</p>"
                        '<table><tr><th class="text">group</th><th>n</th><th>bias</th><th>SD</th>'
                        f"<th>95 % limits</th></tr>{rows}</table>"
                        '<img class="plot" src="bland_altman.png" alt="Bland-Altman plot">')
    else:
        sections.append(_missing("No ensemble prediction was given."))

    weighted = {n: r for n, r in ensembles.items() if r.get("by_sex")}
    if weighted:
        files["weights.png"] = plot_weights(weighted)
    sections.append(_weights_section(weighted, "weights.png" if weighted else None))

    if primary is not None:
        cases = worst_cases(oof, ensemble_oof[primary], n_worst)
        thumbs: dict[str, str] = {}
        if worst_images is not None and len(worst_images):
            pngs = worst_images.drop_duplicates("id").set_index("id")["registered_png"]
            for i, cid in enumerate(cases["id"].astype(str), start=1):
                data = pngs.get(cid)
                if isinstance(data, (bytes, bytearray)) and data:
                    name = f"worst_{i:02d}.png"
                    files[name] = thumbnail(bytes(data))
                    thumbs[cid] = name
        sections.append(_cases_section(cases, primary, worst_images, thumbs))
    else:
        sections.append("<h2>Worst cases</h2>" + _missing("No ensemble prediction was given."))

    sections.append(_sex_section(sex_classifier))
    sections.append(_gate_effect(oof, kinds, ensemble_oof.get(primary) if primary is not None else None,
                                 gate_flags, test_gate, gate_quantile, files))
    sections.append(_qa_section(preprocess_summary))
    sections.append(_trials_section(trials, ensembles))

    page = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{CSS}</style></head><body>{''.join(sections)}</body></html>")
    for name, data in files.items():
        storage.write_bytes(storage.join_uri(out_uri, name), data, storage_options)
    report_uri = storage.join_uri(out_uri, "report.html")
    storage.write_bytes(report_uri, page.encode("utf-8"), storage_options)
    return report_uri
