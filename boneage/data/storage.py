"""Where files live: local paths, ``file://`` and ``s3://`` URIs, read and written the same way.

Everything goes through fsspec. ``storage_options`` is passed to fsspec unchanged, e.g.
``{"client_kwargs": {"endpoint_url": "http://minio:9000"}}`` for an S3-compatible store; botocore
(under s3fs) also honours ``AWS_ENDPOINT_URL`` / ``AWS_ENDPOINT_URL_S3`` and the usual credential
environment variables when no options are given. Ray Data and pyarrow get the same store through
:func:`arrow_location`.

What is *in* the files is read elsewhere: boneage.data.images (radiographs), boneage.data.dicom, boneage.data.labels
(label tables and key point annotations).
"""

from __future__ import annotations

import json
import os
import posixpath
from typing import IO, Any, Mapping

import fsspec

from boneage.errors import ItemError, short


def filesystem(uri: str, storage_options: Mapping[str, Any] | None = None):
    """(filesystem, path inside it) for a local path or URI."""
    return fsspec.core.url_to_fs(str(uri), **dict(storage_options or {}))


def with_protocol(fs, path: str) -> str:
    """fsspec listings drop the protocol for remote stores; put it back so URIs round-trip."""
    if is_local(fs):
        return path
    return fs.unstrip_protocol(path)


def is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol in ("file", "local")


def is_absolute(uri: str) -> bool:
    return "://" in uri or os.path.isabs(uri)


def read_bytes(uri: str, storage_options: Mapping[str, Any] | None = None) -> bytes:
    """All bytes of one file, or an ItemError (missing_file, empty_file, read_failed)."""
    try:
        fs, path = filesystem(uri, storage_options)
        data = fs.cat_file(path)
    except FileNotFoundError as e:
        raise ItemError("missing_file", str(uri)) from e
    except IsADirectoryError as e:
        raise ItemError("not_an_image", f"{uri} is a folder") from e
    except Exception as e:  # permissions, network, credentials: the item, not the run, fails
        raise ItemError("read_failed", f"{uri}: {short(e)}") from e
    if len(data) == 0:
        raise ItemError("empty_file", str(uri))
    return data


def read_json(uri: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A JSON file's content, or {} where there is none (a stage that did not run)."""
    fs, path = filesystem(uri, storage_options)
    return json.loads(fs.cat_file(path)) if fs.exists(path) else {}


def join_uri(base: str, *parts: str) -> str:
    """Join path parts onto a local path or URI with "/" (``os.path.join`` breaks ``s3://``)."""
    out = str(base)
    for part in parts:
        out = out.rstrip("/") + "/" + str(part).lstrip("/")
    return out


def open_output(uri: str, mode: str = "wb", storage_options: Mapping[str, Any] | None = None) -> IO:
    """Open a file for writing, locally (parent folders created) or on S3; use as a context manager."""
    options = dict(storage_options or {})
    fs, path = filesystem(uri, options)
    if is_local(fs) and any(c in mode for c in "wax"):
        fs.makedirs(posixpath.dirname(path) or ".", exist_ok=True)
    return fs.open(path, mode)


def write_bytes(uri: str, data: bytes, storage_options: Mapping[str, Any] | None = None) -> None:
    """Write ``data`` to a local path or URI in one go (parent folders created locally)."""
    with open_output(uri, "wb", storage_options) as f:
        f.write(data)


def base_name(uri: str | None) -> str | None:
    """The last part of a path or URI (a file's or folder's name), without where it is."""
    return str(uri).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] if uri else None


def strip_protocol(uri: str) -> str:
    """``s3://bucket/key`` → ``bucket/key`` (what pyarrow filesystems take); local paths unchanged."""
    return uri.split("://", 1)[1] if "://" in uri else uri


def arrow_location(uri: str, storage_options: Mapping[str, Any] | None = None) -> tuple[str, Any]:
    """(path, filesystem) as pyarrow and Ray (parquet, RunConfig storage) take them: a remote URI as
    bucket/key with a filesystem built from `storage_options`, a local one as an absolute path with None
    (Ray's storage_path must be absolute)."""
    filesystem = arrow_filesystem(uri, storage_options)
    return (strip_protocol(uri), filesystem) if filesystem is not None else (os.path.abspath(uri), None)


def arrow_filesystem(uri: str, storage_options: Mapping[str, Any] | None = None):
    """A pyarrow filesystem for a remote URI, built from fsspec with the same storage options that
    every other read uses (so one endpoint/credential setting serves all); None for local paths."""
    if "://" not in uri or uri.startswith("file://"):
        return None
    import pyarrow.fs as pafs

    fs, _ = filesystem(uri, storage_options)
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))
