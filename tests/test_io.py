"""Reading inputs: boneage.data.images (listing, ids, decoding), boneage.data.dicom, boneage.data.labels (labels, key
points) and boneage.data.storage (writing), locally and on S3 (moto server)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from boneage.data import images, labels, storage
from boneage.errors import ItemError
from boneage.registration.frame import KEYPOINT_NAMES

REAL_DIR = Path(__file__).parent / "fixtures" / "real"  # see README.md there

REAL_IDS = ["1402", "1563", "1675", "1684"]


# --- builders ---------------------------------------------------------------------------------


def hand_like(h=120, w=90, dtype=np.uint8, hi=255, seed=0) -> np.ndarray:
    """A non-constant test image: a gradient plus noise, in [0, hi]."""
    rng = np.random.default_rng(seed)
    base = np.linspace(0, 1, h * w).reshape(h, w) * 0.8 + rng.random((h, w)) * 0.2
    return (base * hi).astype(dtype)


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, "PNG") if mode else Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


IDENTIFYING = {
    "PatientName": "Doe^Jane^Identifying",
    "PatientID": "MRN-0099887766",
    "InstitutionName": "Saint Example Children's Hospital",
    "ReferringPhysicianName": "House^Gregory",
    "AccessionNumber": "ACC-55443322",
}


def dicom_bytes(
    pixels: np.ndarray | None,
    photometric: str = "MONOCHROME2",
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    sex: str | None = "F",
    birth: str | None = "20100115",
    study: str | None = "20200715",
    age: str | None = None,
    frames: int | None = None,
) -> bytes:
    """A DX-like DICOM Part 10 file built with pydicom, with identifying tags filled in."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = sop_class
    file_meta.MediaStorageSOPInstanceUID = generate_uid()
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "DX"
    for key, value in IDENTIFYING.items():
        setattr(ds, key, value)
    if sex is not None:
        ds.PatientSex = sex
    if birth is not None:
        ds.PatientBirthDate = birth
    if study is not None:
        ds.StudyDate = study
    if age is not None:
        ds.PatientAge = age
    ds.ImagerPixelSpacing = [0.143, 0.143]
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        if frames:
            ds.NumberOfFrames = frames
        ds.PixelData = pixels.astype("<u2").tobytes()
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = slope, intercept or 0, "US"
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def code_of(fn, *args, **kw) -> str:
    with pytest.raises(ItemError) as info:
        fn(*args, **kw)
    assert str(info.value).startswith(info.value.code + ": ")
    return info.value.code


# --- PNG / JPEG ---------------------------------------------------------------------------------


def test_png_8bit_gray_is_kept_exactly():
    arr = hand_like()
    image, meta = images.decode_image(png_bytes(arr), "a.png")
    assert image.dtype == np.uint8 and np.array_equal(image, arr)
    assert tuple(meta) == images.META_KEYS
    assert meta["format"] == "png" and meta["window"] == "none" and meta["sex"] is None


def test_png_16bit_is_windowed_robustly():
    arr = hand_like(dtype=np.uint16, hi=4000)
    arr[0, :5] = 65535  # a few hot pixels must not squeeze the hand into a few grey levels
    image, meta = images.decode_image(png_bytes(arr), "a16.png")
    assert Image.open(io.BytesIO(png_bytes(arr))).mode.startswith("I")
    assert image.dtype == np.uint8 and image.shape == arr.shape
    assert meta["orig_dtype"] == "uint16" and meta["window"] == "percentile"
    assert image.min() == 0 and image.max() == 255
    assert np.percentile(image, 50) > 80  # the bulk spans the range, not crushed near 0
    assert np.corrcoef(image[1:].ravel(), arr[1:].ravel())[0, 1] > 0.99  # order preserved


def test_png_rgb_and_rgba_become_luminance():
    gray = hand_like()
    rgb = np.stack([gray] * 3, axis=-1)
    image, meta = images.decode_image(png_bytes(rgb), "rgb.png")
    assert np.array_equal(image, gray) and meta["window"] == "luminance" and meta["orig_mode"] == "RGB"
    rgba = np.concatenate([rgb, np.full(gray.shape + (1,), 128, np.uint8)], axis=-1)
    image, meta = images.decode_image(png_bytes(rgba), "rgba.png")
    assert np.array_equal(image, gray) and meta["orig_mode"] == "RGBA"
    red = np.zeros_like(rgb)
    red[..., 0] = gray
    image, _ = images.decode_image(png_bytes(red), "red.png")
    assert np.abs(image.astype(int) - np.round(gray * 0.299)).max() <= 1


