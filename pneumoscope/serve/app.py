"""The clinic service: upload chest X-rays (JPEG, PNG, DICOM), get the probability of pneumonia, a Grad-CAM
heatmap and a structured report; every study, prediction and review is kept in the study database.

``create_app(checkpoint, db_path, ...)`` builds the FastAPI app; ``pneumoscope serve`` runs it with uvicorn.
The model is loaded once, by ``create_app``, and run by one thread (worker.py). Decoding (uploads.py), PNG
encoding and the database run in the thread pool, off the event loop. See docs/service.md.
"""
from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections import deque
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    HTTPException,
    Query,
    Response,
    Security,
    UploadFile,
)
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field
from scipy.stats import binom
from starlette.concurrency import run_in_threadpool

from pneumoscope.data.images import read_image_bytes, resize_uint8, to_uint8
from pneumoscope.inference.assess import HEATMAP_RULE, WORKLIST_RULE, heatmap_shown
from pneumoscope.inference.loader import load
from pneumoscope.inference.prediction import Prediction
from pneumoscope.inference.predictor import Predictor
from pneumoscope.inference.worker import ModelWorker, Scored
from pneumoscope.serve.problems import known_query_only, responses
from pneumoscope.serve.security import PAGE_CSP, REPORT_CSP, Guard, api_key_header
from pneumoscope.serve.study_report import build_report, render_html
from pneumoscope.serve.uploads import add_upload_error_handlers, decode_upload
from pneumoscope.studydb.db import ModelRecord, PredictionRecord, StudyDB
from pneumoscope.studydb.records import Upload, heatmap_overlay, prediction_record
from pneumoscope.trust.explain import heatmaps

log = logging.getLogger(__name__)

MAX_FILES = 16               # files per request
MAX_OFFSET = 2**31 - 1       # GET /studies: larger offsets overflow the database's integers (a 500 before)
SITE_WINDOW, SITE_MIN = 50, 20  # site-level shift warning: over the last 50 uploads, once there are 20
STATIC_DIR = Path(__file__).parent / "static"



class ReviewIn(BaseModel):
    model_config = ConfigDict(str_strip_whitespace=True, extra="forbid")  # a misspelt key is refused, not dropped
    reviewer: str = Field(min_length=1, max_length=200, pattern=r"\S",
                          description="who reviewed: at least one character that is not white space")
    decision: Literal["agree", "disagree"]
    comment: str = Field(default="", max_length=4000)


@dataclass
class Service:
    """What the routes share: the model, its thread, the database and the settings."""

    predictor: Predictor
    worker: ModelWorker
    db: StudyDB
    model: ModelRecord
    api_key: str | None
    pseudonymize_salt: str | None
    recent: deque = field(default_factory=lambda: deque(maxlen=SITE_WINDOW))  # OOD flags of the latest uploads

    @property
    def info(self) -> dict:
        return self.predictor.info

    @property
    def auth(self) -> list:
        """Every API route's dependencies: the X-API-Key header in the schema when the server has a key (Guard
        enforces it), and no unknown query parameter."""
        return ([Security(api_key_header)] if self.api_key else []) + [Depends(known_query_only)]

    @property
    def size(self) -> int:
        return self.predictor.preprocess.input_size

    def record(self, u: Upload, r: Prediction, latency_ms: float, png: bytes | None) -> PredictionRecord:
        """The database rows of one predicted upload (identifiers pseudonymised when the service does that)."""
        return prediction_record(u, r, latency_ms, png, self.pseudonymize_salt)

    def site_warning(self, flags: list[bool]) -> str | None:
        """Record the out-of-distribution flags of new uploads; a warning when the recent ones are flagged far more
        often than the reference's false-flag rate (binomial test, p < 0.01, at least SITE_MIN uploads)."""
        self.recent.extend(flags)
        ref = self.predictor.ood_reference
        n, k = len(self.recent), sum(self.recent)
        if ref is None or n < SITE_MIN:
            return None
        p = float(binom.sf(k - 1, n, 1.0 - ref.quantile))
        if p >= 0.01:
            return None
        return (f"site-level shift: {k} of the last {n} uploads are not like the training images (expected about "
                f"{100 * (1 - ref.quantile):.0f} %; p = {p:.1e}): this model may not apply to this site's images; "
                "validate it on labelled local images before relying on it")

    def study_or_404(self, study_id: str) -> dict:
        s = self.db.study(study_id)
        if s is None:
            raise HTTPException(404, f"no study {study_id!r}")
        return s

    async def heatmap_png(self, study_id: str, prediction: dict | None) -> bytes | None:
        """The stored overlay of ``prediction``; computed (and stored) now when it has none and the loaded model
        made it. Computed from the viewer copy, which is at least the model's input size."""
        if prediction is None or not heatmap_shown(prediction["label"]):
            return None
        if prediction["has_heatmap"]:
            return await run_in_threadpool(self.db.heatmap, prediction["id"])
        if prediction["model_checksum"] != self.info["checksum"]:
            return None

        png = await run_in_threadpool(self.db.study_image, study_id)
        view = to_uint8((await run_in_threadpool(read_image_bytes, png, "study.png"))[0])
        result = (await asyncio.wrap_future(self.worker.submit([resize_uint8(view, self.size)], heatmaps=True)))[0]
        if result.heat is None:
            return None
        overlay = await run_in_threadpool(heatmap_overlay, view, result.heat)
        await run_in_threadpool(self.db.set_heatmap, prediction["id"], overlay)
        return overlay


