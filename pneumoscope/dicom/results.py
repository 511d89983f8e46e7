"""The derived objects of one predicted radiograph, in the source study: a DICOM SR **Imaging Measurement Report
(TID 1500)** and a Secondary Capture of the Grad-CAM overlay. Both say they are derived and not for primary
diagnosis. ``send`` stores them on a remote AE with C-STORE.

The SR holds one Measurement and Qualitative Evaluation Group (TID 1501) for the finding Pneumonia (SNOMED CT
233604007) at the chest (SCT 51185008 "Thoracic structure"):

- the qualitative evaluation Pneumonia = Present (SCT 52101004) / Absent (SCT 2667000) / Presence Undetermined
  (DCM 121059) for a film the model did not assess;
- the calibrated probability (DCM 122157 "Probability") and the decision threshold (DCM 122411 "Threshold Value"),
  unit UCUM "1"; the uncalibrated probability and the out-of-distribution score have no standard code: private
  codes of the scheme 99PNEUMOSCOPE, declared in the Coding Scheme Identification Sequence;
- the algorithm (TID 4019): name = the model's name, version = its version, parameters = its checksum;
- the source image (DCM 121112 "Source of Measurement"); the observer is the pneumoscope device (TID 1004).

The reason a film was not assessed and the warnings are TEXT items (DCM 121106 "Comment") of the group.
"""
from __future__ import annotations

import io
import logging

import highdicom as hd
import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoscope import __version__
from pneumoscope.inference.assess import NOT_ASSESSED, heatmap_shown
from pneumoscope.inference.prediction import Prediction
from pneumoscope.trust.explain import caption_lines, with_caption

log = logging.getLogger(__name__)

MANUFACTURER = "pneumoscope"
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902
DISCLAIMER = "derived by pneumoscope, decision support, not for primary diagnosis"
SR_SERIES_DESCRIPTION = "pneumoscope pneumonia SR (derived, not for primary diagnosis)"
SC_SERIES_DESCRIPTION = "pneumoscope Grad-CAM (derived, not for primary diagnosis)"
PRIVATE_SCHEME = "99PNEUMOSCOPE"
PNEUMONIA = hd.sr.CodedConcept("233604007", "SCT", "Pneumonia")
CHEST = hd.sr.CodedConcept("51185008", "SCT", "Thoracic structure")
PROCEDURE = hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
PRESENT = hd.sr.CodedConcept("52101004", "SCT", "Present")
ABSENT = hd.sr.CodedConcept("2667000", "SCT", "Absent")
NOT_ASSESSED_CODE = hd.sr.CodedConcept("121059", "DCM", "Presence Undetermined")
PROBABILITY = hd.sr.CodedConcept("122157", "DCM", "Probability")
THRESHOLD = hd.sr.CodedConcept("122411", "DCM", "Threshold Value")
RAW_PROBABILITY = hd.sr.CodedConcept("P-RAW", PRIVATE_SCHEME, "Uncalibrated probability of pneumonia")
OOD_SCORE = hd.sr.CodedConcept("OOD", PRIVATE_SCHEME, "Out-of-distribution score")
COMMENT = hd.sr.CodedConcept("121106", "DCM", "Comment")
UNITLESS = hd.sr.CodedConcept("1", "UCUM", "no units")
FINDINGS = {"PNEUMONIA": PRESENT, "NORMAL": ABSENT, NOT_ASSESSED: NOT_ASSESSED_CODE}


def model_identity(info: dict) -> tuple[str, str, str]:
    """(name, version, checksum): what the SR's algorithm identification holds and ``sync`` compares to tell whether
    a study was already assessed by this model."""
    return str(info["name"]), str(info.get("version")), f"checksum {info['checksum']}"


def _measurement(name: hd.sr.CodedConcept, value: float) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=name, value=float(value), unit=UNITLESS)


def _comment(text: str) -> hd.sr.TextContentItem:
    return hd.sr.TextContentItem(name=COMMENT, value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS)


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


def _private_scheme() -> Dataset:
    d = Dataset()
    d.CodingSchemeDesignator = PRIVATE_SCHEME
    d.CodingSchemeName = "pneumoscope private codes"
    d.CodingSchemeResponsibleOrganization = "pneumoscope"
    return d


def structured_report(source: Dataset, r: Prediction, model: dict) -> Dataset:
    """The TID 1500 Imaging Measurement Report of prediction ``r`` (``Predictor.predict``'s ``Prediction``) of ``source`` by
    ``model`` (``Predictor.info``)."""
    source = reference(source)
    name, version, checksum = model_identity(model)
    algorithm = hd.sr.AlgorithmIdentification(name=name, version=version, parameters=[checksum])
    measurements = [_measurement(PROBABILITY, float(r.score)), _measurement(THRESHOLD, r.threshold),
                    _measurement(RAW_PROBABILITY, r.probability)]
    if r.ood_score is not None:
        measurements.append(_measurement(OOD_SCORE, r.ood_score))
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="pneumonia"),
        finding_type=PNEUMONIA, algorithm_id=algorithm, finding_sites=[hd.sr.FindingSite(CHEST)],
        measurements=measurements,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(PNEUMONIA, FINDINGS[r.label])],
        source_images=[hd.sr.SourceImageForMeasurementGroup(source.SOPClassUID, source.SOPInstanceUID)])
    comments = ([f"not assessed: {r.not_assessed_reason}"] if r.not_assessed_reason else []) + [
        f"warning: {w}" for w in r.warnings] + [DISCLAIMER]
    group[0].ContentSequence.extend(_comment(c) for c in comments)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(entropy_srcs=[name, version, checksum]),  # the same device UID for the same model
            name="pneumoscope", manufacturer_name=MANUFACTURER, model_name=name, serial_number=version))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=PROCEDURE, imaging_measurements=[group])
    sr = hd.sr.ComprehensiveSR(
        evidence=[source], content=report, series_instance_uid=generate_uid(), series_number=SR_SERIES_NUMBER,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer=MANUFACTURER,
        series_description=SR_SERIES_DESCRIPTION, is_complete=True, is_final=False, is_verified=False,
    )
    sr.CodingSchemeIdentificationSequence = [_private_scheme()]
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
        coordinate_system="PATIENT", patient_orientation=orient, series_instance_uid=generate_uid(),
        sop_instance_uid=generate_uid(),
        series_number=SC_SERIES_NUMBER, instance_number=1, manufacturer=MANUFACTURER,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = SC_SERIES_DESCRIPTION
    sc.ImageComments = f"Grad-CAM heatmap overlay, {DISCLAIMER}"
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.SoftwareVersions = __version__
    return sc


def result_datasets(source: Dataset, r: Prediction, model: dict, overlay_png: bytes | None) -> list[Dataset]:
    """The SR, and the Secondary Capture when there is an overlay (only for a film labelled PNEUMONIA:
    ``inference.assess.HEATMAP_RULE``); the Secondary Capture carries the label, the probability and the legend."""
    out = [structured_report(source, r, model)]
    if overlay_png is not None and heatmap_shown(r.label):
        out.append(secondary_capture(source, with_caption(overlay_png, caption_lines(r))))
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
