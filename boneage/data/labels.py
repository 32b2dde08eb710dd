"""Tables the user gives: bone age labels, subjects (sex, chronological age) for scoring, and key
point annotations, local or on any fsspec store.

Labels
    :func:`read_labels` reads the RSNA CSV variants into ``id, boneage, male``; :func:`read_subjects`
    the sex and chronological age for scoring. Ids are matched to images as boneage.data.images makes
    them: the path relative to the input root without extension (a cell ``1377.png`` is id ``1377``).
Key points
    :func:`read_keypoints` reads VIA CSV/JSON exports or a plain CSV into (3, 2) arrays in
    the order of :data:`boneage.registration.frame.KEYPOINT_NAMES`; :func:`read_hand21` reads the rsna-dev
    21-point file used for evaluation. VIA stores file names without folders: its ids are file stems.

Per-row problems become :class:`boneage.errors.ItemError` values keyed by id; a table that lacks the
columns we need raises :class:`boneage.errors.UserError` naming the columns found.
"""

from __future__ import annotations

import io
import json
import math
import re
from typing import Any, Iterable, Mapping

import fsspec
import numpy as np
import pandas as pd

from boneage.errors import ItemError, MissingInput, UserError
from boneage.registration.frame import KEYPOINT_NAMES
from boneage.data.images import image_id, relative_id
from boneage.data.patients import patient_group

def _label_id(value: str) -> str:
    """An id from a table cell, as boneage.data.images gives ids: "1377.png" and "1377.0" (a float column's
    artefact) -> "1377"; "patientA/study1/IM0001.dcm" -> "patientA/study1/IM0001"."""
    if re.fullmatch(r"\d+\.0+", value):
        return value.split(".", 1)[0]
    return relative_id(value) if value else ""


# --------------------------------------------------------------------------------------------
# Labels
# --------------------------------------------------------------------------------------------

# Column names are compared after lower-casing and dropping everything but letters and digits.
_ID_COLUMNS = ("id", "imageid", "caseid")
_AGE_COLUMNS = ("boneage", "boneagemonths", "groundtruthboneagemonths")
_MALE_COLUMNS = ("male",)
_SEX_COLUMNS = ("sex", "gender")
# A patient (group) column: the images of one child (follow-ups, both hands, repeats) share a value.
_GROUP_COLUMNS = ("patientid", "patient", "group")
LABEL_VARIANTS = (
    "id,boneage,male  (RSNA train; male True/False, true/false, 1/0)",
    "Image ID,male,Bone Age (months)  (RSNA validation)",
    "Case ID,Sex,Ground truth bone age (months)  (RSNA test; Sex M/F)",
)
MAX_AGE_MONTHS = 240.0

_TRUE = {"true", "t", "1", "1.0", "yes", "y"}
_FALSE = {"false", "f", "0", "0.0", "no", "n"}
_SEX_MALE = {"m", "male"}
_SEX_FEMALE = {"f", "female"}


