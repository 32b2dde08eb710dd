"""`boneage serve`: a bundle as an HTTP service on Ray Serve (FastAPI through Serve's ingress).

    POST /v1/boneage ─► read the body (size-limited) ─► boneage.score.prepare_one (a thread of the replica)
                     ─► Serve's dynamic batching ─► boneage.score.score_prepared (every fold model, the
                        ensemble, the clinical columns) ─► the row as JSON, or ?card=1: the card as PNG
    GET /v1/health, GET /v1/model, /docs (OpenAPI)

The scoring is batch scoring's own code (boneage.score's per-image path): one image gives the numbers of
its `boneage score` row. A bad image is a 4xx whose JSON names the batch path's error code
(boneage.errors.ERROR_CODES); the replica goes on serving. Settings: boneage.config.ServeConfig.
docs/serving.md says how to call it."""

# No `from __future__ import annotations`: FastAPI reads the routes' parameter types (Request) as objects.
import asyncio
import hashlib
import hmac
import os
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve
from ray.serve.config import AutoscalingConfig, BackpressureConfig, HTTPOptions

import boneage
from boneage import score
from boneage.bundle import load_bundle, keypoint_model_sha256
from boneage.config import ServeConfig
from boneage.data import storage
from boneage.data.labels import MAX_AGE_MONTHS, _parse_age, _parse_sex
from boneage.distributed import ray_env
from boneage.validation import intervals
from boneage.errors import STATUS_OK, MissingInput, UserError, error_code

APP_NAME = "boneage"
TOKEN_VARIABLE = "BONEAGE_SERVE_TOKEN"
# The image's media types; the bytes decide which format it is (as in batch scoring, never a name or a type).
IMAGE_TYPES = ("image/png", "image/jpeg", "application/dicom", "application/octet-stream")
MULTIPART = "multipart/form-data"
# The service's own codes, beside the batch path's (boneage.errors.ERROR_CODES), with their HTTP status.
SERVICE_CODES = {
    "request_too_large": (413, "the request body is larger than serve.max_request_mb"),
    "unsupported_media_type": (415, "the content type is not an image type or multipart/form-data"),
    "bad_request": (400, "the request cannot be read (a multipart body without an image part, ...)"),
    "unauthorized": (401, "the service has a token and the request did not give it"),
    "timeout": (408, "the request was not answered within serve.request_timeout_s"),
}
# Serve's proxy ends a request PROXY_GRACE_S after serve.request_timeout_s (plain text 408): only one that
# never reached a replica meets it; one in a replica gets the replica's JSON 408 first.
PROXY_GRACE_S = 2.0
# The HTTP status of each batch error code. processing_failed is a bug of ours (500), the rest the image's.
ERROR_STATUS = {"empty_file": 400, "not_an_image": 415, "missing_codec": 415, "unknown_sex": 422, "bad_label": 422,
                "processing_failed": 500}
UNPROCESSABLE = 422  # truncated, corrupt_image, bad_image, bad_dicom: an image that cannot be scored

app = FastAPI(
    title="boneage",
    version=boneage.__version__,
    description="Bone age from one hand radiograph (PNG, JPEG or DICOM), scored by a boneage bundle with "
                "batch scoring's own code: the JSON answer has the columns of a `boneage score` row "
                "(docs/scoring.md). Errors: {\"error\": {\"code\", \"message\"}} with the batch path's error "
                "codes (docs/serving.md).",
)


@app.middleware("http")
async def bearer_token(request: Request, call_next):
    """With a token (serve.token_file or BONEAGE_SERVE_TOKEN), every route but /v1/health needs
    `Authorization: Bearer <token>`. The replica holds only the token's SHA-256 (set_token, as it starts)."""
    expected = _TOKEN["sha256"]
    if expected and request.url.path != "/v1/health":
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token_sha256(token.strip()), expected):
            return JSONResponse({"error": {"code": "unauthorized", "message": "unauthorized: this service needs "
                                           "'Authorization: Bearer <token>'"}},
                                status_code=401, headers={"WWW-Authenticate": "Bearer"})
    return await call_next(request)


# This process's token hash. Module state, set through set_token: Serve runs a frozen copy of `app`, and the
# deployment class travels by value, so neither app.state nor a global read by the class would be this one.
_TOKEN: dict[str, str | None] = {"sha256": None}


