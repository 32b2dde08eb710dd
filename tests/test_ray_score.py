"""Batch scoring on a real local Ray: a folder mixing good radiographs (PNG and DICOM) with every kind
of bad file gives one row per file and exit status 0; the table's schema is the documented one."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from PIL import Image

from boneage import cli, score
from boneage.data import storage
from boneage.errors import error_code

from conftest import REAL_DIR
from test_io import dicom_bytes
from tiny_bundle import KINDS, write_tiny_bundle

pytestmark = pytest.mark.slow


def mixed_folder(folder: Path, synthetic: dict) -> Path:
    shutil.copytree(synthetic["images"], folder)
    shutil.copy(REAL_DIR / "1402.png", folder / "1402.png")
    pixels = np.asarray(Image.open(REAL_DIR / "1675.png").convert("L"), np.uint16) * 16
    (folder / "scan.dcm").write_bytes(dicom_bytes(pixels, sex="M", birth="20100115", study="20200715"))
    (folder / "empty.png").write_bytes(b"")
    (folder / "notes.png").write_text("this is not an image\n")
    data = (REAL_DIR / "1563.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "bad.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00garbage")
    (folder / "tiny.png").write_bytes(_png(np.full((8, 8), 128, np.uint8)))
    return folder


def _png(array: np.ndarray) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_mixed_folder_one_row_per_file(tmp_path, ray_local, synthetic_small, capsys):
    images = mixed_folder(tmp_path / "images", synthetic_small)
    bundle = tmp_path / "bundle"
    manifest = write_tiny_bundle(str(bundle))
    # as the embedded run's bundle says it: trained on synthetic radiographs (the folder has real ones)
    manifest["data"] = {"kind": "synthetic", "images": 216, "labels_from": "labels.csv"}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    subjects = tmp_path / "subjects.csv"
    subjects.write_text("id,sex,age_months\n1402,F,30\n1,M,\n2,X,\n")
    out = tmp_path / "predictions.parquet"

    assert cli.main(["score", str(images), "--bundle", str(bundle), "--out", str(out),
                     "--subjects", str(subjects), "--batch-size", "4"]) == 0

    err = capsys.readouterr().err
    assert err.count("this bundle was trained on 216 SYNTHETIC hand radiographs") == 1  # once, loudly
    assert "WARNING: " in err and "mean nothing for real hands" in err
    table = pd.read_parquet(out)
    files = sorted(p.name for p in images.iterdir())
    assert sorted(Path(u).name for u in table.uri) == files  # exactly one row per input file
    assert list(table.columns) == score.output_schema(list(KINDS)).names
    schema = pq.read_schema(out)
    assert schema.field("boneage_months").type == "double" and schema.field("sex_unknown").type == "bool"
    rows = table.set_index("id")
    codes = rows.error.map(error_code)
    assert codes["empty"] == "empty_file" and codes["notes"] == "not_an_image"
    assert codes["truncated"] == "truncated" and codes["bad"] == "bad_dicom"
    assert codes["tiny"] == "bad_image" and codes["2"] == "unknown_sex"  # a bad CSV row fails its image
    # Sex and age: the CSV, then the DICOM header, else unknown (both sexes' estimates).
    assert (rows.loc["1402", ["sex", "sex_source", "chronological_age_months"]].tolist() == ["F", "csv", 30.0])
    assert rows.loc["scan", "sex"] == "M" and rows.loc["scan", "sex_source"] == "dicom"
    assert rows.loc["scan", "age_source"] == "dicom_dates"
    assert rows.loc["scan", "chronological_age_months"] == pytest.approx(126.0, abs=0.5)
    assert rows.loc["1", "sex_source"] == "csv"
    ok = rows[rows.status == "ok"]
    assert ok.boneage_months.notna().all() and ok.boneage_sd_months.notna().all()
    unknown = ok[ok.sex_unknown]
    assert len(unknown) >= 3 and unknown.boneage_if_female_months.notna().all()
    failed = rows[rows.status != "ok"]
    assert failed.boneage_months.isna().all() and failed.error.notna().all()
    # Nothing identifying from the DICOM header reaches the table.
    text = table.to_csv()
    assert "Doe" not in text and "20100115" not in text


def test_the_lean_pipeline_gives_the_staged_pipelines_rows_and_cards(tmp_path, ray_local, synthetic_small):
    """Issue 25, item 0: the lean path (every stage of a batch in one actor, no PNG round trip) against
    the staged one (CPU tasks, the registered image as PNG between them) on good and bad files, with a
    key point model, subjects and cards: the same rows, floats within what another batching of float32
    sums moves, and the same cards."""
    images = mixed_folder(tmp_path / "images", synthetic_small)
    bundle = tmp_path / "bundle"
    write_tiny_bundle(str(bundle), keypoint_model=True)
    subjects = tmp_path / "subjects.csv"
    subjects.write_text("id,sex,age_months\n1402,F,30\n1,M,\n2,X,\n")
    tables = {}
    for pipeline in ("staged", "lean"):
        out = tmp_path / f"{pipeline}.parquet"
        assert cli.main(["score", str(images), "--bundle", str(bundle), "--out", str(out), "--subjects", str(subjects),
                         "--cards", str(tmp_path / f"cards-{pipeline}"), "--pipeline", pipeline,
                         "--batch-size", "3"]) == 0
        tables[pipeline] = pd.read_parquet(out).set_index("id").sort_index()
    staged, lean = tables["staged"], tables["lean"]
    assert list(staged.columns) == list(lean.columns) and list(staged.index) == list(lean.index)
    assert (staged.status == "ok").sum() >= 6 and (staged.keypoint_source == "model").any()  # the model was used
    for column in staged.columns.drop(["scored_at", "card"]):
        a, b = staged[column], lean[column]
        if pd.api.types.is_float_dtype(a):
            assert (a.isna() == b.isna()).all() and np.allclose(a.fillna(0), b.fillna(0), rtol=0, atol=1e-3), column
        elif column == "transform":
            assert all((x is None) == (y is None) and (x is None or np.allclose(x, y)) for x, y in zip(a, b))
        else:
            assert a.astype(str).tolist() == b.astype(str).tolist(), column
    for rid in staged.index[staged.card.notna()]:
        drawn = [np.asarray(Image.open(tables[p].loc[rid, "card"])) for p in ("staged", "lean")]
        assert drawn[0].shape == drawn[1].shape and (drawn[0] != drawn[1]).any(axis=-1).mean() < 0.005, rid


def test_a_missing_bundle_is_a_clear_error(tmp_path, capsys, synthetic_small):
    assert cli.main(["score", synthetic_small["images"], "--bundle", str(tmp_path / "nowhere"),
                     "--out", str(tmp_path / "p.parquet")]) == 2
    assert "bundle" in capsys.readouterr().err and not (tmp_path / "p.parquet").exists()


def test_pacs_export_resumes_and_carries_provenance(tmp_path, ray_local, capsys):
    """Nested studies with colliding file names score as distinct ids; the output records which bundle
    made it; a rerun after a crash (a part cut off mid-write, new files) scores only the files without
    a row, and every file still has exactly one row."""
    import hashlib
    import json

    from boneage.distributed.ray_score import read_provenance

    export = tmp_path / "export"
    pixels = np.asarray(Image.open(REAL_DIR / "1675.png").convert("L"), np.uint16) * 16
    for path in ("patientA/study1/IM0001.dcm", "patientB/study7/IM0001"):
        (export / path).parent.mkdir(parents=True, exist_ok=True)
        (export / path).write_bytes(dicom_bytes(pixels, sex="F"))
    shutil.copy(REAL_DIR / "1402.png", export / "1402.png")
    bundle = tmp_path / "bundle"
    write_tiny_bundle(str(bundle))
    out = tmp_path / "predictions.parquet"
    args = ["score", str(export), "--bundle", str(bundle), "--out", str(out), "--keep-dicom-uids", "--batch-size", "2"]

    assert cli.main(args) == 0
    first = pd.read_parquet(out).set_index("id")
    assert sorted(first.index) == ["1402", "patientA/study1/IM0001", "patientB/study7/IM0001"]
    assert (first.status == "ok").all() and first.loc["patientB/study7/IM0001", "path"] == "patientB/study7/IM0001"
    assert first.loc["patientA/study1/IM0001", "SOPInstanceUID"].startswith("1.2.")
    assert pd.isna(first.loc["1402", "SOPInstanceUID"])
    provenance = read_provenance(str(out))
    manifest_sha = hashlib.sha256((bundle / "manifest.json").read_bytes()).hexdigest()
    assert provenance["bundle"]["sha256"] == manifest_sha and provenance["bundle"]["version"] == 2
    assert provenance["boneage_version"] and provenance["dicom_uids"] is True and "mirrored" in provenance["qa_columns"]
    assert (first.bundle_sha256 == manifest_sha).all() and first.scored_at.notna().all()
    assert first["transform"].map(len).eq(6).all() and first.mirrored.notna().all()
    parts = sorted((tmp_path / "predictions.parquet.parts").glob("*.parquet"))
    assert parts and all(read_provenance(str(p))["run_id"] == provenance["run_id"] for p in parts)

    # A crash mid-run: one part half written; meanwhile two more files arrived.
    (tmp_path / "predictions.parquet.parts" / "part-cut-off.parquet").write_bytes(parts[0].read_bytes()[:100])
    shutil.copy(REAL_DIR / "1563.png", export / "1563.png")
    shutil.copy(REAL_DIR / "1684.png", export / "patientA" / "1684.png")
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "3 files already have a row" in capsys.readouterr().out
    second = pd.read_parquet(out)
    assert sorted(second.id) == sorted(list(first.index) + ["1563", "patientA/1684"]) and second.uri.is_unique
    again = second.set_index("id")
    assert (again.loc[first.index, "scored_at"] == first.scored_at).all()  # not scored again
    assert (again.loc[["1563", "patientA/1684"], "scored_at"] > first.scored_at.max()).all()
    assert not (tmp_path / "predictions.parquet.parts" / "part-cut-off.parquet").exists()
    assert read_provenance(str(out))["run_id"] != provenance["run_id"]
    assert json.loads(json.dumps(read_provenance(str(out))))  # plain JSON


def _card_folder(tmp_path: Path, synthetic: dict) -> Path:
    """Two radiographs at the top, one nested two folders down (its id is a relative path), one broken."""
    images = tmp_path / "images"
    (images / "clinic" / "2024").mkdir(parents=True)
    found = sorted(Path(synthetic["images"]).glob("*.png"))
    for path in found[:2]:
        shutil.copy(path, images / path.name)
    shutil.copy(found[2], images / "clinic" / "2024" / found[2].name)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return images


def _check_cards(table: pd.DataFrame, names: list[str], read) -> None:
    """One valid card per scored row, named by its id; the broken file's row says why it has none."""
    rows = table.set_index("id")
    scored = rows[rows.status == "ok"]
    assert len(scored) == 3 and any("/" in i for i in scored.index)
    assert rows.loc["broken", "status"] == "error" and pd.isna(rows.loc["broken", "card"])
    assert rows.loc["broken", "card_error"].startswith("no card: the image has no bone age")
    assert scored.card_error.isna().all()
    assert sorted(names) == sorted(f"{i}.png" for i in scored.index)  # nothing else in the folder
    for rid, uri in scored.card.items():
        assert uri.endswith(f"/{rid}.png")
        from io import BytesIO

        with Image.open(BytesIO(read(uri))) as card:
            card.verify()
        with Image.open(BytesIO(read(uri))) as card:
            assert card.format == "PNG" and card.size == (1040, 600)
            assert np.asarray(card.convert("L")).std() > 10  # drawn, not blank


