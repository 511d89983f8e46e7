"""The clinic service: upload chest X-rays (JPEG, PNG, DICOM), get the probability of pneumonia, a Grad-CAM
heatmap and a structured report; every study, prediction and review is kept in the study database.

``create_app(checkpoint, db_path, ...)`` builds the FastAPI app; ``pneumoscope serve`` runs it with uvicorn.
The model is loaded once, by ``create_app``. One thread (``ModelWorker``) runs it: requests queue their images
and it batches whatever is waiting into one forward pass, so concurrent requests share the model instead of
fighting over the CPU cores. Decoding, PNG encoding and the database run in the thread pool, off the event loop.
See docs/service.md.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import io
import logging
import queue
import re
import threading
import time
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import FastAPI, File, HTTPException, Query, Security, UploadFile
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers, MutableHeaders

from pneumoscope.errors import ImageReadError, ImageTooLargeError
from pneumoscope.serve.db import StudyDB

log = logging.getLogger(__name__)

MAX_PIXELS = 36_000_000      # decoded pixels per image (6000 x 6000); above: decompression bomb, 422
MAX_FILES = 16               # files per request
VIEW_SIDE = 1024             # longest side of the viewer copy stored in the database
HEATMAP_SIDE = 512           # longest side of the heatmap overlay
HEATMAP_ALPHA = 0.4
STATIC_DIR = Path(__file__).parent / "static"
PUBLIC_PATHS = ("/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico")
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._ -]")

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required when the server was started with an API key")


# ---------------------------------------------------------------------------------------------- model thread
@dataclass
class _Job:
    images: list[np.ndarray]
    heatmaps: bool
    future: Future = field(default_factory=Future)


class ModelWorker:
    """The one thread that touches the model. ``submit`` queues a request's images; the worker takes every job
    waiting in the queue (up to ``max_batch`` images) and runs them as one batch: no added wait when idle,
    bigger batches under load."""

    def __init__(self, predictor, max_batch: int = 32) -> None:
        self.predictor = predictor
        self.max_batch = max_batch
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def submit(self, images: list[np.ndarray], heatmaps: bool = False) -> Future:
        """A future of one dict per image: ``Predictor.predict``'s fields plus ``heat`` (S, S) or None and
        ``heat_error`` when the heatmap could not be computed."""
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pneumoscope-model", daemon=True)
                self._thread.start()
        job = _Job(images, heatmaps)
        self._q.put(job)
        return job.future

    def close(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._q.put(None)
                self._thread.join(timeout=30)
                self._thread = None

    def _run(self) -> None:
        while True:
            job = self._q.get()
            if job is None:
                return
            jobs, n = [job], len(job.images)
            while n < self.max_batch:
                try:
                    nxt = self._q.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._q.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
                n += len(nxt.images)
            jobs = [j for j in jobs if j.future.set_running_or_notify_cancel()]  # drop cancelled requests
            if not jobs:
                continue
            try:
                per_job = self._compute(jobs)
            except Exception as e:  # noqa: BLE001 - handed to the waiting requests (500); the worker must live on
                log.exception("prediction failed for a batch of %d image(s)", sum(len(j.images) for j in jobs))
                for j in jobs:
                    j.future.set_exception(e)
                continue
            for j, r in zip(jobs, per_job):
                j.future.set_result(r)

    def _compute(self, jobs: list[_Job]) -> list[list[dict]]:
        images = [im for j in jobs for im in j.images]
        results = self.predictor.predict(images)
        owners = [j for j in jobs for _ in j.images]
        wanted = [i for i, j in enumerate(owners) if j.heatmaps]
        heat: dict[int, np.ndarray] = {}
        heat_error = None
        if wanted:
            try:
                from pneumoscope.explain import heatmaps

                maps = heatmaps(self.predictor, np.stack([images[i] for i in wanted]))
                heat = dict(zip(wanted, maps))
            except Exception as e:  # noqa: BLE001 - a missing heatmap must not fail the prediction itself
                log.exception("Grad-CAM failed for a batch of %d image(s)", len(wanted))
                heat_error = f"heatmap unavailable ({type(e).__name__}: {e})"
        for i, r in enumerate(results):
            r["heat"] = heat.get(i)
            if owners[i].heatmaps and i not in heat:
                r["heat_error"] = heat_error
        out, start = [], 0
        for j in jobs:
            out.append(results[start:start + len(j.images)])
            start += len(j.images)
        return out


# ---------------------------------------------------------------------------------------------- decoding
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
    if data[128:132] == b"DICM" or Path(name).suffix.lower() in (".dcm", ".dicom") \
            or (content_type or "").split(";")[0].strip().lower() == "application/dicom":
        return "DICOM"
    return None


def _png(u8: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(u8, mode="L").save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def _fit(u8: np.ndarray, side: int) -> np.ndarray:
    """Downscale (area filter) so the longest side is at most ``side``; aspect kept."""
    from PIL import Image

    h, w = u8.shape
    if max(h, w) <= side:
        return u8
    s = side / max(h, w)
    im = Image.fromarray(u8, mode="L").resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BOX)
    return np.asarray(im, dtype=np.uint8)


def _model_input(data: bytes, name: str, fmt: str, full_u8: np.ndarray, size: int) -> np.ndarray:
    """The model's uint8 SxS input, decoded exactly as training decoded it (``images.load_uint8``: JPEGs by
    libjpeg's reduced-DCT grey path, everything else by the exact read then a bilinear resize)."""
    from pneumoscope.data.images import load_jpeg_bytes_uint8, resize_uint8

    if fmt == "JPEG":
        u8 = load_jpeg_bytes_uint8(data, name, size, MAX_PIXELS)
        if u8 is not None:
            return u8
    return resize_uint8(full_u8, size)