def _norm_col(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", str(name).lower())


def _find_col(columns: Iterable[str], accepted: tuple[str, ...]) -> str | None:
    for col in columns:
        if _norm_col(col) in accepted:
            return col
    return None


def _read_text(uri: str, storage_options) -> str:
    try:
        with fsspec.open(str(uri), "rt", encoding="utf-8-sig", newline="", **dict(storage_options or {})) as f:
            return f.read()
    except FileNotFoundError:
        raise MissingInput(f"no such file: {uri}") from None
    except UnicodeDecodeError as e:
        raise UserError(f"{uri} is not a text (CSV/JSON) file: {e}") from None


def _read_table(uri: str, storage_options) -> pd.DataFrame:
    """A CSV (comma, semicolon or tab separated) with every cell as a stripped string."""
    text = _read_text(uri, storage_options)
    first = text.split("\n", 1)[0]
    sep = "," if "," in first else "\t" if "\t" in first else ";" if ";" in first else ","
    df = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    df.columns = [str(c).strip() for c in df.columns]
    return df.apply(lambda col: col.str.strip())


def read_labels(
    uri_or_path: str,
    storage_options: Mapping[str, Any] | None = None,
    require_age: bool = True,
) -> tuple[pd.DataFrame, dict[str, ItemError]]:
    """Read a label table into (DataFrame[id: str, boneage: float, male: bool], errors by id).

    With a patient column (``patient_id``, ``patient`` or ``group``) the frame has a ``group`` column too:
    the hashed patient (patient_group; None where the cell is empty: that image is its own group).

    Accepts the RSNA variants in LABEL_VARIANTS (column names matched case- and
    punctuation-insensitively; ids given as file names lose their image extension). Per-row
    problems do not raise, the row goes to ``errors`` instead of the frame:

    * bone age empty, NaN, not a number or outside 0-240 months: bad_label
    * sex not one of the accepted spellings: unknown_sex
    * an id on more than one row: duplicate_id for the id (all its rows are dropped, we cannot
      tell which one is right); this wins over the other codes
    * an empty id: bad_label, keyed ``"<row N>"`` (N = line number in the file)

    With ``require_age=False`` (scoring) the age column may be missing or empty (NaN in the
    result); a value that is present but invalid is still a bad_label. A missing id or sex
    column (or age column when required) raises ValueError naming the columns found.
    """
    df = _read_table(uri_or_path, storage_options)
    id_col = _find_col(df.columns, _ID_COLUMNS)
    age_col = _find_col(df.columns, _AGE_COLUMNS)
    male_col = _find_col(df.columns, _MALE_COLUMNS)
    sex_col = None if male_col else _find_col(df.columns, _SEX_COLUMNS)
    group_col = _find_col(df.columns, _GROUP_COLUMNS)
    missing = [
        what
        for what, col in (("id", id_col), ("bone age", age_col if require_age else True), ("sex", male_col or sex_col))
        if col is None
    ]
    if missing:
        raise UserError(
            f"{uri_or_path}: no {' / '.join(missing)} column; columns found: {list(df.columns)}; "
            f"accepted variants: {'; '.join(LABEL_VARIANTS)}"
        )

    errors: dict[str, ItemError] = {}
    rows: list[tuple] = []
    ids = [_label_id(v) for v in df[id_col]]
    counts = pd.Series(ids).value_counts()
    for i, rid in enumerate(ids):
        line = i + 2  # header is line 1
        if not rid:
            errors[f"<row {line}>"] = ItemError("bad_label", f"line {line}: empty id")
            continue
        if counts[rid] > 1:
            errors[rid] = ItemError("duplicate_id", f"id {rid} is on {counts[rid]} rows")
            continue
        raw_age = df[age_col].iat[i] if age_col else ""
        age, age_problem = _parse_age(raw_age, required=require_age)
        if age_problem:
            errors[rid] = ItemError("bad_label", f"id {rid}: {age_problem}")
            continue
        raw_sex = df[male_col or sex_col].iat[i]
        male = _parse_male(raw_sex) if male_col else _parse_sex(raw_sex)
        if male is None:
            errors[rid] = ItemError("unknown_sex", f"id {rid}: {raw_sex!r}")
            continue
        rows.append((rid, age, male) + ((patient_group(df[group_col].iat[i]),) if group_col else ()))
    out = pd.DataFrame(rows, columns=["id", "boneage", "male"] + (["group"] if group_col else []))
    out = out.astype({"id": str, "boneage": float, "male": bool})
    return out, errors


_CHRONO_AGE_COLUMNS = ("chronologicalage", "chronologicalagemonths", "agemonths", "age")


def read_subjects(uri_or_path: str, storage_options: Mapping[str, Any] | None = None
                  ) -> tuple[pd.DataFrame, dict[str, ItemError]]:
    """For scoring: (DataFrame[id: str, male: bool or None, age_months: float], errors by id) from a CSV
    with an id column and a sex column (any LABEL_VARIANTS spelling) and/or a chronological age in
    months (column age, age_months, chronological_age or chronological_age_months). A bone age
    column, if any, is ignored. Empty sex or age cells are None/NaN; unreadable ones are errors."""
    df = _read_table(uri_or_path, storage_options)
    id_col = _find_col(df.columns, _ID_COLUMNS)
    sex_col = _find_col(df.columns, _MALE_COLUMNS) or _find_col(df.columns, _SEX_COLUMNS)
    age_col = _find_col(df.columns, _CHRONO_AGE_COLUMNS)
    if id_col is None or (sex_col is None and age_col is None):
        raise UserError(f"{uri_or_path}: needs an id column and a sex and/or chronological age column "
                         f"(age_months); columns found: {list(df.columns)}")
    parse_sex = _parse_male if sex_col and _norm_col(sex_col) in _MALE_COLUMNS else _parse_sex
    rows, errors = [], {}
    ids = [_label_id(v) for v in df[id_col]]
    counts = pd.Series(ids).value_counts()
    for i, rid in enumerate(ids):
        if not rid or counts[rid] > 1:
            errors[rid or f"<row {i + 2}>"] = ItemError("duplicate_id" if rid else "bad_label",
                                                        f"id {rid} is on {counts[rid]} rows" if rid else "empty id")
            continue
        raw_sex = df[sex_col].iat[i] if sex_col else ""
        male = parse_sex(raw_sex) if raw_sex else None
        if raw_sex and male is None:
            errors[rid] = ItemError("unknown_sex", f"id {rid}: {raw_sex!r}")
            continue
        age, problem = _parse_age(df[age_col].iat[i] if age_col else "", required=False)
        if problem:
            errors[rid] = ItemError("bad_label", f"id {rid}: chronological age: {problem.replace('bone age ', '')}")
            continue
        rows.append((rid, male, age))
    return pd.DataFrame(rows, columns=["id", "male", "age_months"]).astype({"id": str, "age_months": float}), errors


def _parse_age(raw: str, required: bool) -> tuple[float, str | None]:
    if raw == "" or raw.lower() in ("nan", "na", "n/a", "none", "null"):
        return math.nan, ("bone age is missing" if required else None)
    try:
        age = float(raw)
    except ValueError:
        return math.nan, f"bone age {raw!r} is not a number"
    if not math.isfinite(age) or not 0.0 <= age <= MAX_AGE_MONTHS:
        return math.nan, f"bone age {raw!r} is outside 0-{MAX_AGE_MONTHS:g} months"
    return age, None


def _parse_male(raw: str) -> bool | None:
    s = raw.lower()
    return True if s in _TRUE else False if s in _FALSE else None


def _parse_sex(raw: str) -> bool | None:
    s = raw.lower()
    return True if s in _SEX_MALE else False if s in _SEX_FEMALE else None


# --------------------------------------------------------------------------------------------
# Key points
# --------------------------------------------------------------------------------------------

# Names accepted for the three key points (after lower-casing, spaces/hyphens to "_").
KEYPOINT_ALIASES = {
    "finger_tip": ("finger_tip", "fingertip", "middle_finger_tip", "middle_fingertip", "middle_tip",
                   "tip", "middle", "middle_finger", "finger"),
    "capitate": ("capitate", "capitate_center", "capitate_centre", "cap"),
    "thumb_tip": ("thumb_tip", "thumbtip", "thumb"),
}
_ALIAS_TO_NAME = {alias: name for name, aliases in KEYPOINT_ALIASES.items() for alias in aliases}


def _keypoint_name(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    return _ALIAS_TO_NAME.get(re.sub(r"[\s\-]+", "_", text.strip().lower()))


def read_keypoints(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, np.ndarray], dict[str, ItemError]]:
    """Key point annotations as {id: float (3, 2) array of (x, y)} in KEYPOINT_NAMES order.

    Formats, recognised by content:

    * VIA 2 CSV export (``filename,file_size,file_attributes,region_count,region_id,
      region_shape_attributes,region_attributes``);
    * VIA JSON: a project (``_via_img_metadata``) or the plain per-image export
      (``{key: {"filename", "regions", ...}}``; ``regions`` as a list or VIA 1's dict);
    * plain CSV ``id,finger_tip_x,finger_tip_y,capitate_x,capitate_y,thumb_tip_x,thumb_tip_y``
      (the id column may also be called ``filename`` or ``image``; point names as in VIA).

    VIA regions: ``point`` shapes (also the centre of ``circle``/``ellipse``). The point's
    name is any region attribute value (or key) matching KEYPOINT_ALIASES. If no region of an
    image has any attribute, exactly three regions are taken in order as finger tip,
    capitate, thumb tip (the seed's annotation order). Per-image problems (missing or doubled
    point, unnamed points, bad numbers) are bad_keypoints; an id in two JSON entries or plain
    CSV rows is duplicate_id. Regions with an unrecognised name, and boxes/polygons, are
    ignored (they may be annotations for other purposes). VIA 3 projects are not read.
    """
    text = _read_text(path, storage_options)
    if text.lstrip().startswith("{"):
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}: not valid JSON ({e})") from None
        return _via_json(obj)
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    df.columns = [str(c).strip() for c in df.columns]
    if "region_shape_attributes" in df.columns and "filename" in df.columns:
        return _via_csv(df)
    return _plain_keypoints_csv(df, path)