def test_cards_through_boneage_score(tmp_path, ray_local, synthetic_small, capsys):
    images = _card_folder(tmp_path, synthetic_small)
    bundle, out, folder = tmp_path / "bundle", tmp_path / "predictions.parquet", tmp_path / "cards"
    write_tiny_bundle(str(bundle))
    assert cli.main(["score", str(images), "--bundle", str(bundle), "--out", str(out), "--cards", str(folder),
                     "--batch-size", "2"]) == 0
    assert "3 cards written, 0 failed" in capsys.readouterr().out
    table = pd.read_parquet(out)
    assert list(table.columns) == score.output_schema(list(KINDS), cards=True).names
    names = [str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()]
    _check_cards(table, names, lambda uri: Path(uri).read_bytes())


@pytest.mark.s3
def test_cards_on_s3(tmp_path, ray_local, synthetic_small, s3_server):
    import json

    import s3fs

    options = s3_server["storage_options"]
    prefix = f"s3://{s3_server['bucket']}/cards-test"
    images = _card_folder(tmp_path, synthetic_small)
    for path in images.rglob("*.png"):
        storage.write_bytes(f"{prefix}/images/{path.relative_to(images)}", path.read_bytes(), options)
    write_tiny_bundle(f"{prefix}/bundle", options)
    assert cli.main(["score", f"{prefix}/images", "--bundle", f"{prefix}/bundle", "--out", f"{prefix}/p.parquet",
                     "--cards", f"{prefix}/cards", "--storage-options", json.dumps(options), "--batch-size", "2"]) == 0
    fs = s3fs.S3FileSystem(**options)
    with fs.open(f"{prefix}/p.parquet", "rb") as f:
        table = pd.read_parquet(f)
    root = f"{s3_server['bucket']}/cards-test/cards/"
    names = [p[len(root):] for p in fs.find(root)]
    _check_cards(table, names, lambda uri: storage.read_bytes(uri, options))


