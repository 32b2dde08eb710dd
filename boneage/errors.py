"""Per-item errors. A bad input never crashes a run: it becomes a row with status='error'
and an error string '<code>: <detail>' that later stages carry along unchanged."""

from __future__ import annotations

STATUS_OK = "ok"
STATUS_ERROR = "error"

# The codes a user may meet in an `error` column, with what they mean.
ERROR_CODES = {
    "missing_file": "the file (or the DICOMweb study or instance) does not exist",
    "empty_file": "the file has zero bytes",
    "truncated": "the image file ends before its data does",
    "not_an_image": "the file is not a PNG, JPEG or DICOM image, or the DICOM object is no image (an SR, a PDF)",
    "corrupt_image": "the file is a PNG or JPEG whose data cannot be decoded (damaged, not cut short)",
    "bad_image": "the image decodes but is unusable (wrong shape, constant, too small)",
    "bad_dicom": "the DICOM file cannot be read or holds no usable pixel data",
    "missing_codec": "the DICOM's compression needs a decoder that is not installed: pip install 'boneage[dicom]'",
    "read_failed": "the file could not be read (permissions, network; a DICOMweb time-out or server error)",
    "label_missing": "the image has no row in the label table",
    "bad_label": "the bone age is missing, NaN, not a number or outside 0-240 months",
    "unknown_sex": "the sex is missing or not recognised",
    "duplicate_id": "the id occurs more than once",
    "bad_keypoints": "the key point annotation is missing or malformed",
    "processing_failed": "an unexpected error while processing this image (a bug: please report it)",
}


# Errors of the moment, not of the file (a network failure, a time-out, a throttled S3 request): a resumed
# scoring run scores such rows again instead of keeping them. Every other code is the file's own.
TRANSIENT_CODES = frozenset({"read_failed"})


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


def short(e: BaseException, limit: int = 200) -> str:
    """An exception as error detail: bounded, since it ends up in every output table."""
    text = f"{type(e).__name__}: {e}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


class UserError(ValueError):
    """A whole-run input problem that the user fixes (a wrong path, a CSV without the columns we need,
    a bundle that is missing, damaged or unsafe): the command line prints its message on one line and
    exits with status 2. Anything else that escapes a command is a bug and keeps its traceback.

    A ValueError subclass, so that library callers who caught ValueError before still do."""


class MissingInput(UserError, FileNotFoundError):
    """A file, folder or prefix the user named does not exist."""


class RunError(UserError, RuntimeError):
    """A whole-run failure found while running (e.g. every CV trial would fail the same way), whose
    message already says the cause and the fix."""
