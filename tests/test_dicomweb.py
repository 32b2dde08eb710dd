"""DICOMweb in and out (boneage.data.dicomweb, `boneage score dicomweb+http://...`) against a real Orthanc
on loopback (authentication on, its own storage): listing with QIDO-RS, retrieval with WADO-RS in Ray's
tasks, STOW-RS of the SR and card SC, and the faults (unreachable, wrong credentials, unknown study, an
instance gone mid-run, non-image objects, a slow service, a rerun after a cut-off run and after a real
SIGKILL halfway)."""

from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pydicom
import pytest
from PIL import Image
from pydicom.uid import JPEGLSLossless, RLELossless, generate_uid

from boneage.clinical import dicom_out
from boneage.data import dicomweb
from boneage.errors import ItemError

from conftest import REAL_DIR
from test_dicom_out import dciodvfy, source_dicom
from test_io import dicom_bytes

PDF_CLASS = "1.2.840.10008.5.1.4.1.1.104.1"  # Encapsulated PDF Storage


@pytest.fixture(scope="module")
def silent_service():
    """A service that takes connections and never answers (a hung PACS): its URL."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)  # the kernel completes the handshakes; nobody reads or writes
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/dicom-web"


def _service(server, **changes) -> dicomweb.Service:
    user, password = server["auth"]
    return dicomweb.Service(**{"url": server["url"], "username": user, "password": password, **changes})


def _input(server) -> str:
    return "dicomweb+" + server["url"]


def hand(name: str, study: str, photometric: str = "MONOCHROME2", syntax=None, sex: str = "M") -> pydicom.Dataset:
    """A real RSNA hand radiograph (tests/fixtures/real) as a DX instance of `study`, 12 bits."""
    pixels = np.asarray(Image.open(REAL_DIR / name).convert("L"), np.uint16) * 16
    if photometric == "MONOCHROME1":  # stored inverted: low values white
        pixels = 4095 - pixels
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels, photometric=photometric, sex=sex)))
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[study, name])
    ds.BodyPartExamined = "HAND"
    if syntax is not None:
        ds.compress(syntax)
    return ds


def not_a_hand(study: str) -> pydicom.Dataset:
    """A smooth chest-like blob: an image, but no hand."""
    y, x = np.mgrid[0:512, 0:420]
    pixels = (3000 * np.exp(-(((y - 256) / 180) ** 2 + ((x - 210) / 150) ** 2))).astype(np.uint16) + 200
    ds = pydicom.dcmread(io.BytesIO(dicom_bytes(pixels)))
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.BodyPartExamined = study, generate_uid(), "CHEST"
    return ds


def pdf(study: str) -> pydicom.Dataset:
    """An encapsulated PDF in the study (a scanned request form, say): no pixel data."""
    ds = source_dicom(11)
    for keyword in ("PixelData", "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation",
                    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation"):
        delattr(ds, keyword)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = PDF_CLASS
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality = study, generate_uid(), "DOC"
    ds.MIMETypeOfEncapsulatedDocument, ds.EncapsulatedDocument = "application/pdf", b"%PDF-1.4\n%%EOF\n"
    ds.preamble = bytes(128)  # sent as a Part 10 file, as a modality sends it
    return ds


def foreign_sr(study: str) -> pydicom.Dataset:
    """An SR that is not boneage's (another series): a non-image object among the study's instances."""
    from test_dicom_out import card, scored_row

    source = source_dicom(12)
    source.StudyInstanceUID = study
    sr = dicom_out.build(scored_row(), source, card(), "ef" * 32).sr
    sr.SeriesInstanceUID, sr.SeriesDescription = generate_uid(), "a report from elsewhere"
    sr.SOPInstanceUID = sr.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return sr


# ---- credentials and listing, without Ray ---------------------------------------------------------


def test_credentials_come_from_a_file_or_the_environment_never_the_url(tmp_path):
    env = {dicomweb.USER_ENV: "alice", dicomweb.PASSWORD_ENV: "s3cret-pw"}
    found = dicomweb.service("dicomweb+http://pacs:8042/dicom-web/", environ=env)
    assert (found.url, found.username, found.password) == ("http://pacs:8042/dicom-web", "alice", "s3cret-pw")
    assert "s3cret-pw" not in repr(found) and "alice" not in repr(found)
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"token": "tok-123"}))
    assert dicomweb.service("dicomweb+https://pacs/dw", str(auth), environ=env).token == "tok-123"
    assert dicomweb.service("dicomweb+https://pacs/dw", environ={}).username is None  # anonymous
    with pytest.raises(ValueError, match="must not hold credentials") as info:
        dicomweb.service("dicomweb+http://alice:s3cret-pw@pacs/dw", environ={})
    assert "s3cret-pw" not in str(info.value)
    auth.write_text("password=s3cret-pw")
    with pytest.raises(ValueError, match="not JSON") as info:
        dicomweb.service("dicomweb+http://pacs/dw", str(auth), environ={})
    assert "s3cret-pw" not in str(info.value)


def test_a_study_lists_one_row_per_instance_and_non_images_are_rows_that_say_so(orthanc):
    from test_dicom_out import card, scored_row

    client = _service(orthanc).client()
    study, other = generate_uid(), generate_uid()
    left, right = hand("1675.png", study), hand("1563.png", study)
    result = dicom_out.build(scored_row(), left, card(), "ab" * 32)  # boneage's own result series
    client.store_instances([left, right, pdf(study), foreign_sr(study), result.sr, result.sc, hand("1675.png", other)])

    instances, missing, own = dicomweb.list_instances(_service(orthanc), [study, "1.2.3.999"])
    assert missing == ["1.2.3.999"] and own == 2  # the result series' SR and SC are not inputs
    assert {i.sop for i in instances} >= {left.SOPInstanceUID, right.SOPInstanceUID} and len(instances) == 4
    rows = dicomweb.manifest_rows(_input(orthanc), instances, missing).set_index("id")
    assert rows.loc[left.SOPInstanceUID, "status"] == "ok"
    assert rows.loc[left.SOPInstanceUID, "uri"] == (f"{_input(orthanc)}/studies/{study}/series/"
                                                    f"{left.SeriesInstanceUID}/instances/{left.SOPInstanceUID}")
    bad = rows[rows.status == "error"]
    assert sorted(bad.error.str.split(":").str[0]) == ["missing_file", "not_an_image", "not_an_image"]
    assert bad.loc["1.2.3.999", "error"].startswith("missing_file: study 1.2.3.999")
    # a QIDO-RS query at the series level, across studies
    by_query, _, _ = dicomweb.list_instances(_service(orthanc), None, {"StudyInstanceUID": other, "Modality": "DX"})
    assert [i.study for i in by_query] == [other]


def test_the_reader_retrieves_one_instance_or_says_why_not(orthanc, silent_service):
    study = generate_uid()
    compressed = hand("1563.png", study, "MONOCHROME1", JPEGLSLossless)
    document = pdf(study)  # under a private SOP class: the listing cannot tell, the object must
    document.SOPClassUID = document.file_meta.MediaStorageSOPClassUID = "1.2.826.0.1.3680043.8.498.1"
    _service(orthanc).client().store_instances([compressed, document])
    reader = dicomweb.Reader(_service(orthanc))
    base = _input(orthanc)

    def uri(ds):
        return f"{base}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"

    got = pydicom.dcmread(io.BytesIO(reader(uri(compressed))))
    assert got.file_meta.TransferSyntaxUID == JPEGLSLossless  # as stored: no transcoding by the service
    assert np.array_equal(got.pixel_array, compressed.pixel_array)
    assert reader.header(uri(compressed)).PatientID == compressed.PatientID
    import pickle

    again = pickle.loads(pickle.dumps(reader))  # as Ray sends it to a worker
    assert again(uri(compressed)) == reader(uri(compressed))

    def code(fetch, address):
        with pytest.raises(ItemError) as info:
            fetch(address)
        return info.value.code
    assert code(reader, uri(document)) == "not_an_image"  # no pixel data
    assert code(reader, f"{base}/studies/{study}/series/{compressed.SeriesInstanceUID}/instances/1.2.3") == "missing_file"
    slow = dicomweb.Reader(_service(orthanc, url=silent_service, timeout=0.2))
    assert code(slow, uri(compressed).replace(orthanc["url"], silent_service)) == "read_failed"
    assert code(dicomweb.Reader(_service(orthanc, password="wrong")), uri(compressed)) == "read_failed"


# ---- boneage score from Orthanc --------------------------------------------------------------------


def _score(args, capsys, env=None, monkeypatch=None):
    from boneage import cli

    for name in (dicomweb.USER_ENV, dicomweb.PASSWORD_ENV, dicomweb.TOKEN_ENV):
        monkeypatch.delenv(name, raising=False)
    for name, value in (env or {}).items():
        monkeypatch.setenv(name, value)
    status = cli.main(["score", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    from tiny_bundle import write_tiny_bundle

    folder = tmp_path_factory.mktemp("bundle") / "bundle"
    write_tiny_bundle(str(folder))
    return str(folder)


def test_whole_run_faults_are_one_line_and_exit_status_2(orthanc, silent_service, bundle, tmp_path, capsys,
                                                         monkeypatch, ray_local):
    import orthanc_server

    studies = tmp_path / "studies.txt"
    studies.write_text("1.2.3.404\n")
    good = {dicomweb.USER_ENV: orthanc_server.USER, dicomweb.PASSWORD_ENV: orthanc_server.PASSWORD}
    common = ["--bundle", bundle, "--out", str(tmp_path / "out.parquet"), "--studies", str(studies)]
    from conftest import _free_port

    cases = [
        (["dicomweb+http://127.0.0.1:%d/dicom-web" % _free_port()], good, "cannot reach the DICOMweb service"),
        ([_input(orthanc)], {**good, dicomweb.PASSWORD_ENV: "wrong"}, "refused the credentials (HTTP 401)"),
        ([_input(orthanc)], {}, "refused the credentials (HTTP 401)"),  # no credentials at all
        ([_input(orthanc)], good, "has no study of --studies"),  # the only study does not exist
        (["dicomweb+" + silent_service, "--dicomweb-timeout", "0.2"], good, "did not answer within 0.2 s"),
    ]
    for args, env, message in cases:
        status, out, err = _score([*args, *common], capsys, env, monkeypatch)
        assert status == 2 and message in err and len(err.strip().splitlines()) == 1, (message, err)
        assert "wrong" not in err and orthanc_server.PASSWORD not in out + err
    status, _, err = _score([_input(orthanc), "--bundle", bundle, "--out", str(tmp_path / "o.parquet")], capsys,
                            good, monkeypatch)
    assert status == 2 and "needs --studies FILE" in err
    status, _, err = _score([str(tmp_path), "--stow", "--bundle", bundle, "--out", str(tmp_path / "o.parquet")],
                            capsys, good, monkeypatch)
    assert status == 2 and "go with a DICOMweb input" in err  # --stow sends back where the images came from


@pytest.mark.slow
def test_score_from_orthanc_and_stow_back_then_a_rerun_adds_nothing(orthanc, bundle, tmp_path, capsys, monkeypatch,
                                                                    ray_local):
    """Hands (uncompressed MONOCHROME2, JPEG-LS MONOCHROME1, RLE; one study of three, another of one), a
    non-hand image, a PDF and a foreign SR in Orthanc; one instance deleted between the listing and its
    retrieval. Scored from Orthanc with --stow: a row per instance, the SR and SC of every scored image
    in the source's study, valid (dciodvfy) and read back (highdicom) to the parquet row; the password
    nowhere in the outputs. Then a run cut off (a part lost) is rerun: only the lost rows are scored and
    sent again, and Orthanc holds one SR and one SC per image."""
    import requests

    import orthanc_server
    from boneage.distributed import ray_score

    client = _service(orthanc).client()
    several, single = generate_uid(), generate_uid()
    images = [hand("1675.png", several), hand("1563.png", several, "MONOCHROME1", JPEGLSLossless),
              hand("1675.png", several, syntax=RLELossless, sex="F"), not_a_hand(several),
              hand("1563.png", single), hand("1675.png", single)]
    gone = images[-1]  # deleted after the listing: its retrieval fails mid-run
    client.store_instances([*images, pdf(several), foreign_sr(several)])
    studies = tmp_path / "studies.txt"
    studies.write_text(f"# two studies\n{several}\n{single}\n")
    auth = tmp_path / "auth.json"
    auth.write_text(json.dumps({"username": orthanc_server.USER, "password": orthanc_server.PASSWORD}))

    listed = dicomweb.list_instances

    def list_then_delete(*args, **kwargs):
        found = listed(*args, **kwargs)
        ids = requests.post(f"{orthanc['base']}/tools/lookup", data=gone.SOPInstanceUID, auth=orthanc["auth"],
                            timeout=10).json()
        requests.delete(f"{orthanc['base']}{ids[0]['Path']}", auth=orthanc["auth"], timeout=10).raise_for_status()
        return found

    monkeypatch.setattr(dicomweb, "list_instances", list_then_delete)
    out, folder = tmp_path / "predictions.parquet", tmp_path / "dicom"
    args = [_input(orthanc), "--studies", str(studies), "--dicomweb-auth", str(auth), "--bundle", bundle,
            "--out", str(out), "--stow", "--dicom-out", str(folder), "--batch-size", "2"]
    status, stdout, stderr = _score(args, capsys, None, monkeypatch)
    assert status == 0, stderr
    monkeypatch.setattr(dicomweb, "list_instances", listed)
    table = pd.read_parquet(out).set_index("id")
    assert len(table) == 8 and table.index.is_unique  # 6 images, the PDF, the foreign SR
    assert table.loc[gone.SOPInstanceUID, "error"].startswith("missing_file: ")
    non_images = table[table.error.fillna("").str.startswith("not_an_image")]
    assert len(non_images) == 2
    scored = table[table.dicom_stow == dicom_out.STOWED]
    hands = [ds.SOPInstanceUID for ds in images[:3] + images[4:5]]
    assert set(hands) <= set(scored.index)
    assert (table.loc[hands, "status"] == "ok").all() and table.loc[hands, "boneage_months"].notna().all()
    assert table.loc[images[2].SOPInstanceUID, "sex"] == "F" and table.loc[images[0].SOPInstanceUID, "sex"] == "M"
    other = table.loc[images[3].SOPInstanceUID]  # no hand: the gate's reason, or decoding's error
    assert other.status == "error" or not other.accepted, other
    assert f"STOW-RS to {orthanc['url']}: {len(scored)}/8 rows' SR and card SC stored" in stdout

    for rid, row in scored.iterrows():
        source = next(ds for ds in images if ds.SOPInstanceUID == rid)
        series = [pydicom.Dataset.from_json(s) for s in client.search_for_series(source.StudyInstanceUID)]
        result_series = [s for s in series if s.SeriesInstanceUID == dicom_out.uids(rid, row.bundle_sha256)["series"]]
        assert [s.SeriesDescription for s in result_series] == [dicom_out.SERIES_DESCRIPTION]
        sr = client.retrieve_instance(source.StudyInstanceUID, dicom_out.uids(rid, row.bundle_sha256)["series"],
                                      row.dicom_sr_uid)
        back = dicom_out.read_report(sr)
        assert back["source_sop_instance_uid"] == rid and str(sr.PatientID) == str(source.PatientID)
        for column in ("boneage_months", "boneage_lower_months", "boneage_upper_months", "boneage_sds"):
            assert (back[column] is None) if pd.isna(row[column]) else back[column] == pytest.approx(row[column])
        for column in ("boneage_interpretation", "sex", "sex_source"):
            assert back[column] == (None if pd.isna(row[column]) else row[column]), column
        assert back["accepted"] == bool(row.accepted)
        sc = client.retrieve_instance(source.StudyInstanceUID, sr.SeriesInstanceUID,
                                      dicom_out.uids(rid, row.bundle_sha256)["sc"])
        for name, made in (("sr", sr), ("sc", sc)):
            path = tmp_path / f"{rid}-{name}.dcm"
            made.save_as(path, enforce_file_format=True)
            errors, _ = dciodvfy(path)
            assert errors == [], (rid, name, errors)

    # The password: in no output, table, metadata, DICOM file or printed line.
    secret = orthanc_server.PASSWORD.encode()
    assert secret not in (stdout + stderr).encode()
    for path in [out, *tmp_path.joinpath("predictions.parquet.parts").rglob("*"), *folder.rglob("*")]:
        assert not path.is_file() or secret not in path.read_bytes(), path

    # A run cut off after its objects were sent but before two rows were written: the rerun scores and
    # sends only those two (the deleted instance, no longer listed, keeps its row).
    import pyarrow as pa
    import pyarrow.parquet as pq

    def instance_count():  # in this test's two studies (QIDO-RS), result series included
        return sum(len(client.search_for_instances(study)) for study in (several, single))

    before = instance_count()
    lost = pd.Index(hands[:2])
    for part in tmp_path.joinpath("predictions.parquet.parts").glob("*.parquet"):
        written = pq.read_table(part)
        keep = [rid not in lost for rid in written.column("id").to_pylist()]
        pq.write_table(written.filter(pa.array(keep)), part)
    status, stdout, stderr = _score(args, capsys, None, monkeypatch)
    assert status == 0, stderr
    assert "[score] 5 files already have a row" in stdout  # of the 7 listed now
    again = pd.read_parquet(out).set_index("id")
    assert len(again) == 8 and again.index.is_unique
    kept = again.drop(index=lost)
    assert (kept.scored_at == table.loc[kept.index, "scored_at"]).all()  # not rescored, so not sent again
    assert (again.loc[lost, "scored_at"] > table.loc[lost, "scored_at"]).all()
    assert (again.dicom_stow == dicom_out.STOWED).sum() == len(scored)
    assert instance_count() == before  # the same UIDs: Orthanc holds one SR and one SC per image
    assert before == len(images) - 1 + 2 + 2 * len(scored)  # the sources (less the deleted), PDF, SR, results
    assert ray_score.read_output(str(out), ("id", "uri"))["id"].is_unique  # the parts too


def test_the_stow_line_counts_what_was_stored_and_what_failed():
    from boneage.run.scoring import stow_summary

    table = pd.DataFrame({"dicom_stow": [dicom_out.STOWED, "failed: STOW-RS answered HTTP 500", None]})
    assert stow_summary(table, "http://pacs/dw") == (
        "[score] STOW-RS to http://pacs/dw: 1/3 rows' SR and card SC stored; 1 failed (a rerun on the same --out "
        "sends them again), e.g. failed: STOW-RS answered HTTP 500")


def test_a_failed_stow_is_not_settled_and_is_sent_again():
    from boneage import score

    table = pd.DataFrame({"uri": ["a", "b", "c"], "error": [None, None, "not_an_image: x"],
                          "scored_at": pd.to_datetime(["2026-01-01"] * 3, utc=True),
                          "dicom_stow": [dicom_out.STOWED, "failed: the service refused 1 of 2 objects", None]})
    assert score.settled_uris(table) == {"a", "c"}


@pytest.mark.slow
def test_a_run_killed_halfway_and_rerun_gives_each_instance_once_and_one_sr_and_sc(orthanc, bundle, tmp_path,
                                                                                   ray_local):
    """`boneage score dicomweb+... --stow` as a real process, SIGKILLed (its whole process group) once its
    first parquet part is written and before its last, then rerun to the end: every instance has one row
    in the table and one in the raw parts (rows written by the killed run are settled, never scored again),
    the rerun scores and sends only the others, and Orthanc holds exactly one SR and one SC per instance.
    Rows scored and sent by the killed run but not yet written are sent again with the same UIDs, which
    Orthanc keeps once (docs/pacs.md). Both runs join the session's Ray instance (--address): killing the
    driver ends its job's actors and tasks, as when a submitted job's driver dies."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pyarrow.parquet as pq

    import orthanc_server
    from boneage.distributed import ray_score

    client = _service(orthanc).client()
    studies = [generate_uid() for _ in range(5)]
    images = [hand(name, study, sex=sex) for study in studies
              for name, sex in (("1675.png", "M"), ("1563.png", "F"), ("1675.png", "F"), ("1563.png", "M"))]
    client.store_instances(images)
    listed = tmp_path / "studies.txt"
    listed.write_text("\n".join(studies) + "\n")
    out = tmp_path / "predictions.parquet"
    parts = tmp_path / "predictions.parquet.parts"
    # --batch-size 2: the scorer takes 8 images a batch, so the 20 instances are written as several parts
    command = [sys.executable, "-m", "boneage.cli", "score", _input(orthanc), "--studies", str(listed),
               "--bundle", bundle, "--out", str(out), "--stow", "--batch-size", "2",
               "--address", ray_local.get_runtime_context().gcs_address]
    env = {**{k: v for k, v in os.environ.items() if k not in (dicomweb.TOKEN_ENV, "RAY_ADDRESS")},
           dicomweb.USER_ENV: orthanc_server.USER, dicomweb.PASSWORD_ENV: orthanc_server.PASSWORD}

    def written_rows() -> pd.DataFrame:  # the rows of every complete part (one being written cannot be read)
        tables = []
        for part in parts.glob("*.parquet"):
            try:
                tables.append(pq.read_table(part, columns=["id", "uri", "dicom_stow", "scored_at"]).to_pandas())
            except Exception:  # noqa: BLE001 - cut off mid-write: the rerun removes it
                continue
        return pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["id"])

    log = tmp_path / "killed.log"
    with open(log, "wb") as sink:
        run = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=sink, stderr=subprocess.STDOUT,
                               start_new_session=True)
        try:
            deadline = time.monotonic() + 300
            while len(written_rows()) == 0:
                assert run.poll() is None, f"the run ended before writing a part: {log.read_text()[-3000:]}"
                assert time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(0.02)
        finally:
            os.killpg(run.pid, signal.SIGKILL)
            run.wait()
    # Ray ends the dead driver's actors and tasks (a write among them) on its own: once their CPUs are
    # free again, no part can appear any more.
    deadline = time.monotonic() + 60
    while ray_local.available_resources().get("CPU", 0) < ray_local.cluster_resources()["CPU"]:
        assert time.monotonic() < deadline, ray_local.available_resources()
        time.sleep(0.2)
    first = written_rows()
    # Halfway: the scorer's batches are 8 images, a few seconds apart on 2 cores; the poll is 20 ms.
    assert 0 < len(first) < len(images), (len(first), log.read_text()[-3000:])
    assert not out.exists()  # the killed run never gathered its parts

    again = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"[score] {len(first)} files already have a row" in again.stdout, again.stdout
    assert f"STOW-RS to {orthanc['url']}: {len(images)}/{len(images)} rows' SR and card SC stored" in again.stdout

    sources = {ds.SOPInstanceUID: ds for ds in images}
    table = ray_score.read_output(str(out), ("id", "uri", "status", "dicom_stow", "dicom_sr_uid", "bundle_sha256",
                                             "scored_at")).set_index("id")
    assert sorted(table.index) == sorted(sources) and (table.status == "ok").all()
    assert (table.dicom_stow == dicom_out.STOWED).all()
    raw = written_rows()  # every part of both runs: nothing scored, so nothing sent, twice
    assert raw["id"].is_unique and sorted(raw["id"]) == sorted(sources)
    killed = first.set_index("id")
    assert (table.loc[killed.index, "scored_at"] == killed.scored_at).all()  # the killed run's rows kept
    rerun = table.drop(index=killed.index)
    assert (rerun.scored_at > killed.scored_at.max()).all() and len(rerun) == len(images) - len(first)

    for rid, row in table.iterrows():
        uids = dicom_out.uids(rid, row.bundle_sha256)
        found = client.search_for_instances(sources[rid].StudyInstanceUID, uids["series"])
        assert sorted(pydicom.Dataset.from_json(i).SOPInstanceUID for i in found) == sorted(
            [row.dicom_sr_uid, uids["sc"]]), rid
    for study in studies:  # 4 sources, and an SR and an SC for each: nothing else
        assert len(client.search_for_instances(study)) == 4 * 3
