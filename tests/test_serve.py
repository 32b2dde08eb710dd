"""`boneage serve` on a real local Ray Serve, called with a real HTTP client (httpx) on loopback: one image
scored by the service, by boneage.score.score_one and by `boneage score` gives the same row; every kind of
bad input is a 4xx with the batch path's error code and the replica goes on serving; a full queue answers
503 with Retry-After. One Ray instance (the session's), one Serve application, shut down at the end."""

from __future__ import annotations

import io
import shutil
import struct
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage import cli, score
from boneage.bundle import load_bundle
from boneage.config import ServeConfig

from conftest import REAL_DIR, _free_port
from test_io import dicom_bytes
from tiny_bundle import KINDS, write_tiny_bundle

pytestmark = pytest.mark.slow

# Two requests at once and one waiting: more than that is answered 503 (the bounded queue).
SETTINGS = dict(cpus_per_replica=0.5, max_ongoing_requests=2, max_queued_requests=1, retry_after_s=2,
                max_request_mb=4, max_batch_size=4, max_pixels_mpx=20)
# Columns that differ by design between a request and a batch row: where the file was, and that the sex and
# age came with the request rather than a subjects CSV ("request" for "csv").
NOT_COMPARED = {"uri", "path", "sex_source", "age_source"}


def _png(array: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array, mode).save(buffer, format="PNG")
    return buffer.getvalue()


def _claiming(png: bytes, width: int, height: int) -> bytes:
    """`png` with an IHDR that claims width x height (its CRC fixed): a header that lies about its size."""
    ihdr = png[12:16] + struct.pack(">II", width, height) + png[24:29]
    return png[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serve_images")
    shutil.copy(REAL_DIR / "1402.png", folder / "1402.png")
    pixels = np.asarray(Image.open(REAL_DIR / "1675.png").convert("L"), np.uint16) * 16
    (folder / "scan.dcm").write_bytes(dicom_bytes(pixels, sex="M", birth="20100115", study="20200715"))
    return folder


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    path = tmp_path_factory.mktemp("serve_bundle") / "bundle"
    write_tiny_bundle(str(path))
    return str(path)


@pytest.fixture(scope="module")
def batch_rows(ray_local, files, bundle, tmp_path_factory):
    """`boneage score` on the two files: the rows the service must reproduce (run before Serve starts)."""
    out = tmp_path_factory.mktemp("serve_batch") / "scored.parquet"
    subjects = out.parent / "subjects.csv"
    subjects.write_text("id,sex,age_months\n1402,F,30\n")
    assert cli.main(["score", str(files), "--bundle", bundle, "--out", str(out), "--subjects", str(subjects)]) == 0
    return pd.read_parquet(out).set_index("id")


@pytest.fixture(scope="module")
def service(batch_rows, bundle):
    from boneage.distributed import ray_serve
    from boneage.run import serving

    token = Path(bundle).parent / "token"
    token.write_text("s3cret-token\n")
    url = serving.serve(bundle, ServeConfig(port=_free_port(), token_file=str(token), **SETTINGS), wait=False)
    try:
        with httpx.Client(base_url=url, timeout=120, headers={"authorization": "Bearer s3cret-token"}) as client:
            yield client
    finally:
        ray_serve.shutdown()


def _same_row(got: dict, expected: pd.Series) -> None:
    for column in [*score.OUTPUT_COLUMNS, *KINDS, "bundle_sha256"]:
        if column in NOT_COMPARED:
            continue
        a, b = got[column], expected.name if column == "id" else expected[column]
        if isinstance(b, (float, np.floating)) and np.isnan(b):
            assert a is None, column
        elif isinstance(b, (float, np.floating)):
            assert a == pytest.approx(float(b), rel=1e-6, abs=1e-6), column
        elif column == "transform":
            assert a == pytest.approx(list(b)), column
        else:
            assert a == (b.item() if isinstance(b, np.generic) else b), column


def test_score_one_gives_the_batch_row(files, bundle, batch_rows):
    models = score.BundleModels(load_bundle(bundle))
    row = score.score_one(models, (files / "1402.png").read_bytes(), sex="F", age_months=30, rid="1402")
    _same_row({**row, "bundle_sha256": batch_rows.loc["1402", "bundle_sha256"]}, batch_rows.loc["1402"])
    assert row["sex_source"] == "request" and row["age_source"] == "request"
    dicom = score.score_one(models, (files / "scan.dcm").read_bytes(), rid="scan")  # sex and age: the header's
    _same_row({**dicom, "bundle_sha256": batch_rows.loc["scan", "bundle_sha256"]}, batch_rows.loc["scan"])
    assert dicom["sex_source"] == "dicom" and dicom["age_source"] == "dicom_dates"


def test_the_service_answers_the_batch_rows(service, files, batch_rows):
    png = service.post("/v1/boneage", content=(files / "1402.png").read_bytes(),
                       params={"sex": "F", "chronological_age_months": "30", "id": "1402"},
                       headers={"content-type": "image/png"})
    assert png.status_code == 200, png.text
    _same_row(png.json(), batch_rows.loc["1402"])
    assert png.json()["sex_source"] == "request" and png.json()["boneage_months"] is not None
    # DICOM as a multipart upload, its sex and age from the header, as `boneage score` reads them
    dicom = service.post("/v1/boneage", files={"image": ("x.dcm", (files / "scan.dcm").read_bytes(), "application/dicom")},
                         data={"id": "scan"})
    assert dicom.status_code == 200, dicom.text
    _same_row(dicom.json(), batch_rows.loc["scan"])


def test_model_health_docs_and_card(service, bundle, files):
    from boneage.bundle import manifest_sha256

    health = service.get("/v1/health").json()
    assert health["status"] == "ok" and health["bundle_sha256"] == manifest_sha256(bundle)
    assert health["scored"]["images"] >= 2 and 1 <= health["scored"]["batches"] <= health["scored"]["images"]
    model = service.get("/v1/model").json()
    assert model["bundle_sha256"] == manifest_sha256(bundle) and model["kinds"] == list(KINDS)
    assert model["folds"] == 2 and model["version"] == 2
    assert service.get("/docs").status_code == 200
    assert "/v1/boneage" in service.get("/openapi.json").json()["paths"]
    card = service.post("/v1/boneage?card=1", content=(files / "1402.png").read_bytes())
    assert card.status_code == 200 and card.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(card.content)).size[0] > 500


