"""A scored row back as DICOM, for the PACS the radiograph came from: a Structured Report (TID 1500
Measurement Report) with the bone age, its interval, the SDS and verdict, the gate's answer, the sex and
where it came from, the algorithm (bundle hash and version) and a reference to the source image; and
the card as a Secondary Capture image. Both join the source's study, in one new series. See docs/pacs.md
(its table lists every content item and its code).

Built with highdicom, which copies the patient and study modules from the source header. Those modules
identify the patient: they go into the DICOM objects only (which go back to the PACS), never into the
parquet or a log line; `reason` strings here name no tag value.

UIDs are deterministic from the source SOPInstanceUID and the bundle's SHA-256, so a rerun replaces the
same objects rather than adding copies, and another bundle's result is a separate series.
"""

from __future__ import annotations

import hashlib
import io
import uuid
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import pandas as pd

import boneage
from boneage.clinical import gate
from boneage.data.dicomweb import RESULT_SERIES_DESCRIPTION as SERIES_DESCRIPTION

MANUFACTURER = "boneage"
# A fixed, high series number: the result series sorts after the acquisition in a viewer's list.
SERIES_NUMBER = 9901
# SERIES_DESCRIPTION: defined with the DICOMweb listing, which leaves this series out of a study's inputs.
SR_INSTANCE_NUMBER, SC_INSTANCE_NUMBER = 1, 2

# The private coding scheme for concepts no standard terminology has (docs/pacs.md lists them all).
SCHEME = "99BONEAGE"
ALGORITHM_NAME = "boneage"


def _code(value: str, meaning: str, scheme: str = SCHEME):
    from pydicom.sr.coding import Code

    return Code(value, scheme, meaning)


def _concepts() -> dict[str, Any]:
    """Every concept the SR uses, by a short key. Standard codes where one means the same thing (LOINC
    bone age, DICOM subject sex/age, SNOMED hand/normal/indeterminate/yes/no, UCUM units); 99BONEAGE
    otherwise, each with its meaning."""
    from pydicom.sr.codedict import codes

    return {
        "title": codes.DCM.ImagingMeasurementReport,
        "procedure": _code("BA-ASSESS", "Automated bone age assessment of a hand radiograph"),
        "hand": codes.SCT.Hand,
        "bone_age": _code("85151-9", "Bone age", "LN"),
        "method": _code("BA-GP-ENSEMBLE", "Greulich-Pyle scale bone age by the boneage model ensemble"),
        "lower": _code("BA-PI-LOWER", "Bone age prediction interval lower bound"),
        "upper": _code("BA-PI-UPPER", "Bone age prediction interval upper bound"),
        "level": _code("BA-PI-LEVEL", "Bone age prediction interval level"),
        "age": codes.DCM.SubjectAge,
        "sds": _code("BA-SDS", "Bone age SDS"),
        "sds_lower": _code("BA-SDS-LOWER", "Bone age SDS of the interval lower bound"),
        "sds_upper": _code("BA-SDS-UPPER", "Bone age SDS of the interval upper bound"),
        "reference_sd": _code("BA-REF-SD", "Reference SD of bone age at chronological age and sex"),
        "sds_reference": _code("BA-SDS-REF", "Bone age SDS reference"),
        "greulich_pyle": _code("GP-BRUSH", "Greulich-Pyle atlas, Brush Foundation SDs"),
        "verdict": _code("BA-VERDICT", "Bone age interpretation"),
        "accepted": _code("BA-ACCEPTED", "Bone age accepted by the rejection gate"),
        "reject": _code("BA-REJECT", "Reason the rejection gate gives"),
        "sex": codes.DCM.SubjectSex,
        "sex_source": _code("BA-SEX-SOURCE", "Source of the sex the bone age was scored under"),
        "yes": codes.SCT.Yes, "no": codes.SCT.No,
        "months": codes.UCUM.Month, "no_units": codes.UCUM.NoUnits, "percent": codes.UCUM.Percent,
    }