def decode_upload(data: bytes, filename: str | None, content_type: str | None, size: int) -> dict:
    """An uploaded file -> everything the service stores and feeds the model. Raises HTTPException: 415 for
    anything but JPEG/PNG/DICOM, 422 for an empty, corrupt or malformed file or a decompression bomb."""
    from pneumoscope.data.images import read_image_bytes, to_uint8

    name = safe_name(filename)
    if not data:
        raise HTTPException(422, f"{name}: empty file (0 bytes)")
    fmt = sniff(data, name, content_type)
    if fmt is None:
        raise HTTPException(415, f"{name}: not a JPEG, PNG or DICOM file; upload one of those (a DICOM file "
                                 "without the 'DICM' preamble needs a .dcm name or the type application/dicom)")
    if fmt == "DICOM" and Path(name).suffix.lower() not in (".dcm", ".dicom"):
        name += ".dcm"  # read_image_bytes picks its DICOM reader by the 'DICM' preamble or the name
    try:
        img, meta = read_image_bytes(data, name, max_pixels=MAX_PIXELS)
        full = to_uint8(img)
        del img
        model_u8 = _model_input(data, name, fmt, full, size)
    except ImageTooLargeError as e:
        raise HTTPException(422, f"image too large, refused as a possible decompression bomb: {e}") from e
    except ImageReadError as e:  # corrupt JPEG/PNG, malformed DICOM, not a radiograph, ...
        raise HTTPException(422, str(e)) from e
    h, w = full.shape
    view = _fit(full, VIEW_SIDE)
    return {
        "name": name, "sha256": hashlib.sha256(data).hexdigest(), "format": meta["format"], "width": w, "height": h,
        "view_u8": view, "image_png": _png(view), "model_u8": model_u8, "warnings": list(meta.get("warnings", [])),
        "patient_id": meta.get("patient_id"), "study_uid": meta.get("study_uid"), "modality": meta.get("modality"),
        "manufacturer": meta.get("manufacturer"), "device_model": meta.get("device_model"),
    }