def test_jpeg_decodes_and_applies_exif_orientation():
    arr = hand_like(h=128, w=96)
    image, meta = images.decode_image(jpeg_bytes(arr), "a.jpg")
    assert meta["format"] == "jpeg" and image.shape == arr.shape
    assert np.abs(image.astype(int) - arr).mean() < 3
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    image, _ = images.decode_image(jpeg_bytes(arr, exif=exif.tobytes()), "rot.jpg")
    assert image.shape == (96, 128)


def test_type_comes_from_magic_bytes_not_extension():
    arr = hand_like()
    image, meta = images.decode_image(png_bytes(arr), "actually_png.jpg")
    assert meta["format"] == "png" and np.array_equal(image, arr)


# --- DICOM --------------------------------------------------------------------------------------


def test_dicom_monochrome2_rescale_and_percentile_window():
    stored = hand_like(dtype=np.uint16, hi=4000)
    image, meta = images.decode_image(dicom_bytes(stored, slope=2.0, intercept=-1000), "a.dcm")
    assert image.dtype == np.uint8 and image.shape == stored.shape
    assert meta["format"] == "dicom" and meta["window"] == "percentile" and not meta["inverted"]
    assert meta["orig_mode"] == "MONOCHROME2" and meta["pixel_spacing_mm"] == [0.143, 0.143]
    assert np.corrcoef(image.ravel(), stored.ravel())[0, 1] > 0.99  # bright stays bright


def test_dicom_voi_window_uses_rescaled_values():
    stored = np.tile(np.arange(0, 4000, 4000 / 96, dtype=np.float64), (100, 1)).astype(np.uint16)
    # value = 2 * stored - 1000; window centre 1000 width 2000 maps [0, 2000] to [0, 255]
    image, meta = images.decode_image(dicom_bytes(stored, slope=2.0, intercept=-1000, window=(1000, 2000)), "w.dcm")
    assert meta["window"] == "voi"
    value = 2.0 * stored - 1000
    assert (image[value <= 0] == 0).all() and (image[value >= 2000] == 255).all()
    mid = (value > 200) & (value < 1800)
    expected = np.clip(((value - 999.5) / 1999 + 0.5) * 255, 0, 255)
    assert np.abs(image[mid] - expected[mid]).max() <= 1


def test_dicom_monochrome1_is_inverted():
    stored = hand_like(dtype=np.uint16, hi=4000)
    mono2, _ = images.decode_image(dicom_bytes(stored, "MONOCHROME2"), "m2.dcm")
    mono1, meta = images.decode_image(dicom_bytes(stored, "MONOCHROME1"), "m1.dcm")
    assert meta["inverted"] and meta["orig_mode"] == "MONOCHROME1"
    assert np.array_equal(mono1, 255 - mono2)


def test_dicom_meta_has_sex_and_age_but_nothing_identifying():
    data = dicom_bytes(hand_like(dtype=np.uint16, hi=4000), sex="F", birth="20100115", study="20200715")
    for value in IDENTIFYING.values():
        assert value.encode() in data  # the test file really carries them
    _, meta = images.decode_image(data, "id.dcm")
    assert set(meta) == set(images.META_KEYS)
    assert meta["sex"] == "F" and meta["age_source"] == "dates"
    assert meta["age_months"] == pytest.approx(126.0, abs=0.5)  # 10 y 6 m
    text = json.dumps(meta, default=str)
    for value in list(IDENTIFYING.values()) + ["20100115", "20200715", "2010", "2020"]:
        for part in value.replace("^", " ").split():
            assert part not in text, part


def test_dicom_age_from_patient_age_and_unknown_sex():
    data = dicom_bytes(hand_like(dtype=np.uint16, hi=4000), sex="O", birth=None, study="20200715", age="010Y")
    _, meta = images.decode_image(data, "age.dcm")
    assert meta["age_months"] == 120 and meta["age_source"] == "PatientAge" and meta["sex"] is None
    _, meta = images.decode_image(dicom_bytes(hand_like(dtype=np.uint16), sex=None, birth=None, study=None), "x.dcm")
    assert meta["age_months"] is None and meta["age_source"] is None and meta["sex"] is None


