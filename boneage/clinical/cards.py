"""Per-image cards for a person reading the result: the registered hand with the zone boxes, an
occlusion-sensitivity heatmap (how much the ensemble's bone age changes when a patch of the image is
blacked out), the bone age, SDS and interpretation, and the gate's verdict. `boneage score --cards DIR`.

Occlusion sensitivity asks the real ensemble (every fold model of every kind, with the bundle's
weights), not a proxy: a patch that changes the answer a lot is one the answer depends on.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from boneage.registration import frame, prepare
from boneage.clinical import sds
from boneage.data import storage
from boneage.model.augment import ZoneSampler

# Patch side in stored pixels (1040x800 image): 80 px is 160 frame px, about one carpal bone; a 13x10
# grid, 130 occluded copies per image.
PATCH = 80
# Registered images have a black background: a black patch removes that part of the hand.
FILL = 0

Predict = Callable[[torch.Tensor], np.ndarray]


def occlusion_map(predict: Predict, image: np.ndarray, patch: int = PATCH, fill: int = FILL,
                  batch: int = 32) -> np.ndarray:
    """(rows, cols) change of predict's output (occluded minus original) when each patch x patch tile
    of `image` (H, W uint8) is set to `fill`; tile (i, j) covers image[i*patch:(i+1)*patch,
    j*patch:(j+1)*patch]. predict maps a uint8 bank (n, 1, H, W) to n numbers."""
    h, w = image.shape
    rows, cols = -(-h // patch), -(-w // patch)
    base = torch.from_numpy(np.array(image, dtype=np.uint8))[None, None]  # a writable copy
    reference = float(predict(base)[0])
    tiles = [(i, j) for i in range(rows) for j in range(cols)]
    out = np.zeros((rows, cols))
    for start in range(0, len(tiles), batch):
        chunk = tiles[start:start + batch]
        bank = base.repeat(len(chunk), 1, 1, 1)
        for k, (i, j) in enumerate(chunk):
            bank[k, 0, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] = fill
        for (i, j), value in zip(chunk, np.asarray(predict(bank), dtype=float)):
            out[i, j] = value - reference
    return out


def reach(kind, shape: tuple[int, int], patch: int = PATCH) -> np.ndarray:
    """(rows, cols) bool: the tiles whose pixels can change what a model of `kind` (a ModelKind) sees
    in an (H, W) registered image: those that overlap its zone box widened by the sampler's reach (its
    average pooling of k pixels, then bilinear sampling of the pooled image: under 1.5 k pixels; 2 k + 2
    is kept)."""
    h, w = shape
    sx, sy = w / frame.FRAME_W, h / frame.FRAME_H
    x0, y0, bw, bh = kind.box
    margin = 2 * ZoneSampler(kind.box, kind.input_size)._pool_factor(h, w) + 2
    left, right = x0 * sx - margin, (x0 + bw) * sx + margin
    top, bottom = y0 * sy - margin, (y0 + bh) * sy + margin
    rows, cols = np.meshgrid(np.arange(-(-h // patch)), np.arange(-(-w // patch)), indexing="ij")
    return ((cols + 1) * patch > left) & (cols * patch < right) & ((rows + 1) * patch > top) & (rows * patch < bottom)


def ensemble_occlusion(models, sex: str | None, image: np.ndarray, patch: int = PATCH, fill: int = FILL,
                       batch: int = 32) -> np.ndarray:
    """occlusion_map(ensemble_predictor(models, sex), image, patch, fill), with less work for the same
    numbers: a tile that is already all `fill` (the black background) changes nothing, and a fold model
    reads only its zone's crop, so a tile out of its `reach` leaves its prediction as on the whole image.
    Each fold model scores only the occluded copies that can change its output, `batch` copies at a
    time; the ensemble then combines every kind's fold predictions as scoring does."""
    h, w = image.shape
    rows, cols = -(-h // patch), -(-w // patch)
    base = torch.from_numpy(np.array(image, dtype=np.uint8))[None, None]  # a writable copy
    tiles = [(i, j) for i in range(rows) for j in range(cols)
             if (image[i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] != fill).any()]
    sexes = (sex,) if sex in ("F", "M") else ("F", "M")
    zones = {kind: reach(next(z for _, z in models.models[(kind, sexes[0])]), (h, w), patch) for kind in models.kinds}
    reference = {s: models.fold_predictions(base, s) for s in sexes}
    # Every copy starts from the whole image's predictions; the models that can see the tile overwrite theirs.
    occluded = {s: {kind: np.repeat(p, len(tiles), axis=0) for kind, p in reference[s].items()} for s in sexes}
    for start in range(0, len(tiles), batch):
        chunk = tiles[start:start + batch]
        bank = base.repeat(len(chunk), 1, 1, 1)
        for k, (i, j) in enumerate(chunk):
            bank[k, 0, i * patch:(i + 1) * patch, j * patch:(j + 1) * patch] = fill
        for kind, seen in zones.items():
            idx = [k for k, (i, j) in enumerate(chunk) if seen[i, j]]
            for s in sexes if idx else ():
                occluded[s][kind][start + np.array(idx)] = models.kind_predictions(bank, s, kind, idx)
    # The bone age the table gives: the sex's ensemble, or both sexes' mean when the sex is unknown.
    before = np.mean([models.combine(reference[s], s)[1] for s in sexes], axis=0)[0]
    after = np.mean([models.combine(occluded[s], s)[1] for s in sexes], axis=0) if tiles else []
    out = np.zeros((rows, cols))
    for (i, j), value in zip(tiles, after):
        out[i, j] = value - before
    return out


def ensemble_predictor(models, sex: str | None) -> Predict:
    """The bone age the scoring table gives, as a function of the bank: the sex's ensemble, or the mean
    of both sexes' when the sex is unknown. `models`: boneage.score.BundleModels."""
    def predict(bank: torch.Tensor) -> np.ndarray:
        if sex in ("F", "M"):
            return models.score(bank, sex)[1]
        return (models.score(bank, "F")[1] + models.score(bank, "M")[1]) / 2
    return predict


def _fmt(value: Any, spec: str, unit: str = "") -> str:
    return "—" if value is None or pd.isna(value) else f"{value:{spec}}{unit}"


def _bound(row: Mapping[str, Any], name: str) -> float | None:
    value = row.get(name)
    return None if value is None or pd.isna(value) else float(value)


def bone_age_text(row: Mapping[str, Any]) -> str:
    """'bone age 80.3 mo (90% interval 70.1-90.5)': the prediction interval, never the fold spread; a
    row without bounds (a bundle without an interval calibration) says so."""
    text = f"bone age {_fmt(row.get('boneage_months'), '.1f', ' mo')}"
    lower, upper = _bound(row, "boneage_lower_months"), _bound(row, "boneage_upper_months")
    if lower is None or upper is None:
        return text + " (no interval: the bundle has no calibration)"
    level = row.get("interval_level")
    level = f"{float(level):.0%} " if level is not None and not pd.isna(level) else ""
    return text + f" ({level}interval {lower:.1f}-{upper:.1f})"


def sds_interval_text(row: Mapping[str, Any]) -> str:
    lower, upper = _bound(row, "boneage_sds_lower"), _bound(row, "boneage_sds_upper")
    return "" if lower is None or upper is None else f" (interval {lower:+.2f} to {upper:+.2f})"


def _flag_set(row: Mapping[str, Any], name: str) -> bool:
    """A boolean column of a scoring row that is set (True, or 1 after a round trip through a table)."""
    return row.get(name) is True or row.get(name) == 1


def _input_panel(fig: Figure, source: Mapping[str, Any]) -> None:
    """The input as the key point model saw it (the whole image, 16x reduced) with the three key points
    the registration used, from `source` (a registered-table row: keypoint_input, <point>_x/_y in image
    pixels, width, height)."""
    thumb = source.get("keypoint_input")
    if thumb is None or not source.get("width"):
        return
    image = prepare.decode_png(thumb)
    ax = fig.add_axes((0.81, 0.45, 0.18, 0.45))
    ax.imshow(image, cmap="gray", vmin=0, vmax=255)
    sx, sy = image.shape[1] / float(source["width"]), image.shape[0] / float(source["height"])
    for name, colour in zip(frame.KEYPOINT_NAMES, ("#ff4040", "#40c0ff", "#ffd000")):
        x, y = source.get(f"{name}_x"), source.get(f"{name}_y")
        if x is not None and y is not None and not (pd.isna(x) or pd.isna(y)):
            ax.plot(x * sx, y * sy, "o", color=colour, markersize=4, label=name.replace("_", " "))
    ax.set_title(f"input, key points ({source.get('keypoint_source') or '?'})", fontsize=7)
    ax.legend(fontsize=5, loc="lower left", framealpha=0.6)
    ax.set_axis_off()


def card_png(image: np.ndarray, row: Mapping[str, Any], heat: np.ndarray, patch: int = PATCH,
             source: Mapping[str, Any] | None = None) -> bytes:
    """The card as PNG bytes: `image` (stored registered image), `row` (a scoring table row, with
    "interval_level": the bundle's interval level), `heat`
    (occlusion_map's grid), `source` (its registered-table row: the input panel with the key points)."""
    fig = Figure(figsize=(10.4, 6.0), dpi=100)  # registered hand | text | the input with its key points
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.01, 0.02, 0.40, 0.94))
    h, w = image.shape
    ax.imshow(image, cmap="gray", vmin=0, vmax=255, extent=(0, w, h, 0))
    magnitude = np.abs(heat)
    top = max(float(magnitude.max()), 1e-6)
    shown = ax.imshow(magnitude, cmap="inferno", alpha=0.45, vmin=0, vmax=top, interpolation="nearest",
                      extent=(0, heat.shape[1] * patch, heat.shape[0] * patch, 0))
    s = frame.STORE_SCALE
    colours = {"A": "#50a0ff", "B": "#ffaa28", "C": "#5adc78"}
    for name, zone in frame.ZONES.items():
        ax.add_patch(Rectangle((zone.x0 * s, zone.y0 * s), zone.width * s, zone.height * s, fill=False,
                               edgecolor=colours.get(name, "white"), linewidth=1.2))
        ax.text(zone.x0 * s + 4, zone.y0 * s + 14, name, color=colours.get(name, "white"), fontsize=8)
    ax.set_xlim(0, w), ax.set_ylim(h, 0), ax.set_axis_off()
    bar = fig.add_axes((0.42, 0.1, 0.012, 0.5))
    fig.colorbar(shown, cax=bar).set_label("|change of bone age| when the patch is masked (months)", fontsize=7)
    bar.tick_params(labelsize=7)

    accepted = bool(row.get("accepted"))
    sd = row.get("boneage_sd_months")
    lines = [
        (f"{row.get('id')}", 13, "black"),
        (f"sex {row.get('sex') or 'unknown'} ({row.get('sex_source')}),  "
         f"age {_fmt(row.get('chronological_age_months'), '.0f', ' mo')}", 9, "black"),
        (bone_age_text(row), 13, "black"),
        (f"SDS {_fmt(row.get('boneage_sds'), '+.2f')}{sds_interval_text(row)}  "
         f"({sds.SCALE}; SD {_fmt(row.get('reference_sd_months'), '.2f')} mo)", 10, "black"),
        (f"{row.get('boneage_interpretation') or 'no SDS: ' + str(row.get('sds_note'))}", 12, "black"),
        ("ACCEPTED" if accepted else "REJECTED", 14, "#1a7f37" if accepted else "#c0392b"),
    ]
    if not accepted:
        lines += [(f"  {reason}", 9, "#c0392b") for reason in str(row.get("reject_reason")).split(";")]
    if _flag_set(row, "sex_mismatch"):
        lines.append((f"sex {row.get('sex')} given, but P(male) {row.get('p_male'):.2f}: check", 9, "#b26b00"))
    flags = [name for name in ("registration_doubtful", "mask_doubtful") if _flag_set(row, name)]
    lines.append((f"QA: {', '.join(flags) if flags else 'no flags'}", 8, "dimgray"))
    lines.append((f"fold spread {_fmt(sd, '.1f', ' mo')} (how much the fold models disagree; not the error)", 8,
                  "dimgray"))
    lines.append((f"heatmap: largest change {np.abs(heat).max():.1f} mo ({patch}px patches)", 8, "dimgray"))
    if row.get("bundle_sha256"):
        lines.append((f"bundle {str(row['bundle_sha256'])[:12]}", 8, "dimgray"))
    y = 0.93
    for text, size, colour in lines:
        fig.text(0.5, y, text, fontsize=size, color=colour, va="top")
        y -= 0.028 + size * 0.004
    if source is not None:
        _input_panel(fig, source)
    out = BytesIO()
    fig.savefig(out, format="png")
    return out.getvalue()