def _verdicts() -> dict[str, Any]:
    from pydicom.sr.codedict import codes

    return {"normal": codes.SCT.Normal,  # wholly within +-2 SD
            "uncertain": codes.SCT.Indeterminate,  # straddles -2 or +2 SD
            "delayed": _code("BA-DELAYED", "Delayed: the whole interval below -2 SDS"),
            "advanced": _code("BA-ADVANCED", "Advanced: the whole interval above +2 SDS")}


def _sexes() -> dict[str, Any]:
    from pydicom.sr.codedict import codes

    return {"F": codes.DCM.Female, "M": codes.DCM.Male, None: codes.DCM.UnknownSex}


SEX_SOURCES = {"csv": "Subjects CSV", "dicom": "DICOM header", "predicted": "Predicted by the bundle's sex classifier",
               "unknown": "Unknown"}


@dataclass(frozen=True)
class DicomResult:
    """The SR and the card's SC for one row, or why there are none (`reason`; then sr and sc are None)."""
    sr: Any = None
    sc: Any = None
    reason: str | None = None

    @property
    def sr_uid(self) -> str | None:
        return None if self.sr is None else str(self.sr.SOPInstanceUID)


def uids(source_sop_uid: str, bundle_sha256: str) -> dict[str, str]:
    """{series, sr, sc, observer, tracking}: UIDs that depend on the source instance and the bundle only
    (a rerun gives the same ones, so a PACS replaces rather than duplicates). Each is a UUID made from a
    SHA-256 of both, as a 2.25 UID (PS3.5 B.2: no organisation root needed)."""
    out = {}
    for what in ("series", "sr", "sc", "observer", "tracking"):
        digest = hashlib.sha256("\0".join((str(source_sop_uid), str(bundle_sha256), what)).encode()).digest()
        out[what] = f"2.25.{uuid.UUID(bytes=digest[:16], version=5).int}"
    return out


def _number(row: Mapping[str, Any], name: str) -> float | None:
    value = row.get(name)
    try:
        return None if value is None or pd.isna(value) else float(value)
    except (TypeError, ValueError):
        return None


def _text(row: Mapping[str, Any], name: str) -> str | None:
    value = row.get(name)
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) or value == "" else str(value)


# What an SR and SC need of their source: its study to join, and the instance they reference.
_SOURCE_UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID")
# ...and what highdicom checks of a source image (its pixel description): a header read from the file's
# first bytes must have all of these, else it was cut off before them.
_HEADER_NEEDS = (*_SOURCE_UIDS, "Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated")


def why_not(row: Mapping[str, Any], source) -> str | None:
    """Why this row and source cannot give DICOM output, as "code: explanation" (None: they can)."""
    if _text(row, "status") not in (None, "ok"):
        return f"error_row: nothing to report ({_text(row, 'error') or 'no bone age'})"
    if _number(row, "boneage_months") is None:
        return "no_boneage: the row has no bone age, nothing to report"
    if source is None:
        return "not_dicom: the input is not a DICOM file, so there is no study to join"
    missing = [k for k in _SOURCE_UIDS if not str(source.get(k) or "").strip()]
    if missing:
        return f"missing_uids: the source DICOM header lacks {', '.join(missing)}"
    return None


# Type 2 attributes of the patient and study modules that highdicom copies from the source: a real
# header often lacks some (StudyID, AccessionNumber, ReferringPhysicianName...); they are then present
# and empty in the copy, which is what type 2 allows.
_COPIED_TYPE2 = {"PatientName": None, "PatientID": None, "PatientBirthDate": None, "PatientSex": None,
                 "StudyDate": None, "StudyTime": None, "StudyID": None, "ReferringPhysicianName": None,
                 "AccessionNumber": None}