def _via_csv(df: pd.DataFrame) -> tuple[dict[str, np.ndarray], dict[str, ItemError]]:
    images: dict[str, list[tuple[dict, dict]]] = {}
    order: dict[str, list[int]] = {}
    for i, row in enumerate(df.to_dict("records")):
        rid = image_id(row["filename"])
        images.setdefault(rid, [])
        order.setdefault(rid, [])
        shape = _json_cell(row.get("region_shape_attributes"))
        if not shape:  # VIA writes one row with "{}" for an image without regions
            continue
        try:
            region_index = int(row.get("region_id", i))
        except ValueError:
            region_index = i
        images[rid].append((shape, _json_cell(row.get("region_attributes")) or {}))
        order[rid].append(region_index)
    points, errors = {}, {}
    for rid, regions in images.items():
        regions = [r for _, r in sorted(zip(order[rid], regions), key=lambda t: t[0])]
        _assign_via(rid, regions, points, errors)
    return points, errors


def _json_cell(cell) -> dict | None:
    if not isinstance(cell, str) or not cell.strip():
        return None
    try:
        value = json.loads(cell)
    except json.JSONDecodeError:
        return {"_unparseable": cell}
    return value if isinstance(value, dict) else None


def _via_json(obj: Any) -> tuple[dict[str, np.ndarray], dict[str, ItemError]]:
    if isinstance(obj, dict) and "_via_img_metadata" in obj:
        obj = obj["_via_img_metadata"]
    if not isinstance(obj, dict) or not all(isinstance(v, dict) and "filename" in v for v in obj.values()):
        raise UserError("JSON is neither a VIA project (_via_img_metadata) nor a VIA per-image export")
    points, errors = {}, {}
    seen: dict[str, int] = {}
    for entry in obj.values():
        rid = image_id(entry["filename"])
        seen[rid] = seen.get(rid, 0) + 1
        regions = entry.get("regions") or []
        if isinstance(regions, dict):  # VIA 1: {"0": {...}, "1": {...}}
            regions = [regions[k] for k in sorted(regions, key=lambda k: int(k) if str(k).isdigit() else 0)]
        pairs = [(r.get("shape_attributes") or {}, r.get("region_attributes") or {}) for r in regions]
        _assign_via(rid, pairs, points, errors)
    for rid, n in seen.items():
        if n > 1:
            points.pop(rid, None)
            errors[rid] = ItemError("duplicate_id", f"id {rid} has {n} entries in the VIA file")
    return points, errors