def card_uri(folder: str, rid: str) -> str:
    """FOLDER/<id>.png. An id's "/" makes subfolders, so a nested input (patientA/study1/IM0001) keeps its
    layout and two studies' IM0001 never collide. ValueError for an id that is not a plain relative
    path (empty, absolute, "." or ".." parts, backslashes, control characters): ids can come from a DICOM
    header (--id-from sop), and such a name could write outside FOLDER."""
    return storage.join_uri(folder, f"{safe_id(rid)}.png")


def safe_id(rid: str) -> str:
    """`rid` when it is a plain relative path (card_uri's rule; also boneage.clinical.dicom_out's folders),
    else ValueError."""
    parts = str(rid).split("/")
    if (not rid or any(p in ("", ".", "..") for p in parts) or "\\" in rid
            or any(ord(c) < 32 or ord(c) == 127 for c in rid)):
        raise ValueError(f"id {rid!r} is not a safe relative file name")
    return rid


def write_cards(rows: pd.DataFrame, table: pd.DataFrame, models, folder: str | None,
                storage_options: Mapping[str, Any] | None = None, patch: int = PATCH,
                pngs: list | None = None, images: list | None = None) -> tuple[list, list]:
    """A card per scored row, at card_uri(FOLDER, id). `rows`: the registered rows (registered_png), `table`:
    their scoring rows, in the same order; `images`: each row's registered image as an array (or None), in
    place of decoding its registered_png (the lean path, boneage.score.register_analysed). Returns (card URI
    or None, error or None) lists: a card that cannot be drawn is an error for its row, not for the run.
    With `pngs` (a list), each row's PNG bytes (or None) are appended to it (for --dicom-out); `folder`
    None then draws without writing a file."""
    uris, errors = [], []
    interval = getattr(models, "interval", None)  # the bundle's interval calibration: its level for the text
    for i, (source, row) in enumerate(zip(rows.to_dict("records"), table.to_dict("records"))):
        row["interval_level"] = interval["level"] if interval else None
        png = source.get("registered_png") if images is None else images[i]
        if pd.isna(row.get("boneage_months")) or png is None:
            if pngs is not None:
                pngs.append(None)
            uris.append(None)
            errors.append("no card: the image has no bone age (see error)")
            continue
        drawn = None
        try:
            uri = card_uri(folder, row["id"]) if folder is not None else None
            image = prepare.decode_png(png) if images is None else png
            heat = ensemble_occlusion(models, row.get("sex"), image, patch)
            drawn = card_png(image, row, heat, patch, source)
            if uri is not None:
                storage.write_bytes(uri, drawn, storage_options)
            uris.append(uri)
            errors.append(None)
        except Exception as err:  # noqa: BLE001 - one image's card must not stop the others
            uris.append(None)
            errors.append(f"card failed: {type(err).__name__}: {err}")
        if pngs is not None:
            pngs.append(drawn)
    return uris, errors
