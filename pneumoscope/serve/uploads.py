"""Uploaded files: what they are (sniffed from the bytes), decoded once by the one intake (data/intake.py: exactly
as training decoded them) into the study database's ``Upload`` (studydb/records.py). Errors are HTTP errors naming
the file."""
from __future__ import annotations

import hashlib
import re

from fastapi import HTTPException

from pneumoscope.data.images import DICOM_EXTENSIONS, MAX_IMAGE_PIXELS, is_dicom_path
from pneumoscope.data.intake import from_bytes
from pneumoscope.errors import ImageReadError, ImageTooLargeError
from pneumoscope.serve.problems import validation_problem
from pneumoscope.studydb.records import Upload, upload_of

MAX_PIXELS = MAX_IMAGE_PIXELS  # the project's one limit (data/images.py); above: decompression bomb, 422
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