def test_every_route_but_health_needs_the_token(service, files):
    url = str(service.base_url)
    assert httpx.get(f"{url}/v1/health").status_code == 200
    for method, path in (("POST", "/v1/boneage"), ("GET", "/v1/model"), ("GET", "/docs"), ("GET", "/openapi.json")):
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret-token"}):
            answer = httpx.request(method, f"{url}{path}", headers=headers, content=(files / "1402.png").read_bytes()
                                   if method == "POST" else None)
            assert answer.status_code == 401 and answer.json()["error"]["code"] == "unauthorized", (path, headers)
            assert answer.headers["www-authenticate"] == "Bearer"


def test_bad_input_is_a_4xx_and_the_replica_goes_on(service, files):
    good = (files / "1402.png").read_bytes()
    bomb = io.BytesIO()
    Image.new("1", (15000, 15000)).save(bomb, format="PNG")  # 225 Mpx in a few kB
    no_pixels = dicom_bytes(None)
    cases = {  # name: (body, content type, query, expected status, expected code)
        "empty body": (b"", "application/octet-stream", {}, 400, "empty_file"),
        "not an image": (b"hello, this is text\n" * 10, "application/octet-stream", {}, 415, "not_an_image"),
        "truncated PNG": (good[: len(good) // 2], "image/png", {}, 422, "truncated"),
        "decompression bomb": (bomb.getvalue(), "image/png", {}, 422, "bad_image"),
        "DICOM without pixels": (no_pixels, "application/dicom", {}, 422, "bad_dicom"),
        "10x10 image": (_png(np.arange(100, dtype=np.uint8).reshape(10, 10)), "image/png", {}, 422, "bad_image"),
        "25 Mpx claim, over serve.max_pixels_mpx": (_claiming(_png(np.arange(100, dtype=np.uint8).reshape(10, 10)),
                                                              5000, 5000), "image/png", {}, 422, "bad_image"),
        "400 Mpx claim": (_claiming(_png(np.arange(100, dtype=np.uint8).reshape(10, 10)), 20000, 20000),
                          "image/png", {}, 422, "bad_image"),
        "wrong content type": (good, "text/plain", {}, 415, "unsupported_media_type"),
        "unknown sex": (good, "image/png", {"sex": "X"}, 422, "unknown_sex"),
        "bad age": (good, "image/png", {"chronological_age_months": "old"}, 422, "bad_label"),
        "too large": (b"\0" * 5_000_000, "application/octet-stream", {}, 413, "request_too_large"),
        "multipart without a file": (None, None, {}, 400, "bad_request"),
    }
    for name, (body, media, query, status, code) in cases.items():
        if body is None:
            answer = service.post("/v1/boneage", data={"sex": "F"}, files={"note": (None, "no file here")})
        else:
            answer = service.post("/v1/boneage", content=body, params=query, headers={"content-type": media})
        assert answer.status_code == status, (name, answer.status_code, answer.text)
        error = answer.json()["error"]
        assert error["code"] == code and error["message"], (name, error)
        if "max_pixels_mpx" in name:
            assert "25 Mpx) is more than the 20 Mpx this service accepts" in error["message"], error
    scored = service.post("/v1/boneage", content=good, headers={"content-type": "image/png"})
    assert scored.status_code == 200 and scored.json()["boneage_months"] > 0
    from ray import serve

    status = serve.status().applications["boneage"].deployments["BoneAge"]
    assert status.status == "HEALTHY" and status.replica_states == {"RUNNING": 1}


def test_a_full_queue_answers_503_with_retry_after(service, files):
    """2 requests at work and 1 waiting (SETTINGS): of 12 card requests at once, some are refused."""
    good = (files / "1402.png").read_bytes()

    def post(_):
        return service.post("/v1/boneage?card=1", content=good, headers={"content-type": "image/png"})

    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(post, range(12)))
    codes = sorted(a.status_code for a in answers)
    assert set(codes) <= {200, 503} and codes.count(200) >= 3 and 503 in codes, codes
    assert all(a.headers.get("retry-after") == "2" for a in answers if a.status_code == 503)
    before = service.get("/v1/health").json()["scored"]
    # two requests at once: scored in one batch when their preparations end within serve.batch_wait_s, else two
    # (bench/bench_serve.py measures how many images a batch holds under load). Serve may still count the
    # burst's last request as ongoing for a moment, so each client honours Retry-After, as a real one would;
    # a 503 is never scored, so the counts below still hold.
    def post_honouring_retry_after(_):
        for _attempt in range(5):
            answer = service.post("/v1/boneage", content=good)
            if answer.status_code != 503:
                return answer
            time.sleep(float(answer.headers["retry-after"]))
        return answer

    with ThreadPoolExecutor(2) as pool:
        pair = list(pool.map(post_honouring_retry_after, range(2)))
    assert [a.status_code for a in pair] == [200, 200]
    after = service.get("/v1/health").json()["scored"]
    assert after["images"] - before["images"] == 2 and after["batches"] - before["batches"] in (1, 2)


def test_a_wrong_bundle_or_setting_is_one_line_and_exit_status_2(tmp_path, capsys):
    assert cli.main(["serve", "--bundle", str(tmp_path / "nowhere")]) == 2
    assert capsys.readouterr().err.startswith("boneage serve: error: bundle ")
    assert cli.main(["serve", "--bundle", str(tmp_path), "--replicas", "3", "--max-replicas", "2"]) == 2
    assert "max_replicas (2) is below replicas (3)" in capsys.readouterr().err


def test_the_token_comes_from_the_file_else_the_environment_and_a_bad_file_stops_the_start(tmp_path, monkeypatch):
    from boneage.distributed import ray_serve
    from boneage.errors import UserError

    monkeypatch.delenv(ray_serve.TOKEN_VARIABLE, raising=False)
    assert ray_serve.read_token(None) is None
    monkeypatch.setenv(ray_serve.TOKEN_VARIABLE, " from-env \n")
    assert ray_serve.read_token(None) == "from-env"
    (tmp_path / "token").write_text("from-file\n")
    assert ray_serve.read_token(str(tmp_path / "token")) == "from-file"
    (tmp_path / "empty").write_text("\n")
    for bad in ("empty", "missing"):
        with pytest.raises(UserError):
            ray_serve.read_token(str(tmp_path / bad))


def test_a_request_past_the_time_out_is_a_json_408_and_the_service_goes_on(service, files, bundle):
    """Last in the module (it restarts Serve): a time-out shorter than a card takes is the replica's JSON
    408 `timeout`; the replica stays healthy."""
    from ray import serve

    from boneage.distributed import ray_serve
    from boneage.run import serving

    ray_serve.shutdown()
    url = serving.serve(bundle, ServeConfig(port=_free_port(), **{**SETTINGS, "request_timeout_s": 0.01}), wait=False)
    answer = httpx.post(f"{url}/v1/boneage?card=1", content=(files / "1402.png").read_bytes(),
                        headers={"content-type": "image/png"}, timeout=60)
    assert answer.status_code == 408, answer.text
    error = answer.json()["error"]
    assert error["code"] == "timeout" and "serve.request_timeout_s (0.01 s)" in error["message"]
    status = serve.status().applications["boneage"].deployments["BoneAge"]
    assert status.status == "HEALTHY" and status.replica_states == {"RUNNING": 1}