def set_token(sha256: str | None) -> None:
    _TOKEN["sha256"] = sha256


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def read_token(token_file: str | None) -> str | None:
    """The bearer token: serve.token_file's content, else TOKEN_VARIABLE's value, else None (no token). A
    token file that is missing or empty is a UserError: the service must not start open by mistake."""
    if not token_file:
        return os.environ.get(TOKEN_VARIABLE, "").strip() or None
    if not Path(token_file).is_file():
        raise MissingInput(f"serve.token_file {token_file} does not exist")
    token = Path(token_file).read_text().strip()
    if not token:
        raise UserError(f"serve.token_file {token_file} is empty: put the token in it, or give no token file")
    return token


class RequestError(Exception):
    """A request that is not scored: its HTTP status and the JSON error it is answered with."""

    def __init__(self, code: str, message: str, status: int | None = None):
        super().__init__(message)
        self.code, self.message = code, message
        self.status = status or (SERVICE_CODES[code][0] if code in SERVICE_CODES
                                 else ERROR_STATUS.get(code, UNPROCESSABLE))

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"code": self.code, "message": self.message}}, status_code=self.status)


def item_error(error: str) -> RequestError:
    """The RequestError of a row's error text ('<code>: <detail>', boneage.errors.ItemError)."""
    code = error_code(error) or "processing_failed"
    return RequestError(code, error)


def subject_fields(fields: Mapping[str, Any]) -> tuple[str | None, float | None]:
    """(sex 'F'/'M' or None, chronological age in months or None) from the request's fields, read as the
    subjects CSV's are (boneage.data.labels); RequestError unknown_sex / bad_label for a value that is not."""
    raw_sex = str(fields.get("sex") or "").strip()
    male = _parse_sex(raw_sex) if raw_sex else None
    if raw_sex and male is None:
        raise RequestError("unknown_sex", f"unknown_sex: sex {raw_sex[:40]!r}: use F or M (or leave it out)")
    raw_age = str(fields.get("chronological_age_months") or "").strip()
    age, problem = _parse_age(raw_age, required=False)
    if problem:
        raise RequestError("bad_label", f"bad_label: chronological_age_months: {problem.replace('bone age ', '')} "
                                        f"(0-{MAX_AGE_MONTHS:g} months)")
    return (None if male is None else "M" if male else "F"), (None if pd.isna(age) else float(age))


async def read_limited(request: Request, limit: int) -> bytes:
    """The request body, refused (request_too_large) as soon as it passes `limit` bytes: the declared
    Content-Length first, then as it streams (a chunked body declares none)."""
    declared = request.headers.get("content-length")
    too_large = RequestError("request_too_large", f"request_too_large: the body is larger than {limit} bytes "
                                                  "(serve.max_request_mb)")
    if declared and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


async def image_and_fields(request: Request, limit: int) -> tuple[bytes, dict[str, Any]]:
    """(the image's bytes, the fields: query parameters, and a multipart body's form fields) of a POST."""
    media = request.headers.get("content-type", "application/octet-stream").split(";")[0].strip().lower()
    if media not in IMAGE_TYPES and media != MULTIPART:
        raise RequestError("unsupported_media_type", f"unsupported_media_type: {media[:60]!r}: send the image as "
                                                     f"the body ({', '.join(IMAGE_TYPES)}) or as the 'image' part "
                                                     "of multipart/form-data")
    body = await read_limited(request, limit)
    fields: dict[str, Any] = dict(request.query_params)
    if media != MULTIPART:
        return body, fields
    request._body = body  # starlette parses the form from the body already read (and bounded) above
    try:
        form = await request.form(max_files=1, max_fields=16)
    except Exception as err:  # a malformed multipart body
        raise RequestError("bad_request", f"bad_request: the multipart body cannot be read: {type(err).__name__}")
    files = [v for v in form.values() if hasattr(v, "read")]
    if not files:
        raise RequestError("bad_request", "bad_request: the multipart body has no file part (send the image as "
                                          "the 'image' part)")
    fields.update({k: v for k, v in form.items() if isinstance(v, str)})
    return await files[0].read(), fields


