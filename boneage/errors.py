"""Per-item errors. A bad input never crashes a run: it becomes a row with status='error'
and an error string '<code>: <detail>' that later stages carry along unchanged."""

from __future__ import annotations

STATUS_OK = "ok"
STATUS_ERROR = "error"

# The codes a user may meet in an `error` column, with what they mean.
ERROR_CODES = {
    "missing_file": "the file does not exist",
    "empty_file": "the file has zero bytes",
    "truncated": "the image file ends before its data does",
    "not_an_image": "the file is not a PNG, JPEG or DICOM image",
    "corrupt_image": "the file is a PNG or JPEG whose data cannot be decoded (damaged, not cut short)",
    "bad_image": "the image decodes but is unusable (wrong shape, constant, too small)",
    "bad_dicom": "the DICOM file cannot be read or holds no usable pixel data",
    "read_failed": "the file could not be read (permissions, network)",
    "label_missing": "the image has no row in the label table",
    "bad_label": "the bone age is missing, NaN, not a number or outside 0-240 months",
    "unknown_sex": "the sex is missing or not recognised",
    "duplicate_id": "the id occurs more than once",
    "bad_keypoints": "the key point annotation is missing or malformed",
    "processing_failed": "an unexpected error while processing this image (a bug: please report it)",
}


class ItemError(Exception):
    """An error that belongs to one input item; `str(err)` is what goes in the `error` column."""

    def __init__(self, code: str, detail: str = ""):
        if code not in ERROR_CODES:
            raise ValueError(f"unknown error code {code!r}")
        self.code = code
        self.detail = detail
        super().__init__(f"{code}: {detail}" if detail else f"{code}: {ERROR_CODES[code]}")


def error_code(error: str | None) -> str | None:
    """The code part of an `error` column value (None for no error, including pandas' NaN)."""
    if not isinstance(error, str) or not error:
        return None
    return error.split(":", 1)[0]


class RunError(RuntimeError):
    """A whole-run failure whose message already says the cause and the fix: the command line prints
    it without a traceback and exits with status 2."""
