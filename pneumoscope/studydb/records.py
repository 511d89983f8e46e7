"""What the study database keeps of one image and its prediction, made the same way for an HTTP upload
(serve/uploads.py) and a dataset the DICOM node received (dicom/listen.py): ``Upload`` from an ``Intake``
(``upload_of``), its database rows (``prediction_record``), the Grad-CAM overlay it stores, pseudonyms."""
from __future__ import annotations

import hashlib
import hmac
import io
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from pneumoscope.data.images import fit
from pneumoscope.data.intake import WORKING, Intake
from pneumoscope.inference.prediction import Prediction
from pneumoscope.studydb.db import PredictionRecord, StudyRecord
from pneumoscope.trust.explain import overlay_png

VIEW_SIDE = WORKING          # longest side of the viewer copy stored in the database (the intake's working size)
HEATMAP_SIDE = 512           # longest side of the heatmap overlay
HEATMAP_ALPHA = 0.4


def _png(u8: np.ndarray) -> bytes:
    """Lossless 8-bit grey PNG. zlib level 1: on 224 px training films 1.3 ms and 28 kB per image against level 3's
    1.7 ms and 27 kB (level 6: 4.3 ms, 24 kB); the service encodes one per upload (docs/service.md)."""
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass
class Upload:
    """One decoded upload: its study record, the viewer copy and the model's input."""

    name: str
    study: StudyRecord
    view_u8: np.ndarray  # the viewer copy (longest side <= VIEW_SIDE), stored as study.image_png
    model_u8: np.ndarray  # the model's S x S input
    quality: list[str]  # model-free flags of the original (the intake's: the same as `predict` on the file)


def upload_of(it: Intake, sha256: str, shown: str | None) -> Upload:
    """The study record, viewer copy and model input of one intake (an upload, or a dataset the DICOM node got)."""
    meta = it.meta
    h, w = meta.get("original_size") or it.view_u8.shape
    study = StudyRecord(sha256=sha256, format=it.format, width=int(w), height=int(h), image_png=_png(it.view_u8),
                        warnings=list(meta.get("warnings", [])), patient_id=meta.get("patient_id"),
                        study_uid=meta.get("study_uid"), modality=meta.get("modality"),
                        manufacturer=meta.get("manufacturer"), device_model=meta.get("device_model"), filename=shown)
    return Upload(name=it.name, study=study, view_u8=it.view_u8, model_u8=it.model_u8, quality=it.quality)


def prediction_record(u: Upload, r: Prediction, latency_ms: float, png: bytes | None,
                      pseudonymize_salt: str | None = None) -> PredictionRecord:
    """The database rows of one predicted upload (the HTTP service and the DICOM listener): identifiers
    pseudonymised when ``pseudonymize_salt`` is given."""
    # one list of warnings, the predictor's (inference/assess.py): quality of the upload (DICOM reader
    # warnings included, as for the file on the command line) and out of distribution
    study = replace(u.study, warnings=list(r.warnings))
    if pseudonymize_salt is not None:
        salt = pseudonymize_salt
        study = replace(study, patient_id=study.patient_id and "hmac-sha256:" + pseudonym(salt, study.patient_id),
                        study_uid=study.study_uid and pseudonym(salt, study.study_uid),
                        filename=None)  # a file name can carry the patient's name
    return PredictionRecord(study=study, probability=r.probability, calibrated_probability=r.calibrated_probability,
                            threshold=r.threshold, label=r.label, label_from=r.label_from,
                            latency_ms=latency_ms, heatmap_png=png)


def heatmap_overlay(view_u8: np.ndarray, heat: np.ndarray) -> bytes:
    """The Grad-CAM overlay PNG on the viewer copy (longest side HEATMAP_SIDE)."""

    return overlay_png(fit(view_u8, HEATMAP_SIDE), heat, alpha=HEATMAP_ALPHA)


def pseudonym(salt: str, value: str) -> str:
    """Keyed SHA-256 (HMAC) of an identifier: stable for one salt, not reversible without it."""
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()