_POINT_SHAPES = ("point", "circle", "ellipse")


def _attr_texts(attrs: dict) -> list[str]:
    """The texts of VIA region attributes that may name a point: text values, the keys of
    set attributes, and the options ticked in checkbox attributes ({"attr": {"option": true}})."""
    texts = []
    for key, value in attrs.items():
        if isinstance(value, dict):
            texts += [str(k) for k, v in value.items() if v]
        elif isinstance(value, str) and value.strip():
            texts += [value, str(key)]
        elif value is True:
            texts.append(str(key))
    return texts


def _point_of(shape: dict) -> tuple[float, float] | None:
    if shape.get("name") in _POINT_SHAPES:
        try:
            x, y = float(shape["cx"]), float(shape["cy"])
        except (KeyError, TypeError, ValueError):
            return None
        if math.isfinite(x) and math.isfinite(y):
            return x, y
    return None


def _assign_via(rid: str, regions: list[tuple[dict, dict]], points: dict, errors: dict) -> None:
    """Turn one image's VIA regions into a (3, 2) array, or record bad_keypoints."""
    if not regions:
        errors[rid] = ItemError("bad_keypoints", f"id {rid}: no regions")
        return
    for shape, _ in regions:
        if "_unparseable" in shape:
            errors[rid] = ItemError("bad_keypoints", f"id {rid}: region shape is not JSON: {shape['_unparseable'][:80]}")
            return
    # Boxes and polygons may be there for other purposes: only point-like regions count.
    regions = [(shape, attrs) for shape, attrs in regions if shape.get("name") in _POINT_SHAPES]
    any_attrs = any(_attr_texts(attrs) for _, attrs in regions)
    named: dict[str, tuple[float, float]] = {}
    ordered: list[tuple[float, float]] = []
    for shape, attrs in regions:
        xy = _point_of(shape)
        if xy is None:
            errors[rid] = ItemError("bad_keypoints", f"id {rid}: point without finite cx, cy: {shape}")
            return
        if not any_attrs:
            ordered.append(xy)
            continue
        candidates = {_keypoint_name(t) for t in _attr_texts(attrs)}
        candidates.discard(None)
        if len(candidates) > 1:
            errors[rid] = ItemError("bad_keypoints", f"id {rid}: region attributes name several points: {attrs}")
            return
        if candidates:
            name = candidates.pop()
            if name in named:
                errors[rid] = ItemError("bad_keypoints", f"id {rid}: {name} is annotated twice")
                return
            named[name] = xy
    if not any_attrs:
        if len(ordered) != 3:
            errors[rid] = ItemError("bad_keypoints", f"id {rid}: {len(ordered)} unnamed points, expected 3")
            return
        points[rid] = np.asarray(ordered, dtype=np.float64)
        return
    lacking = [n for n in KEYPOINT_NAMES if n not in named]
    if lacking:
        errors[rid] = ItemError("bad_keypoints", f"id {rid}: missing {', '.join(lacking)}")
        return
    points[rid] = np.asarray([named[n] for n in KEYPOINT_NAMES], dtype=np.float64)


