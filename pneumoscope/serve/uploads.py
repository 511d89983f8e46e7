"""Uploaded files: what they are (sniffed from the bytes), decoded once by the one intake (data/intake.py: exactly
as training decoded them), the copies the viewer and the database keep, the heatmap overlay, pseudonyms. Errors
are HTTP errors naming the file."""
from __future__ import annotations

import hashlib
import hmac
import io
import re
from dataclasses import dataclass, replace

import numpy as np
from fastapi import HTTPException
from PIL import Image

from pneumoscope.data.images import (
    DICOM_EXTENSIONS,
    MAX_IMAGE_PIXELS,
    fit,
    is_dicom_path,
)
from pneumoscope.data.intake import WORKING, Intake, from_bytes
from pneumoscope.errors import ImageReadError, ImageTooLargeError
from pneumoscope.serve.db import PredictionRecord, StudyRecord
from pneumoscope.serve.problems import validation_problem
from pneumoscope.trust.explain import overlay_png

MAX_PIXELS = MAX_IMAGE_PIXELS  # the project's one limit (data/images.py); above: decompression bomb, 422
VIEW_SIDE = WORKING          # longest side of the viewer copy stored in the database (the intake's working size)
HEATMAP_SIDE = 512           # longest side of the heatmap overlay
HEATMAP_ALPHA = 0.4
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]")


def safe_name(filename: str | None) -> str:
    """A client file name fit for messages (never used as a path): printable ASCII, at most 80 characters."""
    name = _SAFE_NAME.sub("_", re.split(r"[\\/]", filename or "")[-1])[:80]
    return name or "upload"


def sniff(data: bytes, name: str, content_type: str | None) -> str | None:
    """JPEG | PNG | DICOM from the bytes (and, for DICOM files without the 'DICM' preamble, the .dcm name or the
    application/dicom type); None for anything else."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[128:132] == b"DICM" or is_dicom_path(name) \
            or (content_type or "").split(";")[0].strip().lower() == "application/dicom":
        return "DICOM"
    return None


def _png(u8: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


@dataclass
class Upload:
    """One decoded upload: its study record, the viewer copy and the model's input."""

    name: str
    study: StudyRecord
    view_u8: np.ndarray  # the viewer copy (longest side <= VIEW_SIDE), stored as study.image_png
    model_u8: np.ndarray  # the model's S x S input
    quality: list[str]  # model-free flags of the original (the intake's: the same as `predict` on the file)


def decode_upload(data: bytes, filename: str | None, content_type: str | None, size: int) -> Upload:
    """An uploaded file -> everything the service stores and feeds the model. Raises HTTPException: 415 for
    anything but JPEG/PNG/DICOM, 422 for an empty, corrupt or malformed file or a decompression bomb."""

    name = shown = safe_name(filename)
    if not data:
        raise HTTPException(422, f"{name}: empty file (0 bytes)")
    fmt = sniff(data, name, content_type)
    if fmt is None:
        raise HTTPException(415, f"{name}: not a JPEG, PNG or DICOM file; upload one of those (a DICOM file "
                                 "without the 'DICM' preamble needs a .dcm name or the type application/dicom)")
    if fmt == "DICOM" and not is_dicom_path(name):
        name += DICOM_EXTENSIONS[0]  # read_image_bytes picks its DICOM reader by the 'DICM' preamble or the name
    try:
        it = from_bytes(data, name, size, max_pixels=MAX_PIXELS)  # decoded once (data/intake.py)
    except ImageTooLargeError as e:
        raise HTTPException(422, f"image too large, refused as a possible decompression bomb: {e}") from e
    except ImageReadError as e:  # corrupt JPEG/PNG, malformed DICOM, not a radiograph, ...
        raise HTTPException(422, str(e)) from e
    return upload_of(it, hashlib.sha256(data).hexdigest(), shown)


