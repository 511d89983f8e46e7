"""The derived objects of one predicted radiograph, in the source study: a Comprehensive SR (the qualitative
evaluation "Pneumonia" present / absent / not assessed, the calibrated probability, the threshold, the model, the
warnings, a reference to the source image) and a Secondary Capture of the Grad-CAM overlay. Both say they are
derived and not for primary diagnosis. ``send`` stores them on a remote AE with C-STORE."""
from __future__ import annotations

import io
import logging

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoscope import __version__
from pneumoscope.inference.assess import NOT_ASSESSED

log = logging.getLogger(__name__)

MANUFACTURER = "pneumoscope"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
DISCLAIMER = "derived by pneumoscope, decision support, not for primary diagnosis"
SR_SERIES_DESCRIPTION = "pneumoscope pneumonia SR (derived, not for primary diagnosis)"
SC_SERIES_DESCRIPTION = "pneumoscope Grad-CAM (derived, not for primary diagnosis)"
_LOCAL = "99PNEUMOSCOPE"
PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
NOT_ASSESSED_CODE = hd.sr.CodedConcept("NA-1", _LOCAL, "Not assessed")
PROBABILITY = hd.sr.CodedConcept("P-CAL", _LOCAL, "Calibrated probability of pneumonia")
RAW_PROBABILITY = hd.sr.CodedConcept("P-RAW", _LOCAL, "Uncalibrated probability of pneumonia")
THRESHOLD = hd.sr.CodedConcept("THR", _LOCAL, "Decision threshold")
OOD_SCORE = hd.sr.CodedConcept("OOD", _LOCAL, "Out-of-distribution score")
MODEL = hd.sr.CodedConcept("MODEL", _LOCAL, "Model")
WARNING = hd.sr.CodedConcept("WARN", _LOCAL, "Warning")
REASON = hd.sr.CodedConcept("NA-REASON", _LOCAL, "Reason not assessed")
SOURCE = hd.sr.CodedConcept("121112", "DCM", "Source of Measurement")
TITLE = hd.sr.CodedConcept("PNEUMOSCOPE-RESULT", _LOCAL, "Pneumonia decision support result")
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")


def probability_of(r: dict) -> float:
    """The probability the label comes from: the calibrated one when the model is calibrated."""
    p = r.get("calibrated_probability")
    return float(r["probability"] if p is None else p)


def model_text(info: dict) -> str:
    """The SR's "Model" text: what ``sync`` compares to tell whether a study was already assessed by this model."""
    return f"{info['name']} version {info.get('version')} checksum {info['checksum']}"


def _finding(label: str) -> hd.sr.CodedConcept:
    if label == NOT_ASSESSED:
        return NOT_ASSESSED_CODE
    return PRESENT if label == "PNEUMONIA" else ABSENT


def _num(name: hd.sr.CodedConcept, value: float) -> hd.sr.NumContentItem:
    return hd.sr.NumContentItem(name=name, value=float(value), unit=UNITLESS,
                                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


def _text(name: hd.sr.CodedConcept, value: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=name, value=value[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID", "StudyDate",
           "StudyTime", "ReferringPhysicianName", "AccessionNumber", "SeriesInstanceUID", "SOPClassUID",
           "SOPInstanceUID", "Modality", "BodyPartExamined", "PatientOrientation", "Laterality")


def reference(source: Dataset) -> Dataset:
    """The patient, study and instance attributes of ``source`` the derived objects copy (empty when absent:
    many radiographs lack some of them); no pixel data."""
    ref = Dataset()
    for kw in _COPIED:
        setattr(ref, kw, source.get(kw, ""))
    if "^" not in str(ref.PatientName):
        ref.PatientName = f"{ref.PatientName}^" if str(ref.PatientName) else ""
    return ref


def structured_report(source: Dataset, r: dict, model: dict) -> Dataset:
    """The Comprehensive SR of prediction ``r`` (``Predictor.predict``'s dict) of ``source`` by ``model``
    (``Predictor.info``)."""
    source = reference(source)
    ref = hd.sr.ImageContentItem(name=SOURCE, referenced_sop_class_uid=source.SOPClassUID,
                                 referenced_sop_instance_uid=source.SOPInstanceUID,
                                 relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)
    items = [
        hd.sr.CodeContentItem(name=PNEUMONIA, value=_finding(r["label"]),
                              relationship_type=hd.sr.RelationshipTypeValues.CONTAINS),
        _num(PROBABILITY, probability_of(r)),
        _num(RAW_PROBABILITY, r["probability"]),
        _num(THRESHOLD, r["threshold"]),
        _text(MODEL, model_text(model)),
        ref,
    ]
    if r.get("ood_score") is not None:
        items.append(_num(OOD_SCORE, r["ood_score"]))
    if r.get("not_assessed_reason"):
        items.append(_text(REASON, r["not_assessed_reason"]))
    items += [_text(WARNING, w) for w in r.get("warnings", [])]
    items.append(_text(hd.sr.CodedConcept("121106", "DCM", "Comment"), DISCLAIMER))
    root = hd.sr.ContainerContentItem(name=TITLE, template_id=None)
    root.ContentSequence = hd.sr.ContentSequence(items)
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=root, series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        series_description=SR_SERIES_DESCRIPTION, is_complete=True, is_final=False, is_verified=False,
    )
    sr.SoftwareVersions = __version__
    return sr


def secondary_capture(source: Dataset, overlay_png: bytes) -> Dataset:
    """The Grad-CAM overlay (RGB PNG) as a Secondary Capture image in the study of ``source``."""
    orient = tuple(str(v) for v in (source.get("PatientOrientation") or ()))
    if len(orient) != 2 or not all(orient):
        orient = ("L", "F")  # the usual display of a frontal chest radiograph (highdicom needs one)
    rgb = np.asarray(Image.open(io.BytesIO(overlay_png)).convert("RGB"), dtype=np.uint8)
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=reference(source), pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8,
        coordinate_system="PATIENT", patient_orientation=orient, series_instance_uid=generate_uid(), sop_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER, instance_number=1, manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageComments = f"Grad-CAM heatmap overlay, {DISCLAIMER}"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SoftwareVersions = __version__
    return sc


def result_datasets(source: Dataset, r: dict, model: dict, overlay_png: bytes | None) -> list[Dataset]:
    """The SR, and the Secondary Capture when there is an overlay (none for a not-assessed image)."""
    out = [structured_report(source, r, model)]
    if overlay_png is not None and r["label"] != NOT_ASSESSED:
        out.append(secondary_capture(source, overlay_png))
    return out


def send(datasets: list[Dataset], ae_title: str, host: str, port: int, calling_ae: str) -> list[int]:
    """C-STORE each dataset to ``ae_title@host:port``; the status of each (-1 when there was no answer)."""
    from pynetdicom import AE

    ae = AE(ae_title=calling_ae)
    for uid in sorted({str(d.SOPClassUID) for d in datasets}):
        ae.add_requested_context(uid, ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        log.error("forward to %s@%s:%d: association refused or failed", ae_title, host, port)
        return [-1] * len(datasets)
    try:
        out = []
        for d in datasets:
            status = assoc.send_c_store(d)
            out.append(int(status.Status) if status else -1)
        return out
    finally:
        assoc.release()
