"""The manifest: one row per input image (and per labelled id whose image is missing), joined with its
labels, carrying status/error from the start. Every later table keeps these rows: nothing is dropped."""

from __future__ import annotations

from typing import Any, Mapping

import pandas as pd

from boneage import io
from boneage.errors import STATUS_ERROR, STATUS_OK, ItemError

MANIFEST_COLUMNS = ("id", "uri", "boneage", "male", "status", "error")


def build_manifest(
    images: str | list[str],
    labels: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
    require_labels: bool = True,
) -> pd.DataFrame:
    """Rows of (id, uri, boneage, male, status, error), sorted by id.

    With `labels`, every image is joined by id (file stem): an image without a usable label row is
    an error row (label_missing, or the label's own error), and a labelled id with no image is an
    error row too (missing_file), so that a typo in a folder name never shrinks a data set silently.
    Two images with the same id (e.g. 12.png and 12.dcm) are both duplicate_id errors.
    """
    uris = io.list_images(images, storage_options=storage_options)
    label_table, label_errors = (
        io.read_labels(labels, storage_options=storage_options, require_age=require_labels)
        if labels
        else (pd.DataFrame(columns=["id", "boneage", "male"]), {})
    )
    by_id = label_table.set_index("id").to_dict("index")

    rows: list[dict[str, Any]] = []
    seen: dict[str, int] = {}
    for uri in uris:
        rid = io.image_id(uri)
        seen[rid] = seen.get(rid, 0) + 1
        row = {"id": rid, "uri": uri, "boneage": None, "male": None, "status": STATUS_OK, "error": None}
        if rid in by_id:
            row["boneage"] = _optional_float(by_id[rid]["boneage"])
            row["male"] = bool(by_id[rid]["male"])
        elif rid in label_errors:
            _fail(row, label_errors[rid])
        elif labels and require_labels:
            _fail(row, ItemError("label_missing", f"id {rid} is not in {labels}"))
        rows.append(row)

    for row in rows:
        if seen[row["id"]] > 1:
            _fail(row, ItemError("duplicate_id", f"{seen[row['id']]} images have id {row['id']}"))

    # Labelled ids with no image, and label rows that could not even give an id: reported, not lost.
    for rid, err in sorted(label_errors.items()):
        if rid not in seen:
            rows.append({"id": rid, "uri": None, "boneage": None, "male": None, "status": STATUS_OK, "error": None})
            _fail(rows[-1], err)
    for rid in sorted(set(by_id) - set(seen)):
        rows.append({"id": rid, "uri": None, "boneage": _optional_float(by_id[rid]["boneage"]),
                     "male": bool(by_id[rid]["male"]), "status": STATUS_OK, "error": None})
        _fail(rows[-1], ItemError("missing_file", f"id {rid} is labelled but no image has that id"))

    manifest = pd.DataFrame(rows, columns=list(MANIFEST_COLUMNS))
    return manifest.sort_values(["id", "uri"], na_position="last", kind="stable").reset_index(drop=True)


def _fail(row: dict[str, Any], err: ItemError) -> None:
    """Mark a row failed; the first error wins (it is the cause, later ones are consequences)."""
    if row["status"] != STATUS_ERROR:
        row["status"] = STATUS_ERROR
        row["error"] = str(err)


def _optional_float(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else float(value)