def _complete_source(source):
    """A copy of `source` with every _COPIED_TYPE2 attribute it lacks added empty (the source unchanged)."""
    import copy

    missing = [k for k in _COPIED_TYPE2 if k not in source]
    if not missing:
        return source
    out = copy.deepcopy(source)
    for keyword in missing:
        setattr(out, keyword, None)
    return out


def _measurement(concepts, key: str, value: float, unit: str, **kwargs):
    import highdicom as hd

    return hd.sr.Measurement(name=concepts[key], value=value, unit=concepts[unit], **kwargs)


def structured_report(row: Mapping[str, Any], source, bundle_sha256: str, bundle_version: str | None = None,
                      interval_level: float | None = None):
    """The TID 1500 Comprehensive SR of `row` (a scoring row) about `source` (the scored image's pydicom
    header); ValueError (with why_not's reason) when the row cannot have one."""
    import highdicom as hd

    reason = why_not(row, source)
    if reason:
        raise ValueError(reason)
    concepts, ids = _concepts(), uids(source.SOPInstanceUID, bundle_sha256)
    source = _complete_source(source)
    parameters = [f"bundle manifest sha256 {bundle_sha256}"]
    if bundle_version:
        parameters.append(f"bundle version {bundle_version}")
    algorithm = hd.sr.AlgorithmIdentification(name=ALGORITHM_NAME, version=boneage.__version__,
                                              parameters=parameters)
    measurements = [_measurement(concepts, "bone_age", _number(row, "boneage_months"), "months",
                                 method=concepts["method"], algorithm_id=algorithm,
                                 finding_sites=[hd.sr.FindingSite(concepts["hand"])])]
    # Only what the row has: a bundle without an interval, or a row without an SDS, leaves these out.
    for key, column, unit in (("lower", "boneage_lower_months", "months"), ("upper", "boneage_upper_months", "months"),
                              ("age", "chronological_age_months", "months"),
                              ("sds", "boneage_sds", "no_units"), ("sds_lower", "boneage_sds_lower", "no_units"),
                              ("sds_upper", "boneage_sds_upper", "no_units"),
                              ("reference_sd", "reference_sd_months", "months")):
        value = _number(row, column)
        if value is not None:
            measurements.append(_measurement(concepts, key, value, unit))  # the group names the algorithm
    if interval_level is not None and _number(row, "boneage_lower_months") is not None:
        measurements.append(_measurement(concepts, "level", 100.0 * float(interval_level), "percent"))

    sex = _text(row, "sex")
    evaluations = [hd.sr.QualitativeEvaluation(concepts["sex"], _sexes().get(sex, _sexes()[None])),
                   hd.sr.QualitativeEvaluation(concepts["sex_source"], _code(
                       str(_text(row, "sex_source") or "unknown"),
                       SEX_SOURCES.get(str(_text(row, "sex_source") or "unknown"), "Other")))]
    verdict = _text(row, "boneage_interpretation")
    if verdict is not None:
        if verdict not in _verdicts():
            raise ValueError(f"unknown boneage_interpretation {verdict!r}")
        evaluations += [hd.sr.QualitativeEvaluation(concepts["sds_reference"], concepts["greulich_pyle"]),
                        hd.sr.QualitativeEvaluation(concepts["verdict"], _verdicts()[verdict])]
    accepted = row.get("accepted") is True or row.get("accepted") == 1
    evaluations.append(hd.sr.QualitativeEvaluation(concepts["accepted"], concepts["yes" if accepted else "no"]))
    for name in (_text(row, "reject_reason") or "").split(";") if not accepted else ():
        if name:
            evaluations.append(hd.sr.QualitativeEvaluation(concepts["reject"], _code(
                name, gate.REASONS.get(name, name)[:64])))

    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=ids["tracking"], identifier="bone age"),
        algorithm_id=algorithm,
        finding_sites=[hd.sr.FindingSite(concepts["hand"])],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        measurements=measurements, qualitative_evaluations=evaluations)
    observer = hd.sr.ObserverContext(
        observer_type=hd.sr.CodedConcept.from_code(_device_code()),
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=ids["observer"], name=ALGORITHM_NAME, manufacturer_name=MANUFACTURER))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=concepts["procedure"], imaging_measurements=[group], title=concepts["title"])
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=report[0], series_instance_uid=ids["series"], series_number=SERIES_NUMBER,
        sop_instance_uid=ids["sr"], instance_number=SR_INSTANCE_NUMBER, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False)
    sr.SeriesDescription = SERIES_DESCRIPTION
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]  # what 99BONEAGE is (PS3.3 C.12.1.1.2)
    return sr


