"""The study database: SQLAlchemy Core on SQLite (the default: a path) or PostgreSQL (a URL), one connection per
thread. Where it lives, its engine and its Alembic migrations are in ``schema.py``.

Tables: ``patients``, ``studies``, ``predictions``, ``reviews`` (see ``migrations/versions/0001_initial.py``).

Several processes (``pneumoscope serve --workers N``) may share one database: a file uploaded to two of them at
once is still one study, because ``studies.sha256`` is UNIQUE and a study is stored with ``INSERT ... ON CONFLICT
DO NOTHING`` and then found by its checksum (never read-then-write).

Durability: on SQLite ``synchronous=FULL``. In WAL mode NORMAL already survives a crash of the *process* (what the
SIGKILL test checks); FULL also survives a power cut or OS crash, because the WAL is fsynced at every commit.
PostgreSQL's defaults (``fsync``, ``synchronous_commit=on``) are the same promise. A result that was shown to a
clinician must not vanish from the audit trail. The price is one fsync per commit, shared by the requests that
arrive together: they are group-committed (``StudyDB.add_predictions``).
"""
from __future__ import annotations

import csv
import json
import logging
import threading
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from sqlalchemy import exc, text
from sqlalchemy.engine import Connection

from pneumoscope.errors import ConfigError
from pneumoscope.inference.assess import TIERS
from pneumoscope.studydb.schema import describe, engine_for, is_url, migrate

log = logging.getLogger(__name__)

TABLES = ("patients", "studies", "predictions", "reviews")
_EXPORT_ORDER = {"patients": "created, id", "studies": "received, id", "predictions": "id", "reviews": "id"}


@dataclass
class StudyRecord:
    """The image a study row stores (found again by ``sha256``). ``patient_id`` / ``study_uid`` are already
    pseudonymised by the caller when the service does that."""

    sha256: str
    format: str
    width: int
    height: int
    image_png: bytes
    warnings: list[str] = field(default_factory=list)
    patient_id: str | None = None
    study_uid: str | None = None
    modality: str | None = None
    manufacturer: str | None = None
    device_model: str | None = None
    filename: str | None = None  # the upload's sanitised name (None when pseudonymising)


@dataclass
class PredictionRecord:
    """One image of a request: its study and its new prediction row."""

    study: StudyRecord
    probability: float
    calibrated_probability: float | None
    threshold: float
    label: str
    label_from: str  # the probability the label compares with the threshold (Prediction.label_from)
    latency_ms: float
    heatmap_png: bytes | None = None


@dataclass
class ModelRecord:
    """The model a prediction came from."""

    name: str
    checksum: str
    version: str | None = None
    threshold_info: dict | None = None
    pseudonymized: bool = False

    @classmethod
    def of(cls, info: dict, pseudonymized: bool = False) -> ModelRecord:
        """The record of a loaded model (``Predictor.info``)."""
        return cls(name=info["name"], version=info.get("version"), checksum=info["checksum"],
                   threshold_info=info.get("threshold_info"), pseudonymized=pseudonymized)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


@dataclass
class _Write:
    """One request's rows, waiting for the next group commit."""
    entries: list[PredictionRecord]
    model: ModelRecord
    result: list[dict] | None = None
    error: BaseException | None = None
    done: bool = False


def _row(r) -> dict | None:
    if r is None:
        return None
    d = dict(r)
    for k in ("warnings", "threshold_info"):
        if isinstance(d.get(k), str):
            d[k] = json.loads(d[k])
    for k, v in d.items():
        if isinstance(v, memoryview):
            d[k] = bytes(v)
    return d


_STUDY_COLUMNS = ("s.id, s.patient_id, coalesce(pt.pseudonymized, 0) AS pseudonymized, s.received, s.sha256, s.format, "
                  "s.modality, s.manufacturer, s.device_model, s.width, s.height, s.warnings, s.filename")
_PREDICTION_COLUMNS = ("id, study_id, model_name, model_version, model_checksum, probability, calibrated_probability, "
                       "threshold, threshold_info, label, label_from, latency_ms, created, "
                       "CASE WHEN heatmap_png IS NULL THEN 0 ELSE 1 END AS has_heatmap")