def model_info(bundle) -> dict[str, Any]:
    """GET /v1/model: which bundle this is and what it measured (training.json, measured.json)."""
    from boneage.bundle import training_data

    manifest = bundle.manifest
    return {"bundle_sha256": bundle.sha256, "bundle_uri": bundle.uri, "format": manifest.get("format"),
            "version": manifest.get("version"), "created": manifest.get("created"),
            "boneage_version": boneage.__version__, "trained_with": (manifest.get("packages") or {}).get("boneage"),
            "kinds": bundle.kinds, "sexes": bundle.sexes, "folds": manifest.get("folds"),
            "sex_kind": manifest.get("sex_kind"), "keypoint_model": bool(manifest.get("keypoint_model")),
            "training_data": training_data(manifest),
            # out of fold (training.json) and, once measured, on the locked test split (measured.json)
            "accuracy": manifest.get("accuracy") or {},
            "interval_level": (intervals.calibration_of(bundle.training) or {}).get("level")}


@serve.deployment(name="BoneAge")
@serve.ingress(app)
class BoneAgeService:
    """One replica: the bundle's models (checked against its manifest's hashes as it loads), its key point
    model, and the routes. Preparation runs in threads of the replica; scoring in Serve's batches."""

    def __init__(self, bundle_uri: str, storage_options: Mapping[str, Any] | None, bundle_sha256: str,
                 settings: Mapping[str, Any], token_hash: str | None = None):
        settings = ServeConfig(**settings)
        set_token(token_hash)  # the middleware's token in this replica's process (its hash only)
        bundle = load_bundle(bundle_uri, storage_options)  # every file's hash checked (boneage.bundle)
        if bundle.sha256 != bundle_sha256:  # replaced since the service was started: never mix bundles
            raise UserError(f"bundle {bundle_uri} changed since `boneage serve` started (manifest sha256 "
                            f"{str(bundle.sha256)[:12]}, started with {bundle_sha256[:12]})")
        if settings.torch_threads:  # else Ray's OMP_NUM_THREADS: the replica's whole CPUs
            torch.set_num_threads(settings.torch_threads)
        self.device = ray_env.actor_device(settings.gpus_per_replica > 0, "serve")
        self.models = score.BundleModels(bundle, self.device)
        self.keypoint_model = None
        if bundle.keypoint_model:
            from boneage.model import keypoint_model

            self.keypoint_model = keypoint_model.load(storage.read_bytes(bundle.keypoint_model, storage_options),
                                                      bundle.keypoint_model, keypoint_model_sha256(bundle.manifest),
                                                      self.device)
        self.info = model_info(bundle)
        self.limit = int(settings.max_request_mb * 1_000_000)
        self.max_pixels = int(settings.max_pixels_mpx * 1_000_000)
        self.timeout_s = settings.request_timeout_s
        self.scored = {"images": 0, "batches": 0}  # this replica's: how well requests meet in batches
        self.score_batch.set_max_batch_size(settings.max_batch_size)
        self.score_batch.set_batch_wait_timeout_s(settings.batch_wait_s)

    @app.get("/v1/health")
    def health(self) -> dict[str, Any]:
        """The replica is up and its bundle loaded; what it has scored, in how many batches."""
        return {"status": "ok", "bundle_sha256": self.info["bundle_sha256"], "scored": dict(self.scored)}

    @app.get("/v1/model")
    def model(self) -> dict[str, Any]:
        """The bundle: hash, format version, kinds, training data, measured accuracy, interval level."""
        return self.info

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)  # the settings' values are set in __init__
    async def score_batch(self, items: list[tuple[dict, str | None, float | None]]) -> list[dict[str, Any]]:
        """Prepared images of concurrent requests scored together (every fold model, the ensemble)."""
        prepared, sexes, ages = (list(x) for x in zip(*items))
        self.scored["images"] += len(items)
        self.scored["batches"] += 1
        return await asyncio.to_thread(score.score_prepared, prepared, self.models, sexes, ages)

    @app.post("/v1/boneage", openapi_extra={"requestBody": {"required": True, "content": {
        **{t: {"schema": {"type": "string", "format": "binary"}} for t in IMAGE_TYPES},
        MULTIPART: {"schema": {"type": "object", "properties": {
            "image": {"type": "string", "format": "binary"}, "sex": {"type": "string", "enum": ["F", "M"]},
            "chronological_age_months": {"type": "number"}, "id": {"type": "string"}}}}}}})
    async def score_image(self, request: Request, card: str | None = None, sex: str | None = None,
                          chronological_age_months: str | None = None, id: str | None = None) -> Response:
        """Score one radiograph (PNG, JPEG or DICOM: the raw body, or the 'image' part of a multipart form).
        sex (F/M) and chronological_age_months: optional, as query or form fields; else the DICOM header's,
        as in batch scoring. Answers the `boneage score` row as JSON, or with card=1 the card as PNG."""
        try:  # the replica's own time-out: a JSON 408 (Serve's proxy, PROXY_GRACE_S later, answers plain text)
            return await asyncio.wait_for(self._answer(request), self.timeout_s)
        except asyncio.TimeoutError:
            return RequestError("timeout", f"timeout: not answered within serve.request_timeout_s "
                                           f"({self.timeout_s:g} s); the service is busy or the image is large: "
                                           f"retry later").response()

    async def _answer(self, request: Request) -> Response:
        try:
            data, fields = await image_and_fields(request, self.limit)
            subject_sex, age = subject_fields(fields)
            rid = str(fields.get("id") or f"request-{uuid.uuid4().hex[:12]}")[:200]
            prepared = await asyncio.to_thread(score.prepare_one, data, rid, self.keypoint_model, self.device,
                                             self.max_pixels)
            if prepared["status"] != STATUS_OK:
                raise item_error(prepared["error"])
            row = await self.score_batch((prepared, subject_sex, age))
            if row["status"] != STATUS_OK:
                raise item_error(row["error"])
            row["bundle_sha256"] = self.info["bundle_sha256"]
            row["scored_at"] = pd.Timestamp(time.time(), unit="s", tz="UTC").isoformat()
            if str(fields.get("card") or "").lower() in ("1", "true", "yes"):  # any other value: the JSON row
                png = await asyncio.to_thread(self._card, prepared, row)
                return Response(png, media_type="image/png")
            return JSONResponse(row)
        except RequestError as err:
            return err.response()

    def _card(self, prepared: Mapping[str, Any], row: dict[str, Any]) -> bytes:
        from boneage.clinical import cards
        from boneage.registration import prepare

        image = prepared[prepare.REGISTERED_IMAGE]
        heat = cards.ensemble_occlusion(self.models, row.get("sex"), image)
        return cards.card_png(image, {**row, "interval_level": self.info["interval_level"]}, heat, source=prepared)