def _private_scheme():
    from pydicom.dataset import Dataset

    item = Dataset()
    item.CodingSchemeDesignator = SCHEME
    item.CodingSchemeName = "boneage private codes (docs/pacs.md)"
    item.CodingSchemeResponsibleOrganization = "boneage project"
    return item


def _device_code():
    from pydicom.sr.codedict import codes

    return codes.DCM.Device


def card_pixels(card: bytes | np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB of a card given as PNG bytes or an array (RGB or RGBA)."""
    if isinstance(card, (bytes, bytearray)):
        from PIL import Image

        with Image.open(io.BytesIO(card)) as image:
            card = np.asarray(image.convert("RGB"))
    pixels = np.asarray(card)
    if pixels.ndim != 3 or pixels.shape[2] not in (3, 4) or pixels.dtype != np.uint8:
        raise ValueError(f"a card must be (H, W, 3) uint8 RGB, not {pixels.shape} {pixels.dtype}")
    return np.ascontiguousarray(pixels[:, :, :3])


def secondary_capture(card: bytes | np.ndarray, source, bundle_sha256: str):
    """The card (PNG bytes or an RGB array) as an RGB Secondary Capture image in the SR's series."""
    import highdicom as hd

    ids = uids(source.SOPInstanceUID, bundle_sha256)
    source = _complete_source(source)
    laterality = next((str(v) for v in (source.get("ImageLaterality"), source.get("Laterality"))
                       if str(v or "") in ("L", "R")), None)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source, pixel_array=card_pixels(card), photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", series_instance_uid=ids["series"], series_number=SERIES_NUMBER,
        sop_instance_uid=ids["sc"], instance_number=SC_INSTANCE_NUMBER, manufacturer=MANUFACTURER,
        laterality=laterality, patient_orientation=("A", "F"))  # highdicom requires one for a PATIENT image; replaced below
    # A card is a figure, not a view of the patient: Patient Orientation is type 2, so it is present and empty.
    sc.PatientOrientation = ""
    if laterality is None:  # type 2C (a paired body part): present and empty when the source says neither side
        sc.Laterality = ""
    sc.SeriesDescription = SERIES_DESCRIPTION
    sc.ImageComments = "boneage result card: not the radiograph"
    return sc


def build(row: Mapping[str, Any], source, card: bytes | np.ndarray | None, bundle_sha256: str,
          bundle_version: str | None = None, interval_level: float | None = None) -> DicomResult:
    """The SR and SC of one scored row, or a DicomResult with the reason there are none. Never raises for
    one row's data (an error row, a PNG source, a card that is missing or bad): a batch goes on."""
    reason = why_not(row, source)
    if reason is None and card is None:
        reason = "no_card: no card to put into the Secondary Capture (see card_error)"
    if reason:
        return DicomResult(reason=reason)
    try:
        sr = structured_report(row, source, bundle_sha256, bundle_version, interval_level)
        sc = secondary_capture(card, source, bundle_sha256)
    except Exception as err:  # noqa: BLE001 - one row's DICOM must not stop the batch
        return DicomResult(reason=f"failed: {type(err).__name__}: {_first_line(err)}")
    return DicomResult(sr=sr, sc=sc)


def _first_line(err: Exception) -> str:
    return (str(err).splitlines() or [""])[0][:300]


