"""A DICOMweb service (a PACS) as the input of `boneage score`, and the way back for its results, with
dicomweb-client (the `pacs` extra). See docs/pacs.md.

    dicomweb+http://host:8042/dicom-web  --studies FILE | --qido 'Modality=CR&StudyDate=20240101-20240131'
        ─► list_instances (QIDO-RS, on the driver: UIDs only) ─► manifest_rows: one row per instance
        ─► Reader (WADO-RS, one instance at a time, in Ray Data's preparation tasks) ─► the usual decoding

An instance's `uri` is INPUT/studies/<study>/series/<series>/instances/<sop> (no credentials), its `id`
the SOPInstanceUID. Credentials come from the environment (CREDENTIAL_ENV) or a JSON file, never from the
command line; `Service` keeps them out of its repr, and no message here quotes them.

What the service says is mapped onto the project's errors: the whole run's (cannot reach the service,
credentials refused, a time-out while listing) are UserErrors, one line; one instance's (gone since
the listing: missing_file; a time-out or a server error: read_failed, retried by a resumed run; an
object that is not an image: not_an_image) are ItemErrors, its row.
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qsl, urlsplit

import pandas as pd

# dicomweb-client's retry library logs every retried failure with its traceback: the row's error, or the
# run's one line, says what failed.
logging.getLogger("retrying").setLevel(logging.CRITICAL)

from boneage.errors import STATUS_ERROR, STATUS_OK, ItemError, UserError, short

SCHEMES = ("dicomweb+http", "dicomweb+https")
# Where the credentials come from when no --dicomweb-auth file is given: a user and password (HTTP Basic)
# or a bearer token.
USER_ENV, PASSWORD_ENV, TOKEN_ENV = "BONEAGE_DICOMWEB_USER", "BONEAGE_DICOMWEB_PASSWORD", "BONEAGE_DICOMWEB_TOKEN"
DEFAULT_TIMEOUT = 30.0  # seconds a request may wait for the service (connect, and each read)
LISTING_THREADS = 8  # QIDO-RS requests in flight while listing many series
RETRIES = 3  # attempts per request (dicomweb-client's retrying)
RESULT_SERIES_DESCRIPTION = "boneage: bone age result (not for diagnosis without review)"  # dicom_out's series


def is_dicomweb(source: Any) -> bool:
    """Whether an input is a DICOMweb service (dicomweb+http:// or dicomweb+https://)."""
    return isinstance(source, str) and source.split("://", 1)[0].lower() in SCHEMES


@dataclass(frozen=True)
class Service:
    """A DICOMweb service: its base URL (http or https, no credentials) and how to authenticate. The
    secrets are left out of repr (Ray may print an object in an error), and of every message."""

    url: str
    timeout: float = DEFAULT_TIMEOUT
    username: str | None = field(default=None, repr=False)
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def client(self):
        """A dicomweb-client DICOMwebClient with the credentials and time-out."""
        import requests
        from dicomweb_client.api import DICOMwebClient

        session = requests.Session()
        session.trust_env = False  # no ~/.netrc: the credentials are the ones given, or none
        if self.token:
            session.headers["Authorization"] = f"Bearer {self.token}"
        elif self.username is not None:
            session.auth = (self.username, self.password or "")
        client = DICOMwebClient(url=self.url, session=session, timeout=self.timeout)
        # A refused connection or a busy service (429, 503...) is tried RETRIES times, 0.2 s then 0.4 s
        # apart (the library's default: 5 times over 30 s, which makes "unreachable" slow to say).
        client.set_http_retry_params(max_attempts=RETRIES, wait_exponential_multiplier=100)
        return client


def service(source: str, auth_file: str | None = None, timeout: float | None = None,
            environ: Mapping[str, str] | None = None) -> Service:
    """The Service of an input `dicomweb+http(s)://host[:port]/path`, with the credentials of `auth_file`
    (JSON: {"username": ..., "password": ...} or {"token": ...}) or else of the environment (USER_ENV and
    PASSWORD_ENV, or TOKEN_ENV); none: anonymous. UserError for a URL that carries credentials (a command
    line is seen by every user of the machine, and is kept in shell histories)."""
    check_installed()
    parts = urlsplit(source)
    if parts.scheme.lower() not in SCHEMES or not parts.hostname:
        raise UserError(f"not a DICOMweb input: give dicomweb+http://HOST[:PORT]/PATH (or dicomweb+https://), "
                        f"not {source.split('@')[-1]!r}")
    if parts.username or parts.password:
        raise UserError(f"the DICOMweb URL must not hold credentials: set {USER_ENV} and {PASSWORD_ENV} (or "
                        f"{TOKEN_ENV}), or give --dicomweb-auth FILE")
    url = f"{parts.scheme.lower().split('+', 1)[1]}://{parts.netloc}{parts.path.rstrip('/')}"
    credentials = _credentials_file(auth_file) if auth_file else _credentials_env(os.environ if environ is None else environ)
    return Service(url=url, timeout=float(timeout or DEFAULT_TIMEOUT), **credentials)


def _credentials_env(environ: Mapping[str, str]) -> dict[str, str | None]:
    if environ.get(TOKEN_ENV):
        return {"token": environ[TOKEN_ENV]}
    if environ.get(USER_ENV):
        return {"username": environ[USER_ENV], "password": environ.get(PASSWORD_ENV, "")}
    return {}


def _credentials_file(path: str) -> dict[str, str | None]:
    from boneage.data import storage

    try:
        found = json.loads(storage.read_bytes(path))
    except ItemError as err:
        raise UserError(f"--dicomweb-auth {path}: cannot be read ({err.code})") from None
    except ValueError:
        raise UserError(f"--dicomweb-auth {path}: not JSON; write {{\"username\": ..., \"password\": ...}} "
                        "or {\"token\": ...}") from None  # the message never quotes the file
    if not isinstance(found, dict) or not (found.get("token") or found.get("username")):
        raise UserError(f"--dicomweb-auth {path}: needs \"username\" and \"password\", or \"token\"")
    if found.get("token"):
        return {"token": str(found["token"])}
    return {"username": str(found["username"]), "password": str(found.get("password") or "")}


def check_installed() -> None:
    """UserError (exit status 2, before any work) when dicomweb-client, of the pacs extra, is missing."""
    import importlib.util

    if importlib.util.find_spec("dicomweb_client") is None:
        raise UserError("a DICOMweb input needs dicomweb-client: pip install 'boneage[pacs]'")


def parse_query(query: str | None) -> dict[str, str]:
    """A QIDO-RS query 'Modality=CR&StudyDate=20240101-20240131' as {attribute: value}."""
    if not query:
        return {}
    pairs = parse_qsl(query.lstrip("?"), keep_blank_values=True, strict_parsing=False)
    if not pairs:
        raise UserError(f"--qido {query!r}: write ATTRIBUTE=VALUE pairs joined by &, e.g. "
                        "'Modality=CR&StudyDate=20240101-20240131'")
    return dict(pairs)


def read_study_list(uri: str, storage_options: Mapping[str, Any] | None = None) -> list[str]:
    """StudyInstanceUIDs from a text file, one a line (blank lines and # comments ignored), in order, once each."""
    from boneage.data import storage

    try:
        text = storage.read_bytes(uri, storage_options).decode("utf-8-sig")
    except ItemError as err:
        raise UserError(f"--studies {uri}: {err}") from None
    uids = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    if not uids:
        raise UserError(f"--studies {uri}: no StudyInstanceUID in it (one a line)")
    return list(dict.fromkeys(uids))


# ----------------------------------------------------------------------------------------------
# Listing (QIDO-RS), on the driver: UIDs and SOP classes only, never pixels
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Instance:
    study: str
    series: str
    sop: str
    sop_class: str | None


def _value(record: Mapping[str, Any], tag: str) -> str | None:
    values = (record.get(tag) or {}).get("Value") or []
    return str(values[0]) if values else None


def _whole_run_error(service: Service, err: Exception) -> UserError:
    """What the service's answer means for the whole run, on one line (no credentials, no URL query)."""
    import requests

    where = service.url
    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
        if status in (401, 403):
            return UserError(f"the DICOMweb service {where} refused the credentials (HTTP {status}): set "
                             f"{USER_ENV} and {PASSWORD_ENV} (or {TOKEN_ENV}), or give --dicomweb-auth FILE")
        return UserError(f"the DICOMweb service {where} answered HTTP {status} {err.response.reason} to a query")
    if isinstance(err, requests.Timeout):
        return UserError(f"the DICOMweb service {where} did not answer within {service.timeout:g} s "
                         "(--dicomweb-timeout)")
    if isinstance(err, requests.ConnectionError):
        return UserError(f"cannot reach the DICOMweb service {where}: is it running, and is the URL right?")
    return UserError(f"the DICOMweb service {where} could not be queried: {short(err)}")


def _query(service: Service, call, *args, **kwargs):
    import requests

    try:
        return call(*args, **kwargs)
    except requests.RequestException as err:
        raise _whole_run_error(service, err) from None


def check(service: Service) -> None:
    """One QIDO-RS request (a study, at most): UserError, one line, when the service cannot be reached,
    refuses the credentials or does not answer in time. Said before any other work starts."""
    _query(service, service.client().search_for_studies, limit=1)


def list_instances(service: Service, studies: list[str] | None = None, query: Mapping[str, str] | None = None
                   ) -> tuple[list[Instance], list[str], int]:
    """(instances, StudyInstanceUIDs given that the service does not know, instances skipped because they
    are boneage's own results) of `studies` (each whole study; None: every study matching `query`),
    series by series, with the QIDO-RS `query` applied at the series level (Modality, BodyPartExamined,
    and study attributes such as StudyDate). UserError when the service cannot be reached or refuses."""
    client = service.client()
    query = dict(query or {})
    if studies is None:
        series = _query(service, client.search_for_series, search_filters=query, get_remaining=True)
        missing: list[str] = []
    else:
        def one(study):
            return _query(service, client.search_for_series, study, search_filters=query, get_remaining=True)

        with ThreadPoolExecutor(max(1, min(LISTING_THREADS, len(studies)))) as pool:
            found = list(pool.map(one, studies))
        series = [s for per_study in found for s in per_study]
        # A study with no series under the query may exist: ask for it alone before calling it missing.
        missing = [study for study, per_study in zip(studies, found) if not per_study and not _query(
            service, client.search_for_studies, search_filters={"StudyInstanceUID": study})]
    own = [s for s in series if _value(s, "0008103E") == RESULT_SERIES_DESCRIPTION]
    series = [s for s in series if _value(s, "0008103E") != RESULT_SERIES_DESCRIPTION]

    def instances_of(record):
        return _query(service, client.search_for_instances, _value(record, "0020000D"), _value(record, "0020000E"),
                      get_remaining=True)

    with ThreadPoolExecutor(max(1, min(LISTING_THREADS, len(series) or 1))) as pool:
        listed = [i for per_series in pool.map(instances_of, series) for i in per_series]
    skipped = sum(int(_value(s, "00201209") or 0) for s in own)  # Number of Series Related Instances
    instances = sorted({Instance(_value(i, "0020000D"), _value(i, "0020000E"), _value(i, "00080018"),
                                 _value(i, "00080016")) for i in listed}, key=lambda i: (i.study, i.series, i.sop))
    return instances, missing, skipped


def instance_uri(source: str, instance: Instance) -> str:
    """The row's uri: the input URL with the instance's WADO-RS path."""
    return f"{source.rstrip('/')}/studies/{instance.study}/series/{instance.series}/instances/{instance.sop}"


def split_uri(uri: str) -> tuple[str, str, str]:
    """(study, series, sop) of an instance_uri."""
    parts = uri.rstrip("/").split("/")
    if len(parts) < 6 or (parts[-6], parts[-4], parts[-2]) != ("studies", "series", "instances"):
        raise ItemError("missing_file", f"{uri}: not a DICOMweb instance address")
    return parts[-5], parts[-3], parts[-1]


def is_image_class(sop_class: str | None) -> bool | None:
    """True for an image storage SOP class, False for a known non-image one (SR, PDF, presentation state,
    key object selection...), None when pydicom does not know it (then the object itself decides)."""
    from pydicom.uid import UID

    if not sop_class:
        return None
    name = UID(sop_class).name
    if name == sop_class:  # unknown (private) classes keep their number as their name
        return None
    return "Image Storage" in name


def manifest_rows(source: str, instances: Iterable[Instance], missing_studies: Iterable[str] = (),
                  keep_uids: bool = False) -> pd.DataFrame:
    """The scoring manifest (boneage.data.ingest's columns): one row per instance, id its SOPInstanceUID,
    path study/series/sop; an instance of a non-image SOP class is a not_an_image row (never retrieved),
    a study the service does not know a missing_file row (id: its UID)."""
    from boneage.data.ingest import MANIFEST_COLUMNS, UID_COLUMNS
    from pydicom.uid import UID

    rows = []
    for inst in instances:
        row = {"id": inst.sop, "uri": instance_uri(source, inst), "path": f"{inst.study}/{inst.series}/{inst.sop}",
               "boneage": None, "male": None, "group": None, "status": STATUS_OK, "error": None}
        if is_image_class(inst.sop_class) is False:
            row.update(status=STATUS_ERROR, error=str(ItemError(
                "not_an_image", f"{inst.sop}: a {UID(inst.sop_class).name} object, not an image")))
        if keep_uids:
            row.update(StudyInstanceUID=inst.study, SeriesInstanceUID=inst.series, SOPInstanceUID=inst.sop)
        rows.append(row)
    for study in missing_studies:
        row = {"id": study, "uri": f"{source.rstrip('/')}/studies/{study}", "path": study, "boneage": None,
               "male": None, "group": None, "status": STATUS_ERROR,
               "error": str(ItemError("missing_file", f"study {study}: the DICOMweb service has no such study"))}
        if keep_uids:
            row.update(StudyInstanceUID=study, SeriesInstanceUID=None, SOPInstanceUID=None)
        rows.append(row)
    columns = list(MANIFEST_COLUMNS) + (list(UID_COLUMNS) if keep_uids else [])
    return pd.DataFrame(rows, columns=columns).sort_values(["id", "uri"], kind="stable").reset_index(drop=True)


# ----------------------------------------------------------------------------------------------
# One instance (WADO-RS), in the workers
# ----------------------------------------------------------------------------------------------


def _item_error(uri: str, err: Exception, what: str = "WADO-RS") -> ItemError:
    """One instance's failure as its row's error: gone (404, 410) is missing_file; anything else (a
    time-out, a refused or failed request) read_failed, which a resumed run retries."""
    import requests

    if isinstance(err, requests.HTTPError) and err.response is not None:
        status = err.response.status_code
        if status in (404, 410):
            return ItemError("missing_file", f"{uri}: the DICOMweb service has no such instance (HTTP {status})")
        return ItemError("read_failed", f"{uri}: {what} answered HTTP {status} {err.response.reason}")
    if isinstance(err, requests.Timeout):
        return ItemError("read_failed", f"{uri}: {what} did not answer in time")
    if isinstance(err, requests.ConnectionError):
        return ItemError("read_failed", f"{uri}: {what} connection failed")
    return ItemError("read_failed", f"{uri}: {what} failed: {short(err)}")


class Reader:
    """Reads instances of one Service: `reader(uri)` is the instance's DICOM file (Part 10 bytes, in the
    transfer syntax the service holds it in), `reader.header(uri)` its header as a pydicom Dataset (no
    pixel data), `reader.store(datasets)` sends objects with STOW-RS. Picklable (Ray sends it to its
    workers); each process makes its own HTTP session on first use."""

    def __init__(self, service: Service):
        self.service = service
        self._local = threading.local()

    def __getstate__(self):
        return {"service": self.service}

    def __setstate__(self, state):
        self.service = state["service"]
        self._local = threading.local()

    def _client(self):
        if getattr(self._local, "client", None) is None:
            self._local.client = self.service.client()
        return self._local.client

    def __call__(self, uri: str) -> bytes:
        """The instance's Part 10 bytes; ItemError (missing_file, read_failed, not_an_image) otherwise."""
        study, series, sop = split_uri(uri)
        from pydicom.errors import InvalidDicomError

        try:
            dataset = self._client().retrieve_instance(study, series, sop)
        except InvalidDicomError:
            raise ItemError("bad_dicom", f"{uri}: WADO-RS returned no DICOM file") from None
        except Exception as err:  # noqa: BLE001 - one instance's failure is its row's
            raise _item_error(uri, err) from None
        if not any(tag in dataset for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            name = getattr(dataset.get("SOPClassUID"), "name", None) or "DICOM"
            raise ItemError("not_an_image", f"{uri}: a {name} object without pixel data")
        out = io.BytesIO()
        dataset.save_as(out, enforce_file_format=True)
        return out.getvalue()

    def header(self, uri: str):
        """The instance's header (WADO-RS metadata; bulk data such as the pixels left out)."""
        import pydicom

        study, series, sop = split_uri(uri)
        try:
            metadata = self._client().retrieve_instance_metadata(study, series, sop)
        except Exception as err:  # noqa: BLE001
            raise _item_error(uri, err) from None
        return pydicom.Dataset.from_json(metadata, bulk_data_uri_handler=lambda *_: b"")

    def store(self, datasets: list) -> None:
        """STOW-RS `datasets`; RuntimeError naming what failed (the HTTP status, or the service's
        Failed SOP Sequence), never the credentials."""
        try:
            response = self._client().store_instances(datasets)
        except Exception as err:  # noqa: BLE001
            raise RuntimeError(_item_error(self.service.url, err, "STOW-RS").detail) from None
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise RuntimeError(f"the service refused {len(failed)} of {len(datasets)} objects "
                               f"(Failure Reason {', '.join(reasons)})")