def heatmap_overlay(view_u8: np.ndarray, heat: np.ndarray) -> bytes:
    """The Grad-CAM overlay PNG on the viewer copy (longest side HEATMAP_SIDE)."""
    from pneumoscope.explain import overlay_png

    return overlay_png(_fit(view_u8, HEATMAP_SIDE), heat, alpha=HEATMAP_ALPHA)


def _warm_up(worker: ModelWorker, size: int) -> None:
    """One prediction and heatmap on a blank image at startup: the first request then pays no lazy imports."""
    blank = np.zeros((size, size), np.uint8)
    r = worker.submit([blank], heatmaps=True).result()[0]
    if r["heat"] is not None:
        heatmap_overlay(blank, r["heat"])


def pseudonym(salt: str, value: str) -> str:
    """Keyed SHA-256 (HMAC) of an identifier: stable for one salt, not reversible without it."""
    return hmac.new(salt.encode(), value.encode(), hashlib.sha256).hexdigest()


# ---------------------------------------------------------------------------------------------- security
def key_ok(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Guard:
    """ASGI middleware, before any body is read: the API key (401), the Content-Length (413), then the bytes
    actually received (413, for chunked or lying clients); adds no-cache / nosniff headers to every answer."""

    def __init__(self, app, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        public = path in PUBLIC_PATHS or path.startswith("/static/")
        if self.api_key and not public and not key_ok(headers.get("x-api-key"), self.api_key):
            await JSONResponse({"detail": "missing or wrong X-API-Key header"}, 401)(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            await JSONResponse({"detail": "invalid Content-Length header"}, 400)(scope, receive, send)
            return
        if length is not None and int(length) > self.max_body:
            await JSONResponse({"detail": f"request body of {length} bytes exceeds the limit of {self.max_body} "
                                          "bytes; send fewer or smaller files"}, 413)(scope, receive, send)
            return
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, f"request body exceeds the limit of {self.max_body} bytes")
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                h.setdefault("X-Content-Type-Options", "nosniff")
                h.setdefault("Referrer-Policy", "no-referrer")
                h.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, counted_receive, send_with_headers)


# ---------------------------------------------------------------------------------------------- the app
class ReviewIn(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True)
    reviewer: str = Field(min_length=1, max_length=200)
    decision: Literal["agree", "disagree"]
    comment: str = Field(default="", max_length=4000)


def create_app(checkpoint=None, db_path: str | Path = "pneumoscope-studies.db", api_key: str | None = None,
               pseudonymize_salt: str | None = None, max_upload_bytes: int = 20 * 2**20,
               device: str = "auto") -> FastAPI:
    """The service. ``checkpoint``: a best.pt path, None for the bundled model, or a loaded ``Predictor``.

    ``api_key``: required as the X-API-Key header on every endpoint but /health, the page and the docs.
    ``pseudonymize_salt``: store HMAC-SHA-256 pseudonyms of DICOM PatientID and StudyInstanceUID instead of them.
    ``max_upload_bytes``: request body limit (413 above it).
    """
    from pneumoscope.predict import Predictor, load
    from pneumoscope.study_report import build_report, render_html

    predictor = checkpoint if isinstance(checkpoint, Predictor) else load(checkpoint, device=device)
    info = predictor.info
    model_meta = {"name": info["name"], "version": info.get("version"), "checksum": info["checksum"],
                  "threshold_info": info.get("threshold_info"), "pseudonymized": pseudonymize_salt is not None}
    size = predictor.preprocess.input_size
    db = StudyDB(db_path)
    worker = ModelWorker(predictor)
    _warm_up(worker, size)
    log.info("serving %s %s (%s), threshold %.3f, input %d px; study database %s (schema %d)", info["name"],
             info.get("version"), info["checksum"][:19], predictor.threshold, size, db.path, db.version)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        worker.close()
        db.close()

    app = FastAPI(title="pneumoscope", version=str(info.get("version")), lifespan=lifespan,
                  description="Pneumonia decision support on chest X-rays. Decision support only: every result "
                              "must be reviewed by a qualified radiologist.")
    app.add_middleware(Guard, api_key=api_key, max_body=max_upload_bytes)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.predictor, app.state.db, app.state.worker = predictor, db, worker
    auth = [Security(api_key_header)]  # documents the header in OpenAPI; Guard enforces it

    def _study_or_404(study_id: str) -> dict:
        s = db.study(study_id)
        if s is None:
            raise HTTPException(404, f"no study {study_id!r}")
        return s

    async def _heatmap_png(study_id: str, prediction: dict | None) -> bytes | None:
        """The stored overlay of ``prediction``; computed (and stored) now when it has none and the loaded model
        made it. Computed from the viewer copy, which is at least the model's input size."""
        if prediction is None:
            return None
        if prediction["has_heatmap"]:
            return await run_in_threadpool(db.heatmap, prediction["id"])
        if prediction["model_checksum"] != info["checksum"]:
            return None
        from pneumoscope.data.images import read_image_bytes, resize_uint8, to_uint8

        png = await run_in_threadpool(db.study_image, study_id)
        view = to_uint8((await run_in_threadpool(read_image_bytes, png, "study.png"))[0])
        result = (await asyncio.wrap_future(worker.submit([resize_uint8(view, size)], heatmaps=True)))[0]
        if result["heat"] is None:
            return None
        overlay = await run_in_threadpool(heatmap_overlay, view, result["heat"])
        await run_in_threadpool(db.set_heatmap, prediction["id"], overlay)
        return overlay

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    @app.get("/health", summary="model and database status (no API key needed)")
    async def health() -> dict:
        return {"status": "ok", "api_key_required": api_key is not None,
                "model": {"name": info["name"], "version": info.get("version"), "checksum": info["checksum"],
                          "threshold": predictor.threshold, "input_size": size},
                "database": {"schema_version": db.version}}

    @app.post("/predict", dependencies=auth, summary="probability of pneumonia for one or more images")
    async def predict(
        response: Response,
        file: list[UploadFile] = File(..., description="JPEG, PNG or DICOM; repeat the field for several files"),
        heatmap: bool = Query(True, description="compute the Grad-CAM overlay (slower)"),
    ) -> dict:
        if len(file) > MAX_FILES:
            raise HTTPException(413, f"{len(file)} files in one request; send at most {MAX_FILES}")
        t = [time.perf_counter()]
        uploads = [(await f.read(), f.filename, f.content_type) for f in file]
        decoded = [await run_in_threadpool(decode_upload, data, name, ctype, size) for data, name, ctype in uploads]
        del uploads
        t.append(time.perf_counter())
        results = await asyncio.wrap_future(worker.submit([d["model_u8"] for d in decoded], heatmaps=heatmap))
        t.append(time.perf_counter())
        overlays = [None if r["heat"] is None else await run_in_threadpool(heatmap_overlay, d["view_u8"], r["heat"])
                    for d, r in zip(decoded, results)]
        t.append(time.perf_counter())
        latency_ms = (t[-1] - t[0]) * 1000.0
        entries = []
        for d, r, png in zip(decoded, results, overlays):
            ids = {k: d[k] for k in ("patient_id", "study_uid")}
            if pseudonymize_salt is not None:
                ids = {k: v and pseudonym(pseudonymize_salt, v) for k, v in ids.items()}
                ids["patient_id"] = ids["patient_id"] and "hmac-sha256:" + ids["patient_id"]
            entries.append({**d, **ids, "probability": r["probability"], "threshold": r["threshold"],
                            "calibrated_probability": r["calibrated_probability"], "label": r["label"],
                            "latency_ms": latency_ms, "heatmap_png": png})
        stored = await run_in_threadpool(db.add_predictions, entries, model_meta)
        t.append(time.perf_counter())
        stages = ("decode", "model", "overlay", "db")  # the model stage includes the wait for the model thread
        response.headers["Server-Timing"] = ", ".join(f"{n};dur={(b - a) * 1000:.1f}"
                                                      for n, a, b in zip(stages, t, t[1:]))
        out = []
        for e, r, s in zip(entries, results, stored):
            warnings = list(e["warnings"])
            if s["duplicate"]:
                warnings.append("this file was received before: the result is added to the existing study")
            if r.get("heat_error"):
                warnings.append(r["heat_error"])
            sid = s["study_id"]
            out.append({
                "filename": e["name"], "study_id": sid, "prediction_id": s["prediction_id"],
                "duplicate": s["duplicate"], "format": e["format"], "modality": e["modality"],
                "probability": e["probability"], "calibrated_probability": e["calibrated_probability"],
                "label": e["label"], "threshold": e["threshold"],
                "heatmap_png_base64": None if e["heatmap_png"] is None else base64.b64encode(e["heatmap_png"]).decode(),
                "image_url": f"/studies/{sid}/image.png", "heatmap_url": f"/studies/{sid}/heatmap.png",
                "report_url": f"/studies/{sid}/report", "warnings": warnings,
            })
        return {"model": {k: model_meta[k] for k in ("name", "version", "checksum")}, "latency_ms": latency_ms,
                "results": out}

    @app.get("/studies", dependencies=auth, summary="studies, most recent prediction first")
    async def studies(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0)) -> dict:
        return {"studies": await run_in_threadpool(db.list_studies, limit, offset)}

    @app.get("/studies/{study_id}", dependencies=auth, summary="one study, its latest prediction and its reviews")
    async def study(study_id: str) -> dict:
        s = await run_in_threadpool(_study_or_404, study_id)
        return {"study": s, "prediction": await run_in_threadpool(db.latest_prediction, study_id),
                "reviews": await run_in_threadpool(db.reviews, study_id), "image_url": f"/studies/{study_id}/image.png",
                "heatmap_url": f"/studies/{study_id}/heatmap.png", "report_url": f"/studies/{study_id}/report"}

    @app.get("/studies/{study_id}/image.png", dependencies=auth, response_class=Response,
             summary="the viewer copy of the image (8-bit grey PNG, longest side <= 1024 px)")
    async def image(study_id: str) -> Response:
        png = await run_in_threadpool(db.study_image, study_id)
        if png is None:
            raise HTTPException(404, f"no study {study_id!r}")
        return Response(png, media_type="image/png")

    @app.get("/studies/{study_id}/heatmap.png", dependencies=auth, response_class=Response,
             summary="the Grad-CAM overlay of the latest prediction")
    async def heatmap_png(study_id: str) -> Response:
        await run_in_threadpool(_study_or_404, study_id)
        png = await _heatmap_png(study_id, await run_in_threadpool(db.latest_prediction, study_id))
        if png is None:
            raise HTTPException(404, f"no heatmap for study {study_id!r} (its prediction was made by another model)")
        return Response(png, media_type="image/png")

    @app.get("/studies/{study_id}/report", dependencies=auth, summary="the structured report (JSON, or ?format=html)")
    async def report(study_id: str, format: Literal["json", "html"] = "json") -> Response:
        s = await run_in_threadpool(_study_or_404, study_id)
        p = await run_in_threadpool(db.latest_prediction, study_id)
        if p is None:
            raise HTTPException(404, f"study {study_id!r} has no prediction")
        rep = build_report(s, p, info, await _heatmap_png(study_id, p), s["warnings"],
                           await run_in_threadpool(db.reviews, study_id))
        if format == "html":
            return HTMLResponse(render_html(rep), headers={"Content-Security-Policy": REPORT_CSP})
        return JSONResponse(rep)

    @app.post("/studies/{study_id}/review", dependencies=auth, status_code=201,
              summary="a radiologist's review of the latest prediction")
    async def review(study_id: str, body: ReviewIn) -> dict:
        r = await run_in_threadpool(db.add_review, study_id, body.reviewer, body.decision, body.comment)
        if r is None:
            raise HTTPException(404, f"no study {study_id!r}")
        return r

    return app