# The SR's numeric items by the scoring column they come from (read_report's keys).
_NUMERIC_COLUMNS = {"bone_age": "boneage_months", "lower": "boneage_lower_months", "upper": "boneage_upper_months",
                    "age": "chronological_age_months", "sds": "boneage_sds", "sds_lower": "boneage_sds_lower",
                    "sds_upper": "boneage_sds_upper", "reference_sd": "reference_sd_months"}


def read_report(sr) -> dict[str, Any]:
    """A bone age SR (a highdicom SR, or a pydicom dataset of one) read back with highdicom into the
    scoring columns it holds: the numbers, boneage_interpretation, accepted, reject_reason, sex and
    sex_source, and the referenced source instance (source_sop_instance_uid)."""
    import highdicom as hd

    sr = hd.sr.ComprehensiveSR.from_dataset(sr)  # also for one built here: its content becomes the template
    group = sr.content.get_image_measurement_groups()[0]
    concepts = _concepts()
    out: dict[str, Any] = {}
    for key, column in _NUMERIC_COLUMNS.items():
        found = group.get_measurements(name=concepts[key])
        out[column] = float(found[0].value) if found else None

    def coded(key: str) -> list[Any]:
        return [item.value for item in group.get_qualitative_evaluations(name=concepts[key])]

    verdicts = {(c.value, c.scheme_designator): name for name, c in _verdicts().items()}
    verdict = coded("verdict")
    out["boneage_interpretation"] = verdicts[(verdict[0].value, verdict[0].scheme_designator)] if verdict else None
    out["accepted"] = coded("accepted")[0].value == concepts["yes"].value
    out["reject_reason"] = ";".join(c.value for c in coded("reject")) or None
    sex = coded("sex")[0].value
    out["sex"] = sex if sex in ("F", "M") else None
    out["sex_source"] = coded("sex_source")[0].value
    out["source_sop_instance_uid"] = group.source_images[0].referenced_sop_instance_uid
    return out


def check_installed() -> None:
    """UserError (exit status 2, before any work) when highdicom, the pacs extra, is missing."""
    import importlib.util

    if importlib.util.find_spec("highdicom") is None:
        from boneage.errors import UserError

        raise UserError("--dicom-out needs highdicom: pip install 'boneage[pacs]'") from None


# --dicom-out DIR: DIR/<id>/SR_NAME and DIR/<id>/SC_NAME.
SR_NAME, SC_NAME = "sr.dcm", "card.dcm"


def output_uris(folder: str, rid: str) -> tuple[str, str]:
    """(SR, SC) URIs of a row under `folder`: FOLDER/<id>/sr.dcm and card.dcm; ValueError for an id that is
    not a plain relative path (cards.safe_id: ids can come from a DICOM header)."""
    from boneage.clinical.cards import safe_id
    from boneage.data import storage

    base = storage.join_uri(folder, safe_id(rid))
    return storage.join_uri(base, SR_NAME), storage.join_uri(base, SC_NAME)


def read_source_header(uri: str, storage_options: Mapping[str, Any] | None = None):
    """The scored file's DICOM header (no pixel data), read again where the row is scored: from its first
    dicom.HEADER_BYTES when they hold the UIDs the output needs, else from the whole file (ItemError when
    it cannot be read)."""
    from boneage.data import dicom, storage

    try:
        fs, path = storage.filesystem(uri, storage_options)
        header = dicom._dcmread(fs.cat_file(path, start=0, end=dicom.HEADER_BYTES), str(uri), stop_before_pixels=True)
        if all(str(header.get(k) or "").strip() for k in _HEADER_NEEDS):
            return header
    except Exception:  # noqa: BLE001 - cut off mid-element, or a read that failed: the whole file says why
        pass
    return dicom._dcmread(storage.read_bytes(uri, storage_options), str(uri), stop_before_pixels=True)


def _to_bytes(dataset) -> bytes:
    out = io.BytesIO()
    dataset.save_as(out, enforce_file_format=True)  # a Part 10 file: preamble, DICM, file meta
    return out.getvalue()