def create_app(checkpoint=None, db_path: str | Path = "pneumoscope-studies.db", api_key: str | None = None,
               pseudonymize_salt: str | None = None, max_upload_bytes: int = 20 * 2**20,
               device: str = "auto", threads: int = 0) -> FastAPI:
    """The service. ``checkpoint``: a best.pt path, None for the bundled model, or a loaded ``Predictor``.

    ``api_key``: required as the X-API-Key header on every endpoint but /health, the page and the docs.
    ``pseudonymize_salt``: store HMAC-SHA-256 pseudonyms of DICOM PatientID and StudyInstanceUID instead of them.
    ``max_upload_bytes``: request body limit (413 above it).
    ``threads``: ONNX Runtime intra-op threads of the model thread (0 = one per core; ``serve`` passes its choice).
    """
    predictor = checkpoint if isinstance(checkpoint, Predictor) else load(checkpoint, device=device, threads=threads)
    info = predictor.info
    model = ModelRecord.of(info, pseudonymized=pseudonymize_salt is not None)
    svc = Service(predictor, ModelWorker(predictor, heatmap_fn=heatmaps), StudyDB(db_path), model, api_key, pseudonymize_salt)
    _warm_up(svc)
    log.info("serving %s %s (%s), threshold %.3f, input %d px; study database %s (schema %d)", info["name"],
             info.get("version"), info["checksum"][:19], predictor.threshold, svc.size, svc.db.path, svc.db.version)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        svc.worker.close()
        svc.db.close()

    app = FastAPI(title="pneumoscope", version=str(info.get("version")), lifespan=lifespan,
                  description="Pneumonia decision support on chest X-rays. Decision support only: every result "
                              "must be reviewed by a qualified radiologist.")
    app.add_middleware(Guard, api_key=api_key, max_body=max_upload_bytes)
    add_upload_error_handlers(app)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.state.predictor, app.state.db, app.state.worker = predictor, svc.db, svc.worker
    app.include_router(_page_routes(svc))
    app.include_router(_predict_route(svc))
    app.include_router(_study_routes(svc))
    return app


def _warm_up(svc: Service) -> None:
    """One prediction and heatmap on a blank image at startup: the first request then pays no lazy imports."""
    blank = np.zeros((svc.size, svc.size), np.uint8)
    svc.worker.submit([blank]).result()
    # Grad-CAM's lazy imports, and its ONNX Runtime copy (trust.explain.closed_form: exported once per checkpoint)
    heatmap_overlay(blank, heatmaps(svc.predictor, blank[None])[0])