_INSERT_STUDY = text(
    "INSERT INTO studies (id, patient_id, received, sha256, format, modality, manufacturer, device_model, width, "
    "height, warnings, image_png, filename) VALUES (:id, :patient_id, :received, :sha256, :format, :modality, "
    ":manufacturer, :device_model, :width, :height, :warnings, :image_png, :filename) "
    "ON CONFLICT DO NOTHING RETURNING id")
_INSERT_PREDICTION = text(
    "INSERT INTO predictions (study_id, model_name, model_version, model_checksum, probability, "
    "calibrated_probability, threshold, threshold_info, label, label_from, latency_ms, created, heatmap_png) "
    "VALUES (:study_id, :model_name, :model_version, :model_checksum, :probability, :calibrated_probability, "
    ":threshold, :threshold_info, :label, :label_from, :latency_ms, :created, :heatmap_png) RETURNING id")


class StudyDB:
    """The study database of one service process. ``db``: a path (SQLite) or a URL (``postgresql+psycopg://``).
    Each thread gets its own connection; a read ends its transaction at once, a write is one transaction."""

    def __init__(self, db: str | Path) -> None:
        self.url = str(db)
        self.path = describe(db)  # for logs: a URL without its password
        self.engine = engine_for(db)
        self.dialect = self.engine.dialect.name
        self._local = threading.local()
        self._all: list[Connection] = []
        self._lock = threading.Lock()
        self._write = threading.Lock()    # held by this process's one writer of the moment
        self._pending: list[_Write] = []  # requests waiting for a group commit
        try:
            self.version = migrate(self.engine)
        except exc.DBAPIError as e:
            self.engine.dispose()
            raise ConfigError(f"cannot open the study database {self.path}: {str(e.orig).strip().splitlines()[0]}; "
                              "check --db (a writable SQLite file, or a reachable PostgreSQL URL)") from None

    @property
    def conn(self) -> Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = self.engine.connect()
            with self._lock:
                self._all.append(c)
        return c

    def close(self) -> None:
        """Close every thread's connection (at shutdown, when no request is running)."""
        with self._lock:
            for c in self._all:
                c.close()
            self._all.clear()
        self._local = threading.local()
        self.engine.dispose()

    @contextmanager
    def _transaction(self):
        """One write transaction on this thread's connection (SQLite: BEGIN IMMEDIATE, schema.py). Callers hold
        ``_write``: this process's writers queue on a Python lock, which hands over at once, instead of in
        SQLite's busy handler, which sleeps up to 100 ms."""
        c = self.conn
        if self.dialect == "sqlite":
            c.info["immediate"] = True
        with c.begin():
            yield c

    def _rows(self, sql: str, **params) -> list[dict]:
        c = self.conn
        try:
            return [_row(r) for r in c.execute(text(sql), params).mappings().all()]
        finally:
            c.rollback()  # end the read's transaction (no snapshot kept open between requests)

    def _one(self, sql: str, **params) -> dict | None:
        rows = self._rows(sql, **params)
        return rows[0] if rows else None

    # ------------------------------------------------------------------------------------------- writes
    def add_predictions(self, entries: list[PredictionRecord], model: ModelRecord) -> list[dict]:
        """Record one request: per entry its patient, its study (found again by the file's sha256) and always a
        new prediction row. Returns once they are committed, per entry ``{study_id, prediction_id, duplicate}``.

        Group commit: whoever gets the writer lock commits every request waiting at that moment in one
        transaction (one fsync for all); the others find theirs done. When that transaction fails, each request
        is retried in its own, so an error reaches only the request that caused it.
        """
        job = _Write(entries, model)
        with self._lock:
            self._pending.append(job)
        with self._write:
            if not job.done:
                with self._lock:
                    batch, self._pending = self._pending, []
                self._commit(batch)
        if job.error is not None:
            raise job.error
        return job.result

    def _commit(self, batch: list[_Write]) -> None:
        try:
            with self._transaction() as c:
                results = [self._insert(c, j.entries, j.model) for j in batch]
        except Exception as e:  # noqa: BLE001 - handed to the request(s) concerned, below
            if len(batch) > 1:
                for j in batch:
                    self._commit([j])
                return
            batch[0].error = e
            results = [None]
        for j, r in zip(batch, results):
            j.result, j.done = r, True

    @staticmethod
    def _insert(c: Connection, entries: list[PredictionRecord], model: ModelRecord) -> list[dict]:
        out = []
        t = now()
        for e in entries:
            st = e.study
            if st.patient_id:
                c.execute(text("INSERT INTO patients (id, pseudonymized, created) VALUES (:id, :p, :t) "
                               "ON CONFLICT (id) DO NOTHING"), {"id": st.patient_id, "p": int(model.pseudonymized),
                                                                "t": t})
            row = {"patient_id": st.patient_id, "received": t, "sha256": st.sha256, "format": st.format,
                   "modality": st.modality, "manufacturer": st.manufacturer, "device_model": st.device_model,
                   "width": st.width, "height": st.height, "warnings": json.dumps(st.warnings),
                   "image_png": st.image_png, "filename": st.filename}
            # the DICOM study's UID; when it is taken (several images of one study), a uuid
            for study_id in (st.study_uid or uuid.uuid4().hex, uuid.uuid4().hex):
                # ON CONFLICT: a concurrent writer (another process) may store the same file at the same moment
                inserted = c.execute(_INSERT_STUDY, {**row, "id": study_id}).first()
                if inserted is not None:
                    study_id, duplicate = inserted[0], False
                    break
                found = c.execute(text("SELECT id FROM studies WHERE sha256 = :s"), {"s": st.sha256}).first()
                if found is not None:
                    study_id, duplicate = found[0], True
                    break
            else:  # pragma: no cover - two uuid4 collisions
                raise RuntimeError("could not store the study")
            pid = c.execute(_INSERT_PREDICTION, {
                "study_id": study_id, "model_name": model.name, "model_version": model.version,
                "model_checksum": model.checksum, "probability": e.probability,
                "calibrated_probability": e.calibrated_probability, "threshold": e.threshold,
                "threshold_info": json.dumps(model.threshold_info), "label": e.label, "label_from": e.label_from,
                "latency_ms": e.latency_ms,
                "created": t, "heatmap_png": e.heatmap_png}).scalar_one()
            out.append({"study_id": study_id, "prediction_id": pid, "duplicate": duplicate})
        return out

    def set_heatmap(self, prediction_id: int, png: bytes) -> None:
        with self._write, self._transaction() as c:
            c.execute(text("UPDATE predictions SET heatmap_png = :png WHERE id = :id"), {"png": png, "id": prediction_id})

    def add_review(self, study_id: str, reviewer: str, decision: str, comment: str = "") -> dict | None:
        """Store a review of the study's latest prediction; None when the study does not exist."""
        with self._write, self._transaction() as c:
            if c.execute(text("SELECT 1 FROM studies WHERE id = :s"), {"s": study_id}).first() is None:
                return None
            p = c.execute(text("SELECT max(id) FROM predictions WHERE study_id = :s"), {"s": study_id}).scalar()
            rid = c.execute(text("INSERT INTO reviews (study_id, prediction_id, reviewer, decision, comment, created) "
                                 "VALUES (:s, :p, :r, :d, :c, :t) RETURNING id"),
                            {"s": study_id, "p": p, "r": reviewer, "d": decision, "c": comment, "t": now()}).scalar_one()
            return _row(c.execute(text("SELECT * FROM reviews WHERE id = :i"), {"i": rid}).mappings().first())

    # -------------------------------------------------------------------------------------------- reads
    def study(self, study_id: str) -> dict | None:
        return self._one(f"SELECT {_STUDY_COLUMNS} FROM studies s LEFT JOIN patients pt ON pt.id = s.patient_id "
                         "WHERE s.id = :s", s=study_id)

    def study_image(self, study_id: str) -> bytes | None:
        r = self._one("SELECT image_png FROM studies WHERE id = :s", s=study_id)
        return None if r is None else bytes(r["image_png"])

    def latest_prediction(self, study_id: str) -> dict | None:
        return self._one(f"SELECT {_PREDICTION_COLUMNS} FROM predictions WHERE study_id = :s "
                         "ORDER BY id DESC LIMIT 1", s=study_id)

    def heatmap(self, prediction_id: int) -> bytes | None:
        r = self._one("SELECT heatmap_png FROM predictions WHERE id = :i", i=prediction_id)
        return None if r is None or r["heatmap_png"] is None else bytes(r["heatmap_png"])

    def reviews(self, study_id: str) -> list[dict]:
        return self._rows("SELECT * FROM reviews WHERE study_id = :s ORDER BY id", s=study_id)

    def list_studies(self, limit: int = 50, offset: int = 0) -> list[dict]:
        """Studies, most recently predicted first, with their latest prediction and latest review."""
        return self._rows(
            "SELECT s.id, s.patient_id, s.filename, s.received, s.format, s.modality, "
            "p.id AS prediction_id, p.probability, p.calibrated_probability, p.threshold, p.label, p.label_from, "
            "p.created AS predicted, r.decision AS review_decision, r.reviewer AS review_reviewer, "
            "r.created AS reviewed, (SELECT count(*) FROM predictions WHERE study_id = s.id) AS n_predictions "
            "FROM studies s "
            "LEFT JOIN predictions p ON p.id = (SELECT max(id) FROM predictions WHERE study_id = s.id) "
            "LEFT JOIN reviews r ON r.id = (SELECT max(id) FROM reviews WHERE study_id = s.id) "
            "ORDER BY p.id DESC LIMIT :limit OFFSET :offset", limit=limit, offset=offset)

    def worklist(self, limit: int = 100) -> list[dict]:
        """Unreviewed studies in reading order (``inference.assess.WORKLIST_RULE``, ``reading_key`` in SQL): likely
        pneumonia first by calibrated probability,
        then the studies the model did not assess, then the rest by probability; oldest first within a tie. A
        review closes an item. Each row says its ``tier`` and ``position`` (1 = read first)."""
        rows = self._rows(
            "SELECT s.id AS study_id, s.patient_id, s.filename, s.received, s.format, s.modality, p.id AS prediction_id, "
            "p.probability, p.calibrated_probability, p.threshold, p.label, p.label_from, p.created AS predicted, "
            "CASE WHEN p.label = 'PNEUMONIA' THEN 1 WHEN p.label = 'not assessed' THEN 2 ELSE 3 END AS tier, "
            "CASE WHEN p.label = 'not assessed' THEN 0 WHEN p.label_from = 'probability' THEN p.probability "
            "ELSE p.calibrated_probability END "
            "AS urgency FROM studies s "
            "JOIN predictions p ON p.id = (SELECT max(id) FROM predictions WHERE study_id = s.id) "
            "WHERE NOT EXISTS (SELECT 1 FROM reviews r WHERE r.study_id = s.id) "
            "ORDER BY tier, urgency DESC, p.id LIMIT :limit", limit=limit)
        for i, r in enumerate(rows, 1):
            r["position"], r["tier"] = i, TIERS[int(r.pop("tier"))]
            r.pop("urgency")
        return rows

    def counts(self) -> dict[str, int]:
        c = self.conn
        try:
            return {t: c.execute(text(f"SELECT count(*) FROM {t}")).scalar_one() for t in TABLES}
        finally:
            c.rollback()