@pytest.mark.s3
def test_resume_into_s3_scores_only_the_files_without_a_row(tmp_path, ray_local, s3_server, synthetic_small, capsys):
    """An s3:// folder of parts resumes like a local one: after runs that scored some of the files, one
    run's parts lost and a part cut off mid-write, the rerun scores exactly the files without a row, each
    once, and every part carries the provenance of the run that wrote it."""
    import json

    from boneage.data import storage
    from boneage.distributed.ray_score import read_output, read_provenance

    options = s3_server["storage_options"]
    base = f"s3://{s3_server['bucket']}/score-resume"
    bundle = f"{base}/bundle"
    write_tiny_bundle(bundle, options)
    out = f"{base}/predictions"  # no .parquet: the folder of parts is the output
    images = sorted(str(p) for p in Path(synthetic_small["images"]).glob("*.png"))
    assert len(images) == 6
    score_args = ["--bundle", bundle, "--out", out, "--storage-options", json.dumps(options), "--batch-size", "1"]

    # The interrupted state, made by two runs: one scored 2 files, one 2 more; the first one's parts are
    # then lost, and a part is left cut off mid-write.
    assert cli.main(["score", *images[:2], *score_args]) == 0
    fs, folder = storage.filesystem(out, options)
    lost_parts = fs.find(folder)
    assert cli.main(["score", *images[2:4], *score_args]) == 0
    fs.invalidate_cache()
    kept_parts = sorted(set(fs.find(folder)) - set(lost_parts))
    assert lost_parts and kept_parts and all(p.endswith(".parquet") for p in kept_parts)
    first = read_output(out, ("id", "uri", "scored_at"), options)
    assert sorted(first.uri) == images[:4]
    kept_run = read_provenance(f"s3://{kept_parts[0]}", options)["run_id"]
    cut_off = f"{folder}/part-cut-off.parquet"
    fs.pipe(cut_off, fs.cat_file(kept_parts[0])[:100])
    fs.rm(lost_parts)
    kept = first[first.uri.isin(images[2:4])]

    capsys.readouterr()
    assert cli.main(["score", synthetic_small["images"], *score_args]) == 0
    said = capsys.readouterr().out
    assert "2 files already have a row" in said and "scoring the other 4" in said
    fs.invalidate_cache()
    assert not fs.exists(cut_off)
    table = read_output(out, ("id", "uri", "status", "scored_at", "bundle_sha256"), options)
    assert sorted(table.uri) == images and table.id.is_unique  # every file exactly once, none lost
    rescored = table[table.scored_at > first.scored_at.max()]
    assert sorted(rescored.uri) == images[:2] + images[4:]  # only the files without a row
    assert (table.set_index("uri").loc[kept.uri, "scored_at"].to_numpy() == kept.scored_at.to_numpy()).all()
    assert table.status.eq("ok").sum() >= 4 and table.bundle_sha256.nunique() == 1
    provenance = [read_provenance(f"s3://{p}", options) for p in fs.find(folder)]
    runs = {p["run_id"] for p in provenance}
    assert len(runs) == 2 and kept_run in runs  # each part says which run wrote it, and with what
    assert {p["bundle"]["sha256"] for p in provenance} == set(table.bundle_sha256) and all(p["boneage_version"] for p in provenance)