def _page_routes(svc: Service) -> APIRouter:
    router = APIRouter()

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", headers={"Content-Security-Policy": PAGE_CSP})

    @router.get("/health", summary="model and database status (no API key needed)")
    async def health() -> dict:
        info = svc.info
        return {"status": "ok", "api_key_required": svc.api_key is not None,
                "model": {"name": info["name"], "version": info.get("version"), "checksum": info["checksum"],
                          "threshold": svc.predictor.threshold, "input_size": svc.size},
                "database": {"schema_version": svc.db.version}, "site_warning": svc.site_warning([])}

    return router


def _predict_route(svc: Service) -> APIRouter:
    router = APIRouter()

    @router.post("/predict", dependencies=svc.auth, summary="probability of pneumonia for one or more images",
                 responses=responses(400, 401, 413, 415, 422))
    async def predict(
        response: Response,
        file: list[UploadFile] = File(..., min_length=1,
                                      description="JPEG, PNG or DICOM; repeat the field for several files"),
        heatmap: bool = Query(True, description="compute the Grad-CAM overlay (slower)"),
    ) -> dict:
        if len(file) > MAX_FILES:
            raise HTTPException(413, f"{len(file)} files in one request; send at most {MAX_FILES}")
        t = [time.perf_counter()]
        uploads = [(await f.read(), f.filename, f.content_type) for f in file]
        decoded = [await run_in_threadpool(decode_upload, data, name, ctype, svc.size) for data, name, ctype in uploads]
        del uploads
        t.append(time.perf_counter())
        results = await asyncio.wrap_future(svc.worker.submit([d.model_u8 for d in decoded], heatmaps=heatmap,
                                                              quality=[d.quality for d in decoded]))
        t.append(time.perf_counter())
        overlays = [None if r.heat is None else await run_in_threadpool(heatmap_overlay, d.view_u8, r.heat)
                    for d, r in zip(decoded, results)]
        t.append(time.perf_counter())
        latency_ms = (t[-1] - t[0]) * 1000.0
        records = [svc.record(d, r.prediction, latency_ms, png) for d, r, png in zip(decoded, results, overlays)]
        stored = await run_in_threadpool(svc.db.add_predictions, records, svc.model)
        t.append(time.perf_counter())
        stages = ("decode", "model", "overlay", "db")  # the model stage includes the wait for the model thread
        response.headers["Server-Timing"] = ", ".join(f"{n};dur={(b - a) * 1000:.1f}"
                                                      for n, a, b in zip(stages, t, t[1:]))
        out = [_result(d, e, r, s) for d, e, r, s in zip(decoded, records, results, stored)]
        site = svc.site_warning([bool(r.prediction.out_of_distribution) for r in results])
        return {"model": {"name": svc.model.name, "version": svc.model.version, "checksum": svc.model.checksum},
                "latency_ms": latency_ms, "results": out, "site_warning": site}

    return router


def _result(d: Upload, e: PredictionRecord, scored: Scored, s: dict) -> dict:
    """The answer for one uploaded file: the fields of its ``Prediction`` and where the study is kept."""
    r = scored.prediction
    warnings = list(e.study.warnings)
    if s["duplicate"]:
        warnings.append("this file was received before: the result is added to the existing study")
    if scored.heat_error:
        warnings.append(scored.heat_error)
    sid = s["study_id"]
    return {
        "filename": d.name, "study_id": sid, "prediction_id": s["prediction_id"], "duplicate": s["duplicate"],
        "format": e.study.format, "modality": e.study.modality, "probability": r.probability,
        "calibrated_probability": r.calibrated_probability, "label": r.label, "threshold": r.threshold,
        "label_from": r.label_from,
        "heatmap_png_base64": None if e.heatmap_png is None else base64.b64encode(e.heatmap_png).decode(),
        "image_url": f"/studies/{sid}/image.png", "heatmap_url": f"/studies/{sid}/heatmap.png",
        "report_url": f"/studies/{sid}/report", "warnings": warnings, "ood_score": r.ood_score,
        "out_of_distribution": r.out_of_distribution, "not_assessed_reason": r.not_assessed_reason,
    }