def make_outputs(table, cards: list, bundle_sha256: str, bundle_version: str | None = None,
                 interval_level: float | None = None, storage_options: Mapping[str, Any] | None = None,
                 card_errors: list | None = None, read_header=None) -> list[DicomResult]:
    """The SR and SC of each scoring row of `table` (with `uri`, `format`, `id`) and its card (PNG bytes
    or None, same order), for rows that came from a DICOM file, or why there are none. The source header
    is read again, by `read_header(uri)` (default: read_source_header; a DICOMweb input: its Reader's
    WADO-RS metadata). `card_errors` (same order): why a card is missing, repeated in the no_card reason
    (the table has no card_error column without --cards). One row's failure never stops the others."""
    read_header = read_header or (lambda uri: read_source_header(uri, storage_options))
    results = []
    card_errors = card_errors if card_errors is not None else [None] * len(cards)
    for row, card, card_error in zip(table.to_dict("records"), cards, card_errors):
        try:
            source = None
            if why_not(row, {k: "-" for k in _SOURCE_UIDS}) is None and str(row.get("format") or "") == "dicom":
                source = read_header(row["uri"])  # only where it can be used
            result = build(row, source, card, bundle_sha256, bundle_version, interval_level)
        except Exception as err:  # noqa: BLE001 - one row's DICOM must not stop the others
            result = DicomResult(reason=f"failed: {type(err).__name__}: {_first_line(err)}")
        if card_error and str(result.reason).startswith("no_card"):
            result = DicomResult(reason=f"{result.reason}: {card_error}")
        results.append(result)
    return results


def write_files(results: list[DicomResult], ids, folder: str,
                storage_options: Mapping[str, Any] | None = None) -> list[DicomResult]:
    """Each result's SR and SC at output_uris(FOLDER, id); a row whose files cannot be written (an unsafe
    id, a failed write) gets that reason instead."""
    from boneage.data import storage

    written = []
    for result, rid in zip(results, ids):
        if result.reason is None:
            try:
                sr_uri, sc_uri = output_uris(folder, rid)
                storage.write_bytes(sr_uri, _to_bytes(result.sr), storage_options)
                storage.write_bytes(sc_uri, _to_bytes(result.sc), storage_options)
            except Exception as err:  # noqa: BLE001 - one row's DICOM must not stop the others
                result = DicomResult(reason=f"failed: {type(err).__name__}: {_first_line(err)}")
        written.append(result)
    return written


STOWED = "stored"  # dicom_stow of a row whose SR and SC the service took


def stow(results: list[DicomResult], send) -> list[str | None]:
    """Send each result's SR and SC with `send([sr, sc])` (boneage.data.dicomweb.Reader.store): the
    `dicom_stow` column, STOWED, "failed: why" (a resumed run scores and sends that row again), or None
    where there is nothing to send (dicom_error says why)."""
    sent = []
    for result in results:
        if result.reason is not None:
            sent.append(None)
            continue
        try:
            send([result.sr, result.sc])
            sent.append(STOWED)
        except Exception as err:  # noqa: BLE001 - one row's failure must not stop the others
            sent.append(f"failed: {_first_line(err)}")
    return sent


def write_outputs(table, cards: list, folder: str, bundle_sha256: str, bundle_version: str | None = None,
                  interval_level: float | None = None, storage_options: Mapping[str, Any] | None = None,
                  card_errors: list | None = None) -> tuple[list, list]:
    """make_outputs, then write_files under `folder`. Returns (SR SOPInstanceUID or None, reason or None)
    lists: a row without DICOM output says why, and never stops the others."""
    results = write_files(make_outputs(table, cards, bundle_sha256, bundle_version, interval_level, storage_options,
                                       card_errors), table["id"].tolist(), folder, storage_options)
    return [r.sr_uid for r in results], [r.reason for r in results]
