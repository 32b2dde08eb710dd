"""The manifest: one row per input image (and per labelled id whose image is missing), joined with its
labels, carrying status/error from the start. Every later table keeps these rows: nothing is dropped."""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from concurrent.futures import ThreadPoolExecutor

from boneage.errors import STATUS_ERROR, STATUS_OK, ItemError, UserError
from boneage.data.images import IMAGE_EXTENSIONS, LISTING_THREADS, list_inputs
from boneage.data.labels import read_labels

# group: the hashed patient (boneage.data.labels.patient_group) from the labels' patient column, else a
# DICOM's PatientID; None: the image is its own group (folds and the test split keep a group together).
MANIFEST_COLUMNS = ("id", "uri", "path", "boneage", "male", "group", "status", "error")
ID_SOURCES = ("path", "sop")
UID_COLUMNS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
# Files that cannot be DICOM (by extension): no header read for their UIDs.
_NOT_DICOM = tuple(e for e in IMAGE_EXTENSIONS if e not in (".dcm", ".dicom"))


def build_manifest(
    images: str | list[str],
    labels: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    require_labels: bool = True,
    id_from: str = "path",
    keep_uids: bool = False,
) -> pd.DataFrame:
    """Rows of (id, uri, path, boneage, male, status, error), sorted by id.

    The id (boneage.data.images): the file's path relative to the input root without extension, so a flat
    folder keeps the file stems (RSNA) and nested PACS exports keep apart; `id_from="sop"`: the DICOM's
    SOPInstanceUID instead (files without one keep their path id). `path` is the relative path itself.
    `keep_uids` adds StudyInstanceUID, SeriesInstanceUID and SOPInstanceUID columns (identifiers:
    only when asked for; None for non-DICOM files).

    With `labels`, every image is joined by id: an image without a usable label row is an error row
    (label_missing, or the label's own error), and a labelled id with no image is an error row too
    (missing_file), so that a typo in a folder name never shrinks a data set silently. Two images with
    the same id (the same file listed twice under two names, 12.png beside 12.dcm, or two files of one
    SOPInstanceUID with id_from="sop") are both duplicate_id errors.
    """
    if id_from not in ID_SOURCES:
        raise UserError(f"id_from must be one of {', '.join(ID_SOURCES)}, not {id_from!r}")
    inputs = list_inputs(images, storage_options=storage_options)
    label_table, label_errors = (
        read_labels(labels, storage_options=storage_options, require_age=require_labels)
        if labels
        else (pd.DataFrame(columns=["id", "boneage", "male"]), {})
    )
    # Labelled DICOM without a patient column: the header's PatientID groups them (read for that alone).
    dicom_groups = bool(labels) and "group" not in label_table
    uids = (_read_uids([f.uri for f in inputs], storage_options)
            if (id_from == "sop" or keep_uids or dicom_groups) else {})
    by_id = label_table.set_index("id").to_dict("index")

    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for item in inputs:
        rid = (uids.get(item.uri) or {}).get("SOPInstanceUID") if id_from == "sop" else None
        rid = rid or item.id
        seen[rid] = seen.get(rid, 0) + 1
        header = uids.get(item.uri) or {}
        row = {"id": rid, "uri": item.uri, "path": item.path, "boneage": None, "male": None,
               "group": header.get("group") if dicom_groups else None, "status": STATUS_OK, "error": None,
               "group_from_dicom": dicom_groups}
        if keep_uids:
            row.update({k: header.get(k) for k in UID_COLUMNS})
        if rid in by_id:
            row["boneage"] = _optional_float(by_id[rid]["boneage"])
            row["male"] = bool(by_id[rid]["male"])
            row["group"] = _optional_str(by_id[rid].get("group", row["group"]))
        elif rid in label_errors:
            _fail(row, label_errors[rid])
        elif labels and require_labels:
            _fail(row, ItemError("label_missing", f"id {rid} is not in {labels}"))
        rows.append(row)

    for row in rows:
        if seen[row["id"]] > 1:
            _fail(row, ItemError("duplicate_id", f"{seen[row['id']]} images have id {row['id']}"))
    _fail_mixed_sex_groups(rows)
    for row in rows:
        row.pop("group_from_dicom", None)

    # Labelled ids with no image, and label rows that could not even give an id: reported, not lost.
    for rid, err in sorted(label_errors.items()):
        if rid not in seen:
            rows.append({"id": rid, "uri": None, "path": None, "boneage": None, "male": None, "group": None,
                         "status": STATUS_OK, "error": None})
            _fail(rows[-1], err)
    for rid in sorted(set(by_id) - set(seen)):
        rows.append({"id": rid, "uri": None, "path": None, "boneage": _optional_float(by_id[rid]["boneage"]),
                     "male": bool(by_id[rid]["male"]), "group": _optional_str(by_id[rid].get("group")), "status": STATUS_OK,
                     "error": None})
        _fail(rows[-1], ItemError("missing_file", f"id {rid} is labelled but no image has that id"))

    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS) + (list(UID_COLUMNS) if keep_uids else []))
    return manifest.sort_values(["id", "uri"], na_position="last", kind="stable").reset_index(drop=True)


def _read_uids(uris: list[str], storage_options) -> dict[str, dict[str, str | None]]:
    """{uri: UIDs} of the files that may be DICOM, LISTING_THREADS header reads at a time; a file
    whose header cannot be read has none (its decoding reports why, as an error row)."""
    from boneage.data.dicom import read_uids

    def one(uri):
        try:
            return uri, read_uids(uri, storage_options)
        except ItemError:
            return uri, None

    candidates = [u for u in uris if not u.lower().endswith(_NOT_DICOM)]
    with ThreadPoolExecutor(max(1, min(LISTING_THREADS, len(candidates)))) as pool:
        return {uri: found for uri, found in pool.map(one, candidates) if found}


def _fail_mixed_sex_groups(rows: list[dict[str, Any]]) -> None:
    """A patient whose usable images are labelled with both sexes. From the labels' patient column: a
    label is wrong and we cannot tell which, so all that patient's images become bad_label rows (per-sex
    folds need one sex a patient). From DICOM PatientID: more likely a placeholder that de-identification
    wrote for everyone ("ANON"), so those images are not grouped (each its own patient), said once."""
    sexes: dict[str, set] = {}
    for row in rows:
        if row["group"] is not None and row["status"] == STATUS_OK and row["male"] is not None:
            sexes.setdefault(row["group"], set()).add(row["male"])
    mixed = {group for group, found in sexes.items() if len(found) > 1}
    ungrouped = 0
    for row in rows:
        if row["group"] in mixed and row["status"] == STATUS_OK:
            if row.get("group_from_dicom"):
                row["group"], ungrouped = None, ungrouped + 1
            else:
                _fail(row, ItemError("bad_label", f"patient group {row['group']} has images labelled with both sexes"))
    if ungrouped:
        print(f"[manifest] {ungrouped} DICOM images share a PatientID with images of the other sex (a "
              "placeholder left by de-identification?): not grouped by patient; a patient_id column in the "
              "labels groups them instead")


def _fail(row: dict[str, Any], err: ItemError) -> None:
    """Mark a row failed; the first error wins (it is the cause, later ones are consequences)."""
    if row["status"] != STATUS_ERROR:
        row["status"] = STATUS_ERROR
        row["error"] = str(err)


def _optional_float(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)


def _optional_str(value: Any) -> str | None:
    return None if value is None or pd.isna(value) else str(value)