def _study_routes(svc: Service) -> APIRouter:
    router = APIRouter()
    db, info = svc.db, svc.info

    @router.get("/studies", dependencies=svc.auth, summary="studies, most recent prediction first",
                responses=responses(401, 422))
    async def studies(limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=MAX_OFFSET)) -> dict:
        return {"studies": await run_in_threadpool(db.list_studies, limit, offset)}

    @router.get("/worklist", dependencies=svc.auth, summary="unreviewed studies in reading order: likely pneumonia first",
                responses=responses(401, 422))
    async def worklist(limit: int = Query(100, ge=1, le=1000)) -> dict:
        return {"rule": WORKLIST_RULE, "items": await run_in_threadpool(db.worklist, limit)}

    @router.get("/studies/{study_id}", dependencies=svc.auth, summary="one study, its latest prediction and its reviews",
                responses=responses(401, 404))
    async def study(study_id: str) -> dict:
        s = await run_in_threadpool(svc.study_or_404, study_id)
        return {"study": s, "prediction": await run_in_threadpool(db.latest_prediction, study_id),
                "reviews": await run_in_threadpool(db.reviews, study_id), "image_url": f"/studies/{study_id}/image.png",
                "heatmap_url": f"/studies/{study_id}/heatmap.png", "report_url": f"/studies/{study_id}/report"}

    @router.get("/studies/{study_id}/image.png", dependencies=svc.auth, response_class=Response,
             summary="the viewer copy of the image (8-bit grey PNG, longest side <= 1024 px)",
             responses={200: {"content": {"image/png": {}}}, **responses(401, 404)})
    async def image(study_id: str) -> Response:
        png = await run_in_threadpool(db.study_image, study_id)
        if png is None:
            raise HTTPException(404, f"no study {study_id!r}")
        return Response(png, media_type="image/png")

    @router.get("/studies/{study_id}/heatmap.png", dependencies=svc.auth, response_class=Response,
             summary="the Grad-CAM overlay of the latest prediction",
             responses={200: {"content": {"image/png": {}}}, **responses(401, 404)})
    async def heatmap_png(study_id: str) -> Response:
        await run_in_threadpool(svc.study_or_404, study_id)
        p = await run_in_threadpool(db.latest_prediction, study_id)
        png = await svc.heatmap_png(study_id, p)
        if png is None:
            why = ("it has no prediction" if p is None else
                   f"it is labelled {p['label']}: {HEATMAP_RULE}" if not heatmap_shown(p["label"]) else
                   "its prediction was made by another model than the one loaded")
            raise HTTPException(404, f"no heatmap for study {study_id!r}: {why}")
        return Response(png, media_type="image/png")

    @router.get("/studies/{study_id}/report", dependencies=svc.auth, summary="the structured report (JSON, or ?format=html)",
                responses={200: {"content": {"application/json": {}, "text/html": {}}}, **responses(401, 404, 422)})
    async def report(study_id: str, format: Literal["json", "html"] = "json") -> Response:
        s = await run_in_threadpool(svc.study_or_404, study_id)
        p = await run_in_threadpool(db.latest_prediction, study_id)
        if p is None:
            raise HTTPException(404, f"study {study_id!r} has no prediction")
        rep = build_report(s, p, info, await svc.heatmap_png(study_id, p), s["warnings"],
                           await run_in_threadpool(db.reviews, study_id))
        if format == "html":
            return HTMLResponse(render_html(rep), headers={"Content-Security-Policy": REPORT_CSP})
        return JSONResponse(rep)

    @router.post("/studies/{study_id}/review", dependencies=svc.auth, status_code=201,
              summary="a radiologist's review of the latest prediction", responses=responses(400, 401, 404, 413, 422))
    async def review(study_id: str, body: ReviewIn) -> dict:
        r = await run_in_threadpool(db.add_review, study_id, body.reviewer, body.decision, body.comment)
        if r is None:
            raise HTTPException(404, f"no study {study_id!r}")
        return r

    return router