def test_dicom_multiframe_takes_first_frame():
    frames = np.stack([hand_like(dtype=np.uint16, hi=4000, seed=s) for s in (1, 2)])
    multi, meta = images.decode_image(dicom_bytes(frames, frames=2), "mf.dcm")
    single, _ = images.decode_image(dicom_bytes(frames[0]), "f0.dcm")
    assert meta["n_frames"] == 2 and np.array_equal(multi, single)


def test_bad_dicom_corrupt_header_and_no_pixel_data():
    good = dicom_bytes(hand_like(dtype=np.uint16, hi=4000))
    corrupt = good[:132] + b"\xff" * 64 + good[196:]
    assert code_of(images.decode_image, corrupt, "corrupt.dcm") == "bad_dicom"
    assert code_of(images.decode_image, dicom_bytes(None), "nopix.dcm") == "bad_dicom"


def test_truncated_dicom_pixel_data():
    good = dicom_bytes(hand_like(dtype=np.uint16, hi=4000))
    assert code_of(images.decode_image, good[: len(good) - 5000], "cut.dcm") == "truncated"
    assert code_of(images.decode_image, good[:400], "cut_in_header.dcm") == "bad_dicom"


# --- errors -------------------------------------------------------------------------------------


def test_missing_and_empty_file(tmp_path):
    assert code_of(images.read_image, str(tmp_path / "nope.png")) == "missing_file"
    (tmp_path / "empty.png").write_bytes(b"")
    assert code_of(images.read_image, str(tmp_path / "empty.png")) == "empty_file"


def test_unreadable_location_is_read_failed():
    assert code_of(images.read_image, "nosuchprotocol://bucket/a.png") == "read_failed"


