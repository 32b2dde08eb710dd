"""Preparation on a real local Ray: one row per input, failures as rows, registered images decodable,
locally and on a loopback S3 server."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import s3fs

from boneage.registration import frame, prepare
from boneage import run
from boneage.data import storage
from boneage.config import load_config
from boneage.errors import error_code
from boneage.distributed.ray_prepare import read_registered

from conftest import REAL_DIR

pytestmark = pytest.mark.slow


def _mixed_folder(tmp_path: Path, synthetic: dict) -> tuple[Path, Path]:
    """Synthetic radiographs, two real ones, and each kind of bad file."""
    images = tmp_path / "images"
    shutil.copytree(synthetic["images"], images)
    for name in ("1402.png", "1675.png"):
        shutil.copy(REAL_DIR / name, images / name)
    (images / "empty.png").write_bytes(b"")
    (images / "text.png").write_text("this is not an image\n")
    data = (REAL_DIR / "1563.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    labels = tmp_path / "labels.csv"
    rows = Path(synthetic["labels"]).read_text().splitlines()
    rows += ["1402,24,False", "1675,96,True", "empty,100,True", "text,100,False", "truncated,190,False",
             "4242,120,True"]  # 4242: labelled, no image
    labels.write_text("\n".join(rows) + "\n")
    return images, labels


def test_every_input_becomes_one_row(tmp_path, ray_local, synthetic_small):
    images, labels = _mixed_folder(tmp_path, synthetic_small)
    config = load_config(overrides={"data": {"images": str(images), "labels": str(labels)},
                                    "output": str(tmp_path / "run")})
    table = run.preprocess(config)

    n_files = len(list(images.iterdir()))
    assert len(table) == n_files + 1  # + the labelled id without an image
    codes = table.set_index("id").error.map(error_code)
    assert codes["empty"] == "empty_file"
    assert codes["text"] == "not_an_image"
    assert codes["truncated"] == "truncated"
    assert codes["4242"] == "missing_file"

    full = read_registered(str(tmp_path / "run" / "registered"))
    ok = full[full.status == "ok"]
    assert len(ok) >= 6  # the synthetic hands and the real ones register (or say why not)
    for png in ok.registered_png:
        assert prepare.decode_png(png).shape == (frame.STORE_H, frame.STORE_W)
    assert full[full.status == "error"].registered_png.isna().all()
    some = read_registered(str(tmp_path / "run" / "registered"), ids=["1402", "empty"])
    assert list(some.id) == ["1402", "empty"] and some.registered_png.notna().tolist() == [True, False]
    assert read_registered(str(tmp_path / "run" / "registered"), ids=[]).empty
    assert (tmp_path / "run" / "qa" / "registered_sheet.png").stat().st_size > 0


def test_registered_keypoints_land_on_targets(tmp_path, ray_local, synthetic_small):
    """The stored transform maps each row's key points onto the frame's targets."""
    config = load_config(overrides={"data": {"images": synthetic_small["images"]}, "output": str(tmp_path / "run")})
    table = run.preprocess(config)
    ok = table[table.status == "ok"]
    assert len(ok) > 0
    for row in ok.itertuples():
        matrix = np.vstack([np.asarray(row.transform).reshape(2, 3), [0, 0, 1]])
        points = np.array([[row.finger_tip_x, row.finger_tip_y], [row.capitate_x, row.capitate_y]])
        mapped = (matrix @ np.c_[points, np.ones(2)].T).T[:, :2]
        np.testing.assert_allclose(mapped, [frame.FINGER_TIP_TARGET, frame.CAPITATE_TARGET], atol=1e-6)


@pytest.mark.s3
def test_images_and_output_on_s3(tmp_path, ray_local, synthetic_small, s3_server):
    options = s3_server["storage_options"]
    prefix = f"s3://{s3_server['bucket']}/prepare"
    for path in sorted(Path(synthetic_small["images"]).iterdir())[:3]:
        storage.write_bytes(f"{prefix}/images/{path.name}", path.read_bytes(), options)
    storage.write_bytes(f"{prefix}/labels.csv", Path(synthetic_small["labels"]).read_bytes(), options)
    config = load_config(overrides={"data": {"images": f"{prefix}/images", "labels": f"{prefix}/labels.csv",
                                             "storage_options": options},
                                    "output": f"{prefix}/run"})
    table = run.preprocess(config)
    # 3 images, and the other labelled synthetic ids reported as missing files
    assert len(table) == 6 and (table.status == "ok").sum() >= 1
    assert set(table[table.uri.isna()].error.map(error_code)) == {"missing_file"}
    fs = s3fs.S3FileSystem(**options)
    assert fs.exists(f"{prefix}/run/qa/registered_sheet.png")
    assert any(p.endswith(".parquet") for p in fs.find(f"{prefix}/run/registered"))