def upload_of(it: Intake, sha256: str, shown: str | None) -> Upload:
    """The study record, viewer copy and model input of one intake (an upload, or a dataset the DICOM node got)."""
    meta = it.meta
    h, w = meta.get("original_size") or it.view_u8.shape
    study = StudyRecord(sha256=sha256, format=it.format, width=int(w), height=int(h), image_png=_png(it.view_u8),
                        warnings=list(meta.get("warnings", [])), patient_id=meta.get("patient_id"),
                        study_uid=meta.get("study_uid"), modality=meta.get("modality"),
                        manufacturer=meta.get("manufacturer"), device_model=meta.get("device_model"), filename=shown)
    return Upload(name=it.name, study=study, view_u8=it.view_u8, model_u8=it.model_u8, quality=it.quality)


def prediction_record(u: Upload, r: dict, latency_ms: float, png: bytes | None,
                      pseudonymize_salt: str | None = None) -> PredictionRecord:
    """The database rows of one predicted upload (the HTTP service and the DICOM listener): identifiers
    pseudonymised when ``pseudonymize_salt`` is given."""
    # one list of warnings, the predictor's (inference/assess.py): quality of the upload (DICOM reader
    # warnings included, as for the file on the command line) and out of distribution
    study = replace(u.study, warnings=list(r.get("warnings", [])))
    if pseudonymize_salt is not None:
        salt = pseudonymize_salt
        study = replace(study, patient_id=study.patient_id and "hmac-sha256:" + pseudonym(salt, study.patient_id),
                        study_uid=study.study_uid and pseudonym(salt, study.study_uid),
                        filename=None)  # a file name can carry the patient's name
    return PredictionRecord(study=study, probability=r["probability"],
                            calibrated_probability=r["calibrated_probability"], threshold=r["threshold"],
                            label=r["label"], latency_ms=latency_ms, heatmap_png=png)


def heatmap_overlay(view_u8: np.ndarray, heat: np.ndarray) -> bytes:
    """The Grad-CAM overlay PNG on the viewer copy (longest side HEATMAP_SIDE)."""

    return overlay_png(fit(view_u8, HEATMAP_SIDE), heat, alpha=HEATMAP_ALPHA)


UPLOAD_HINT = ("send the image as multipart/form-data field 'file' (repeat the field for several files), e.g. "
               "curl -F file=@image.jpeg http://HOST:PORT/predict")


def add_upload_error_handlers(app) -> None:
    """Clear answers: on POST /predict for a body that is not the expected multipart form (instead of FastAPI's
    generic ``Field required`` list, Starlette's bare ``Invalid multipart data.``); elsewhere one readable sentence
    per invalid field (problems.validation_problem)."""
    from fastapi.exception_handlers import http_exception_handler
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def on_predict(request) -> bool:
        return request.url.path == "/predict" and request.method == "POST"

    @app.exception_handler(RequestValidationError)
    async def validation(request, exc: RequestValidationError):
        about_file = [e for e in exc.errors() if tuple(e.get("loc", ()))[:2] == ("body", "file")]
        if not on_predict(request) or not about_file:
            return validation_problem(exc)
        ctype = request.headers.get("content-type", "").split(";")[0].strip() or "none"
        if ctype != "multipart/form-data":
            got = f"the body is not a multipart form (Content-Type: {ctype})"
        elif any(e.get("type") == "missing" for e in about_file):
            got = "no multipart field 'file' in the form"
        else:  # a part without a filename is a text field: never echo its bytes back
            got = "the field 'file' holds text, not a file (its part has no filename)"
        return JSONResponse({"detail": f"no image received: {got}; {UPLOAD_HINT}"}, 422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        if on_predict(request) and exc.status_code == 400 and str(exc.detail).startswith(
                ("Invalid multipart", "Field exceeded", "Too many", "Missing boundary")):
            return JSONResponse({"detail": f"the multipart body could not be parsed ({exc.detail} A part header "
                                           "over 4 kB, e.g. a file name of thousands of characters, or a missing "
                                           f"boundary causes this); use a short file name and {UPLOAD_HINT}"}, 400)
        return await http_exception_handler(request, exc)


def pseudonym(salt: str, value: str) -> str:
    """Keyed SHA-256 (HMAC) of an identifier: stable for one salt, not reversible without it."""
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()