def export_csv(db: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``<table>.csv`` for every table into ``out_dir``. Image columns (BLOBs) are written as their size in
    bytes (column ``<name>_bytes``): the images stay in the database (``GET /studies/{id}/image.png``)."""
    out = Path(out_dir)
    if not is_url(db) and not Path(db).is_file():
        raise ConfigError(f"no study database at {db}; pass the --db of `pneumoscope serve`")
    engine = engine_for(db)
    written = []
    try:
        with engine.connect() as conn:
            out.mkdir(parents=True, exist_ok=True)
            for table in TABLES:
                res = conn.execute(text(f"SELECT * FROM {table} ORDER BY {_EXPORT_ORDER[table]}"))
                names = list(res.keys())
                blob_cols = {"image_png", "heatmap_png"}
                header = [f"{n}_bytes" if n in blob_cols else n for n in names]
                path = out / f"{table}.csv"
                with open(path, "w", newline="", encoding="utf-8") as f:
                    w = csv.writer(f)
                    w.writerow(header)
                    for row in res:
                        w.writerow([(len(v) if v is not None else "") if n in blob_cols else v
                                    for n, v in zip(names, row)])
                written.append(path)
    except exc.DBAPIError as e:
        raise ConfigError(f"cannot read the study database {describe(db)}: {str(e.orig).strip().splitlines()[0]}; "
                          "pass the --db of `pneumoscope serve`") from None
    finally:
        engine.dispose()
    return written
