"""The report's figures, each a function from tables to PNG bytes. matplotlib through its object API
(Figure + Agg canvas), so writing a report never changes the process's pyplot backend."""

from __future__ import annotations

import io as _bytes_io
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from boneage.validation import ensemble, metrics
from boneage.clinical import gate
from boneage.registration import prepare


SEX_COLOURS = {"F": "#d6604d", "M": "#4393c3"}


THUMB_WIDTH = 200  # px of a worst case's registered image in the report (the image is 800 wide)


def png_bytes(fig: Figure) -> bytes:
    FigureCanvasAgg(fig)
    buf = _bytes_io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return buf.getvalue()


def sexes_of(oof: pd.DataFrame) -> np.ndarray:
    return np.where(oof["male"].to_numpy(bool), "M", "F")


def plot_pred_vs_true(oof: pd.DataFrame, panels: Sequence[tuple[str, np.ndarray]]) -> bytes:
    """Predicted vs true bone age, one panel per (name, prediction), coloured by sex, with y = x."""
    fig = Figure(figsize=(5.2 * len(panels), 5.0))
    y, sex = oof["boneage"].to_numpy(float), sexes_of(oof)
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
    return png_bytes(fig)


def bland_altman(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Mean bias (pred - true) and its 95 % limits of agreement (bias ± 1.96 SD), months."""
    d = np.asarray(pred, float) - np.asarray(y, float)
    d = d[np.isfinite(d)]
    bias, sd = float(d.mean()), float(d.std(ddof=1)) if len(d) > 1 else float("nan")
    return {"bias": bias, "sd": sd, "lower": bias - 1.96 * sd, "upper": bias + 1.96 * sd, "n": int(len(d))}


def plot_bland_altman(oof: pd.DataFrame, name: str, pred: np.ndarray) -> bytes:
    y, sex = oof["boneage"].to_numpy(float), sexes_of(oof)
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
    return png_bytes(fig)


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
    return png_bytes(fig)


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
    return png_bytes(fig)


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
    return png_bytes(fig)


def thumbnail(png: bytes, width: int = THUMB_WIDTH) -> bytes:
    image = prepare.decode_png(png)
    h, w = image.shape
    small = Image.fromarray(image).resize((width, max(1, round(h * width / w))), Image.BILINEAR, reducing_gap=2.0)
    return prepare.encode_png(np.asarray(small), compress_level=6)