def application(bundle_uri: str, settings: ServeConfig, storage_options: Mapping[str, Any] | None,
                bundle_sha256: str):
    """The bound Serve application: replicas (fixed, or autoscaled between replicas and max_replicas),
    their CPUs and GPUs, and the bounded queue that answers 503 with Retry-After when full."""
    options: dict[str, Any] = {
        "ray_actor_options": {"num_cpus": settings.cpus_per_replica, "num_gpus": settings.gpus_per_replica},
        "max_ongoing_requests": settings.max_ongoing_requests,
        "max_queued_requests": settings.max_queued_requests,
        "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=settings.retry_after_s),
    }
    if settings.max_replicas is not None:
        options["autoscaling_config"] = AutoscalingConfig(
            min_replicas=settings.replicas, initial_replicas=settings.replicas, max_replicas=settings.max_replicas,
            target_ongoing_requests=settings.target_ongoing_requests)
    else:
        options["num_replicas"] = settings.replicas
    token = read_token(settings.token_file)
    return BoneAgeService.options(**options).bind(bundle_uri, dict(storage_options or {}), bundle_sha256,
                                                  settings.model_dump(), token_sha256(token) if token else None)


def start(bundle_uri: str, settings: ServeConfig, storage_options: Mapping[str, Any] | None,
          bundle_sha256: str) -> str:
    """Start Serve's HTTP proxy (host, port, time-out) and the application on the connected Ray; returns
    its base URL once every replica is up."""
    serve.start(http_options=HTTPOptions(host=settings.host, port=settings.port,
                                         request_timeout_s=settings.request_timeout_s + PROXY_GRACE_S))
    serve.run(application(bundle_uri, settings, storage_options, bundle_sha256), name=APP_NAME, route_prefix="/")
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    return f"http://{host}:{settings.port}"


def shutdown() -> None:
    serve.shutdown()