def test_truncated_png_and_jpeg():
    png = png_bytes(hand_like(h=300, w=200))
    assert code_of(images.decode_image, png[: len(png) // 2], "half.png") == "truncated"
    assert code_of(images.decode_image, png[:-12], "no_iend.png") == "truncated"  # PIL alone accepts this
    assert code_of(images.decode_image, png[:30], "header.png") == "truncated"
    jpg = jpeg_bytes(hand_like(h=300, w=200))
    assert code_of(images.decode_image, jpg[: len(jpg) // 2], "half.jpg") == "truncated"
    assert code_of(images.decode_image, jpg[:-2], "no_eoi.jpg") == "truncated"
    assert code_of(images.decode_image, jpg[:100], "header.jpg") == "truncated"


def test_corrupt_png_data():
    png = bytearray(png_bytes(hand_like(h=300, w=200)))
    png[len(png) // 2] ^= 0xFF
    assert code_of(images.decode_image, bytes(png), "flip.png") == "corrupt_image"


def test_not_an_image(tmp_path):
    rng = np.random.default_rng(1)
    assert code_of(images.decode_image, rng.bytes(5000), "random.png") == "not_an_image"
    (tmp_path / "notes.png").write_text("this is a text file, not a radiograph\n")
    with pytest.raises(ItemError, match="text") as info:
        images.read_image(str(tmp_path / "notes.png"))
    assert info.value.code == "not_an_image"
    gif = io.BytesIO()
    Image.fromarray(hand_like()).save(gif, "GIF")
    with pytest.raises(ItemError, match="GIF"):
        images.decode_image(gif.getvalue(), "x.gif")


def test_bad_image_too_small_or_constant():
    assert code_of(images.decode_image, png_bytes(hand_like(h=63, w=200)), "small.png") == "bad_image"
    assert code_of(images.decode_image, png_bytes(np.full((100, 100), 7, np.uint8)), "flat.png") == "bad_image"
    flat16 = np.full((100, 100), 3000, np.uint16)
    assert code_of(images.decode_image, png_bytes(flat16), "flat16.png") == "bad_image"
    assert code_of(images.decode_image, dicom_bytes(flat16), "flat.dcm") == "bad_image"


# --- listing ------------------------------------------------------------------------------------


def test_list_images_folder_txt_and_list(tmp_path, capsys):
    (tmp_path / "sub" / "deeper").mkdir(parents=True)
    (tmp_path / "b.png").write_bytes(b"x")
    (tmp_path / "a.JPG").write_bytes(b"x")
    (tmp_path / "sub" / "c.jpeg").write_bytes(b"x")
    (tmp_path / "sub" / "deeper" / "d.dcm").write_bytes(b"x")
    (tmp_path / "sub" / "1.2.840.99").write_bytes(dicom_bytes(hand_like(dtype=np.uint16)))  # UID-named DICOM
    (tmp_path / "README").write_text("not an image")
    (tmp_path / "labels.csv").write_text("id,boneage,male\n")
    (tmp_path / ".hidden.png").write_bytes(b"x")
    (tmp_path / "._b.png").write_bytes(b"x")
    found = images.list_images(str(tmp_path))
    names = [p[len(str(tmp_path)) + 1 :] for p in found]
    assert names == ["a.JPG", "b.png", "sub/1.2.840.99", "sub/c.jpeg", "sub/deeper/d.dcm"]
    said = capsys.readouterr().out  # what was left out is said, not dropped silently
    assert "1 file(s) under" in said and f"{tmp_path}/README" in said
    assert [images.image_id(p) for p in found] == ["a", "b", "1.2.840.99", "c", "d"]
    assert images.list_images(str(tmp_path)) == found  # deterministic
    assert [p.rsplit("/", 1)[1] for p in images.list_images(tmp_path, recursive=False)] == ["a.JPG", "b.png"]

    listing = tmp_path / "inputs.txt"
    listing.write_text(f"# my images\n{tmp_path}/b.png\n\n{tmp_path}/missing.png\n{tmp_path}/a.JPG\n")
    assert images.list_images(str(listing)) == sorted([f"{tmp_path}/b.png", f"{tmp_path}/missing.png", f"{tmp_path}/a.JPG"])
    assert images.list_images(["/d/z.png", "s3://b/y.png", "/d/z.png"]) == ["/d/z.png", "s3://b/y.png"]
    relative = tmp_path / "rel.txt"
    relative.write_text("b.png\nsub/c.jpeg\n")
    assert images.list_images(str(relative)) == [f"{tmp_path}/b.png", f"{tmp_path}/sub/c.jpeg"]
    with pytest.raises(FileNotFoundError):
        images.list_images(str(tmp_path / "nowhere"))


# --- labels -------------------------------------------------------------------------------------


def _labels(tmp_path, text, **kw):
    path = tmp_path / "labels.csv"
    path.write_text(text)
    return labels.read_labels(str(path), **kw)


def test_labels_train_variant_with_per_row_errors(tmp_path):
    df, errors = _labels(
        tmp_path,
        "id,boneage,male\n"
        "1,100,True\n2,50.5,false\n3,12,1\n4,200,0\n"
        "5,,True\n6,NaN,True\n7,abc,True\n8,241,True\n9,-1,False\n"
        "10,100,maybe\n11,100,True\n11,101,True\n",
    )
    assert list(df.columns) == ["id", "boneage", "male"]
    assert df.to_dict("list") == {"id": ["1", "2", "3", "4"], "boneage": [100.0, 50.5, 12.0, 200.0],
                                  "male": [True, False, True, False]}
    assert df["male"].dtype == bool and df["boneage"].dtype == float
    assert {k: e.code for k, e in errors.items()} == {
        "5": "bad_label", "6": "bad_label", "7": "bad_label", "8": "bad_label", "9": "bad_label",
        "10": "unknown_sex", "11": "duplicate_id",
    }


def test_labels_validation_variant(tmp_path):
    df, errors = _labels(tmp_path, "Image ID,male,Bone Age (months)\n1386,FALSE,30\n1392,TRUE,162\n1397,TRUE,\n")
    assert df["id"].tolist() == ["1386", "1392"] and df["male"].tolist() == [False, True]
    assert df["boneage"].tolist() == [30.0, 162.0]
    assert errors["1397"].code == "bad_label"


def test_labels_test_variant(tmp_path):
    df, errors = _labels(
        tmp_path,
        "Case ID,Sex,Ground truth bone age (months)\n4360,M,168.934\n4361,F,169.652\n4362,X,100\n4363,F,300\n",
    )
    assert df.to_dict("list") == {"id": ["4360", "4361"], "boneage": [168.934, 169.652], "male": [True, False]}
    assert errors["4362"].code == "unknown_sex" and errors["4363"].code == "bad_label"


def test_labels_sex_only_for_scoring(tmp_path):
    df, errors = _labels(tmp_path, "id,male\n1,True\n2,False\n3,?\n", require_age=False)
    assert df["id"].tolist() == ["1", "2"] and df["boneage"].isna().all()
    assert errors["3"].code == "unknown_sex"
    df, errors = _labels(tmp_path, "id,boneage,male\n1,,True\n2,999,True\n", require_age=False)
    assert df["id"].tolist() == ["1"] and errors["2"].code == "bad_label"
    with pytest.raises(ValueError, match="bone age"):
        _labels(tmp_path, "id,male\n1,True\n")


def test_labels_ids_from_file_names_and_float_columns(tmp_path):
    df, errors = _labels(tmp_path, "id,boneage,male\n1377.png,10,1\n1378.0,11,0\n1379.PNG,12,1\n1379,13,1\n")
    assert df["id"].tolist() == ["1377", "1378"] and errors["1379"].code == "duplicate_id"
    df, errors = _labels(tmp_path, "id,boneage,male\n")
    assert len(df) == 0 and errors == {} and list(df.columns) == ["id", "boneage", "male"]


def test_labels_missing_columns_raise(tmp_path):
    with pytest.raises(ValueError) as info:
        _labels(tmp_path, "name,age\nx,3\n")
    msg = str(info.value)
    assert "['name', 'age']" in msg and "Case ID,Sex" in msg and "id,boneage,male" in msg


# --- key points ---------------------------------------------------------------------------------

VIA_HEADER = "filename,file_size,file_attributes,region_count,region_id,region_shape_attributes,region_attributes\n"


def _via_row(fname, n, i, x, y, attrs=None):
    shape = json.dumps({"name": "point", "cx": x, "cy": y}).replace('"', '""')
    attrs = json.dumps(attrs or {}).replace('"', '""')
    return f'{fname},1234,"{{}}",{n},{i},"{shape}","{attrs}"\n'


def test_via_csv_named_ordered_and_missing(tmp_path):
    text = VIA_HEADER
    # named, given out of order and with liberal names
    text += _via_row("10.png", 3, 0, 30, 40, {"point": "Thumb"})
    text += _via_row("10.png", 3, 1, 10, 20, {"point": "middle finger tip"})
    text += _via_row("10.png", 3, 2, 11, 90, {"point": "capitate"})
    # no attributes: regions in order are finger tip, capitate, thumb tip
    text += _via_row("11.png", 3, 2, 5, 6)
    text += _via_row("11.png", 3, 0, 1, 2)
    text += _via_row("11.png", 3, 1, 3, 4)
    # a point missing
    text += _via_row("12.png", 2, 0, 1, 2, {"point": "tip"})
    text += _via_row("12.png", 2, 1, 3, 4, {"point": "capitate"})
    # no regions at all
    text += '13.png,1234,"{}",0,0,"{}","{}"\n'
    path = tmp_path / "via.csv"
    path.write_text(text)
    points, errors = labels.read_keypoints(str(path))
    assert np.array_equal(points["10"], [[10, 20], [11, 90], [30, 40]])
    assert np.array_equal(points["11"], [[1, 2], [3, 4], [5, 6]])
    assert points["10"].shape == (3, 2) and len(KEYPOINT_NAMES) == 3
    assert set(points) == {"10", "11"}
    assert errors["12"].code == "bad_keypoints" and "thumb_tip" in str(errors["12"])
    assert errors["13"].code == "bad_keypoints"


def _via_region(x, y, name=None):
    return {"shape_attributes": {"name": "point", "cx": x, "cy": y},
            "region_attributes": {"name": name} if name else {}}


def test_via_json_project_and_plain_export(tmp_path):
    export = {
        "20.png1234": {"filename": "20.png", "size": 1234, "file_attributes": {},
                       "regions": [_via_region(1, 2, "finger_tip"), _via_region(3, 4, "capitate"),
                                   _via_region(5, 6, "thumb_tip")]},
        "21.png99": {"filename": "21.png", "size": 99, "file_attributes": {},
                     "regions": [_via_region(1, 2, "finger_tip"), _via_region(3, 4, "finger_tip"),
                                 _via_region(5, 6, "thumb_tip")]},
        "22.jpg5": {"filename": "22.jpg", "size": 5, "file_attributes": {},
                    "regions": {"0": _via_region(7, 8), "1": _via_region(9, 10), "2": _via_region(11, 12)}},
    }
    project = {"_via_settings": {}, "_via_img_metadata": export, "_via_attributes": {}}
    for obj in (project, export):
        path = tmp_path / "via.json"
        path.write_text(json.dumps(obj))
        points, errors = labels.read_keypoints(str(path))
        assert np.array_equal(points["20"], [[1, 2], [3, 4], [5, 6]])
        assert np.array_equal(points["22"], [[7, 8], [9, 10], [11, 12]])
        assert errors["21"].code == "bad_keypoints" and "twice" in str(errors["21"])


def test_via_checkbox_attributes_and_non_point_regions(tmp_path):
    rect = {"shape_attributes": {"name": "rect", "x": 0, "y": 0, "width": 5, "height": 5},
            "region_attributes": {"label": "marker"}}
    export = {"30.png1": {"filename": "30.png", "size": 1, "regions": [
        rect,
        {"shape_attributes": {"name": "point", "cx": 1, "cy": 2}, "region_attributes": {"kp": {"finger_tip": True}}},
        {"shape_attributes": {"name": "circle", "cx": 3, "cy": 4, "r": 2}, "region_attributes": {"capitate": True}},
        {"shape_attributes": {"name": "point", "cx": 5, "cy": 6}, "region_attributes": {"kp": {"thumb": True, "tip": False}}},
    ]}, "31.png1": {"filename": "31.png", "size": 1, "regions": [
        {"shape_attributes": {"name": "point", "cx": 1, "cy": 2}, "region_attributes": {"kp": "wrist"}},
    ]}}
    path = tmp_path / "via.json"
    path.write_text(json.dumps(export))
    points, errors = labels.read_keypoints(str(path))
    assert np.array_equal(points["30"], [[1, 2], [3, 4], [5, 6]])
    assert errors["31"].code == "bad_keypoints"  # named, but none of ours


def test_plain_keypoint_csv(tmp_path):
    path = tmp_path / "kp.csv"
    path.write_text(
        "id,finger_tip_x,finger_tip_y,capitate_x,capitate_y,thumb_tip_x,thumb_tip_y\n"
        "1,10,20,11,90,30,40\n2,10,,11,90,30,40\n3,1,2,3,4,5,6\n3,1,2,3,4,5,6\n"
    )
    points, errors = labels.read_keypoints(str(path))
    assert np.array_equal(points["1"], [[10, 20], [11, 90], [30, 40]]) and set(points) == {"1"}
    assert errors["2"].code == "bad_keypoints" and errors["3"].code == "duplicate_id"
    path.write_text("id,a_x,a_y\n1,2,3\n")
    with pytest.raises(ValueError, match="finger_tip_x"):
        labels.read_keypoints(str(path))


# --- real radiographs -----------------------------------------------------------------------------


def test_real_radiographs_labels_and_hand21():
    paths = images.list_images(str(REAL_DIR))
    assert [images.image_id(p) for p in paths] == REAL_IDS
    for path in paths:
        rec = images.read_image(path)
        with Image.open(path) as im:
            assert (rec.width, rec.height) == im.size
        assert rec.image.dtype == np.uint8 and rec.meta["format"] == "png" and rec.image.std() > 10
    df, errors = labels.read_labels(str(REAL_DIR / "labels.csv"))
    assert errors == {} and df["id"].tolist() == REAL_IDS
    assert df.set_index("id").loc["1402"].tolist() == [24.0, False]
    hand = labels.read_hand21(str(REAL_DIR / "keypoints_hand21.csv"))
    assert sorted(hand) == REAL_IDS
    for pts in hand.values():
        assert tuple(pts) == labels.HAND21_NAMES
        # the middle finger tip is above (smaller y than) the wrist on these upright hands
        assert pts[labels.HAND21_TO_KEYPOINTS["finger_tip"]][1] < pts["wrist"][1]


# --- writing ------------------------------------------------------------------------------------


def test_write_local_creates_folders(tmp_path):
    target = storage.join_uri(str(tmp_path), "a/b", "c.bin")
    storage.write_bytes(target, b"hello")
    assert (tmp_path / "a" / "b" / "c.bin").read_bytes() == b"hello"
    with storage.open_output(storage.join_uri(str(tmp_path), "t", "x.txt"), "w") as f:
        f.write("text")
    assert (tmp_path / "t" / "x.txt").read_text() == "text"
    assert storage.join_uri("s3://bucket/", "/runs", "x.parquet") == "s3://bucket/runs/x.parquet"


# --- S3 (moto server on loopback) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_real(s3_server):
    """The real fixtures uploaded under s3://<bucket>/real/, plus one bad file."""
    so = s3_server["storage_options"]
    base = f"s3://{s3_server['bucket']}/real"
    for path in sorted(REAL_DIR.iterdir()):
        storage.write_bytes(f"{base}/{path.name}", path.read_bytes(), so)
    storage.write_bytes(f"{base}/nested/bad.png", b"not a png", so)
    return base, so


@pytest.mark.s3
def test_s3_list_and_read_images(s3_real):
    base, so = s3_real
    uris = images.list_images(base, storage_options=so)
    assert uris == [f"{base}/{i}.png" for i in REAL_IDS] + [f"{base}/nested/bad.png"]
    assert images.list_images(base, recursive=False, storage_options=so) == uris[:4]
    rec = images.read_image(uris[0], storage_options=so)
    local = images.read_image(str(REAL_DIR / f"{REAL_IDS[0]}.png"))
    assert rec.id == REAL_IDS[0] and rec.uri == uris[0] and np.array_equal(rec.image, local.image)
    assert code_of(images.read_image, uris[-1], storage_options=so) == "not_an_image"
    assert code_of(images.read_image, f"{base}/absent.png", storage_options=so) == "missing_file"


@pytest.mark.s3
def test_s3_labels_txt_list_and_output(s3_real):
    base, so = s3_real
    df, errors = labels.read_labels(f"{base}/labels.csv", storage_options=so)
    assert df["id"].tolist() == REAL_IDS and errors == {}
    assert sorted(labels.read_hand21(f"{base}/keypoints_hand21.csv", storage_options=so)) == REAL_IDS
    storage.write_bytes(f"{base}/list.txt", f"{base}/1684.png\n{base}/1402.png\n".encode(), so)
    assert images.list_images(f"{base}/list.txt", storage_options=so) == [f"{base}/1402.png", f"{base}/1684.png"]
    with storage.open_output(f"{base}/out/table.csv", "w", so) as f:
        pd.DataFrame({"a": [1, 2]}).to_csv(f, index=False)
    with storage.open_output(f"{base}/out/table.csv", "rb", so) as f:
        assert f.read() == b"a\n1\n2\n"


@pytest.mark.s3
def test_s3_endpoint_from_environment(s3_real, monkeypatch):
    """Without storage_options, s3fs (botocore) finds the endpoint in AWS_ENDPOINT_URL."""
    s3fs = pytest.importorskip("s3fs")
    base, so = s3_real
    monkeypatch.setenv("AWS_ENDPOINT_URL", so["client_kwargs"]["endpoint_url"])
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "eu-west-1")
    s3fs.S3FileSystem.clear_instance_cache()  # a cached instance would not look at the env again
    try:
        assert len(images.list_images(base)) == 5
        assert images.read_image(f"{base}/1563.png").image.shape == (1022, 757)
    finally:
        s3fs.S3FileSystem.clear_instance_cache()


def test_labels_with_a_patient_column_give_hashed_groups(tmp_path):
    from boneage.data.patients import patient_group

    path = tmp_path / "labels.csv"
    path.write_text("id,boneage,male,Patient ID\n1,10,True,A-17\n2,22,True,A-17\n3,30,False,\n4,40,False,B-2\n")
    df, errors = labels.read_labels(str(path))
    assert errors == {} and list(df.columns) == ["id", "boneage", "male", "group"]
    assert df.group.tolist()[:2] == [patient_group("A-17")] * 2 and pd.isna(df.group[2])  # empty: no patient
    assert df.group[3] == patient_group("B-2")
    assert patient_group("A-17").startswith("g") and len(patient_group("A-17")) == 17
    assert "A-17" not in "".join(map(str, df.group)) and patient_group("A-17") != patient_group("A-18")


def test_a_pixel_limit_refuses_from_the_header_before_decoding():
    """decode_image(max_pixels=): PNG and DICOM larger than the limit are bad_image, smaller ones decode."""
    pixels = np.tile(np.arange(200, dtype=np.uint16) * 100, (300, 1))  # 300 x 200 = 60,000 px
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(buffer, format="PNG")
    for data in (buffer.getvalue(), dicom_bytes(pixels)):
        with pytest.raises(ItemError) as refused:
            images.decode_image(data, "big", max_pixels=59_999)
        assert refused.value.code == "bad_image" and "200x300 px" in str(refused.value)
        assert images.decode_image(data, "fits", max_pixels=60_000)[0].shape == (300, 200)