def _plain_keypoints_csv(df: pd.DataFrame, path: str) -> tuple[dict[str, np.ndarray], dict[str, ItemError]]:
    id_col = _find_col(df.columns, ("id", "imageid", "filename", "image"))
    cols: dict[tuple[str, str], str] = {}
    for col in df.columns:
        m = re.fullmatch(r"(.+?)[_ ]?([xy])", col.strip(), flags=re.IGNORECASE)
        if m and (name := _keypoint_name(m.group(1))):
            cols.setdefault((name, m.group(2).lower()), col)
    needed = [(n, a) for n in KEYPOINT_NAMES for a in "xy"]
    lacking = [f"{n}_{a}" for n, a in needed if (n, a) not in cols]
    if id_col is None or lacking:
        raise UserError(
            f"{path}: not a VIA export and not a plain key point CSV; missing "
            f"{(['id'] if id_col is None else []) + lacking}; columns found: {list(df.columns)}; expected "
            "id,finger_tip_x,finger_tip_y,capitate_x,capitate_y,thumb_tip_x,thumb_tip_y"
        )
    points, errors = {}, {}
    ids = [_label_id(v) for v in df[id_col]]
    counts = pd.Series(ids).value_counts()
    for i, rid in enumerate(ids):
        if counts[rid] > 1:
            errors[rid] = ItemError("duplicate_id", f"id {rid} is on {counts[rid]} rows")
            continue
        try:
            xy = np.array([[float(df[cols[(n, a)]].iat[i]) for a in "xy"] for n in KEYPOINT_NAMES])
        except ValueError:
            xy = None
        if xy is None or not np.isfinite(xy).all():
            errors[rid] = ItemError("bad_keypoints", f"id {rid}: missing or non-numeric coordinates")
            continue
        points[rid] = xy
    return points, errors


# The rsna-dev 21-point hand annotation: wrist, then 4 points per finger from base to tip.
HAND21_NAMES = ("wrist",) + tuple(
    f"{finger}{k}" for finger in ("thumb", "forefinger", "middle_finger", "ring_finger", "pinky_finger")
    for k in range(1, 5)
)
# Which of them are our key points (it has no capitate).
HAND21_TO_KEYPOINTS = {"finger_tip": "middle_finger4", "thumb_tip": "thumb4"}


def read_hand21(
    path: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, dict[str, tuple[float, float]]]:
    """``keypoints_hand21.csv`` as {id: {point name: (x, y)}}; points with empty cells are left out."""
    df = _read_table(path, storage_options)
    id_col = _find_col(df.columns, ("id", "imageid", "filename"))
    if id_col is None:
        raise UserError(f"{path}: no id column; columns found: {list(df.columns)}")
    names = [c[:-2] for c in df.columns if c.endswith("_x") and f"{c[:-2]}_y" in df.columns]
    out: dict[str, dict[str, tuple[float, float]]] = {}
    for i in range(len(df)):
        pts = {}
        for n in names:
            try:
                x, y = float(df[f"{n}_x"].iat[i]), float(df[f"{n}_y"].iat[i])
            except ValueError:
                continue
            if math.isfinite(x) and math.isfinite(y):
                pts[n] = (x, y)
        out[image_id(df[id_col].iat[i])] = pts
    return out
