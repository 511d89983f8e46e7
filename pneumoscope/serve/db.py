"""The study database: SQLite (stdlib ``sqlite3``), WAL mode, one connection per thread.

Tables: ``patients``, ``studies``, ``predictions``, ``reviews`` (see ``migrations/0001_initial.sql``).
Schema changes are the ordered files ``migrations/NNNN_name.sql``; each pending one is applied in one transaction
together with ``PRAGMA user_version = NNNN``, so a database is always at exactly one known version.

Durability: ``synchronous=FULL``. In WAL mode NORMAL already survives a crash of the *process* (what the SIGKILL
test checks); FULL also survives a power cut or OS crash, because the WAL is fsynced at every commit. A result
that was shown to a clinician must not vanish from the audit trail. The price is one fsync per commit, shared by
the requests that arrive together: they are group-committed (``StudyDB.add_predictions``).
"""
from __future__ import annotations

import csv
import json
import logging
import re
import sqlite3
import threading
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib.resources import files
from pathlib import Path

from pneumoscope.errors import ConfigError

log = logging.getLogger(__name__)

TABLES = ("patients", "studies", "predictions", "reviews")


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


@dataclass
class PredictionRecord:
    """One image of a request: its study and its new prediction row."""

    study: StudyRecord
    probability: float
    calibrated_probability: float | None
    threshold: float
    label: str
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


_MIGRATION_NAME = re.compile(r"^(\d{4})_[a-z0-9_]+\.sql$")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def migrations() -> list[tuple[int, str, str]]:
    """(version, file name, SQL) of every ``migrations/NNNN_name.sql``, in version order."""

    out = []
    for f in files("pneumoscope.serve").joinpath("migrations").iterdir():
        m = _MIGRATION_NAME.match(f.name)
        if m:
            out.append((int(m.group(1)), f.name, f.read_text(encoding="utf-8")))
    out.sort()
    versions = [v for v, _, _ in out]
    if versions != list(range(1, len(out) + 1)):
        raise RuntimeError(f"migration files must be numbered 0001, 0002, ... without gaps; found {versions}")
    return out


def migrate(conn: sqlite3.Connection, steps: list[tuple[int, str, str]] | None = None) -> int:
    """Apply the pending migrations (each in its own transaction with its ``user_version``); return the version."""
    steps = migrations() if steps is None else steps
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if steps and current > steps[-1][0]:
        raise RuntimeError(f"database is at schema version {current}, newer than this pneumoscope "
                           f"({steps[-1][0]}): upgrade pneumoscope")
    for version, name, sql in steps:
        if version <= current:
            continue
        log.info("applying migration %s", name)
        try:
            # executescript runs statement by statement inside our explicit transaction
            conn.executescript(f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {version};\nCOMMIT;")
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        current = version
    return current


def connect(path: str | Path) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, synchronous=FULL, foreign keys on."""
    conn = sqlite3.connect(str(path), isolation_level=None, timeout=30.0, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA foreign_keys=ON")
    return conn


class _Transaction:
    """``with _Transaction(conn):`` = BEGIN IMMEDIATE (take SQLite's write lock now: no deadlock on upgrade)
    ... COMMIT, or ROLLBACK on error. Callers hold ``StudyDB._write`` around it: this process's writers queue on
    a Python lock, which hands over at once, instead of in SQLite's busy handler, which sleeps up to 100 ms."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except sqlite3.Error:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise
        if self.conn.in_transaction:  # some errors (disk full, ...) have rolled back already
            self.conn.execute("ROLLBACK")


@dataclass
class _Write:
    """One request's rows, waiting for the next group commit."""
    entries: list[PredictionRecord]
    model: ModelRecord
    result: list[dict] | None = None
    error: BaseException | None = None
    done: bool = False


def _row(r: sqlite3.Row | None) -> dict | None:
    if r is None:
        return None
    d = dict(r)
    for k in ("warnings", "threshold_info"):
        if isinstance(d.get(k), str):
            d[k] = json.loads(d[k])
    return d


_STUDY_COLUMNS = ("s.id, s.patient_id, coalesce(pt.pseudonymized, 0) AS pseudonymized, s.received, s.sha256, s.format, "
                  "s.modality, s.manufacturer, s.device_model, s.width, s.height, s.warnings")
_PREDICTION_COLUMNS = ("id, study_id, model_name, model_version, model_checksum, probability, calibrated_probability, "
                       "threshold, threshold_info, label, latency_ms, created, heatmap_png IS NOT NULL AS has_heatmap")


class StudyDB:
    """The study database of one service. Each thread gets its own connection (sqlite3 objects are not shared)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._write = threading.Lock()    # held by the one writer of the moment
        self._pending: list[_Write] = []  # requests waiting for a group commit
        self.version = migrate(self.conn)

    @property
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is None:
            c = self._local.conn = connect(self.path)
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
            with _Transaction(self.conn) as c:
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
    def _insert(c: sqlite3.Connection, entries: list[PredictionRecord], model: ModelRecord) -> list[dict]:
        out = []
        t = now()
        for e in entries:
            st = e.study
            if st.patient_id:
                c.execute("INSERT INTO patients (id, pseudonymized, created) VALUES (?, ?, ?) "
                          "ON CONFLICT(id) DO NOTHING", (st.patient_id, int(model.pseudonymized), t))
            row = c.execute("SELECT id FROM studies WHERE sha256 = ?", (st.sha256,)).fetchone()
            duplicate = row is not None
            if duplicate:
                study_id = row["id"]
            else:
                study_id = st.study_uid
                # several images of one DICOM study share its UID: the second one gets a uuid
                if not study_id or c.execute("SELECT 1 FROM studies WHERE id = ?", (study_id,)).fetchone():
                    study_id = uuid.uuid4().hex
                c.execute(
                    "INSERT INTO studies (id, patient_id, received, sha256, format, modality, manufacturer, "
                    "device_model, width, height, warnings, image_png) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (study_id, st.patient_id, t, st.sha256, st.format, st.modality, st.manufacturer, st.device_model,
                     st.width, st.height, json.dumps(st.warnings), st.image_png))
            cur = c.execute(
                "INSERT INTO predictions (study_id, model_name, model_version, model_checksum, probability, "
                "calibrated_probability, threshold, threshold_info, label, latency_ms, created, heatmap_png) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (study_id, model.name, model.version, model.checksum, e.probability, e.calibrated_probability,
                 e.threshold, json.dumps(model.threshold_info), e.label, e.latency_ms, t, e.heatmap_png))
            out.append({"study_id": study_id, "prediction_id": cur.lastrowid, "duplicate": duplicate})
        return out

    def set_heatmap(self, prediction_id: int, png: bytes) -> None:
        with self._write, _Transaction(self.conn) as c:
            c.execute("UPDATE predictions SET heatmap_png = ? WHERE id = ?", (png, prediction_id))

    def add_review(self, study_id: str, reviewer: str, decision: str, comment: str = "") -> dict | None:
        """Store a review of the study's latest prediction; None when the study does not exist."""
        with self._write, _Transaction(self.conn) as c:
            if c.execute("SELECT 1 FROM studies WHERE id = ?", (study_id,)).fetchone() is None:
                return None
            p = c.execute("SELECT max(id) AS id FROM predictions WHERE study_id = ?", (study_id,)).fetchone()
            cur = c.execute("INSERT INTO reviews (study_id, prediction_id, reviewer, decision, comment, created) "
                            "VALUES (?, ?, ?, ?, ?, ?)", (study_id, p["id"], reviewer, decision, comment, now()))
            return _row(c.execute("SELECT * FROM reviews WHERE id = ?", (cur.lastrowid,)).fetchone())

    # -------------------------------------------------------------------------------------------- reads
    def study(self, study_id: str) -> dict | None:
        return _row(self.conn.execute(f"SELECT {_STUDY_COLUMNS} FROM studies s LEFT JOIN patients pt "
                                      "ON pt.id = s.patient_id WHERE s.id = ?", (study_id,)).fetchone())

    def study_image(self, study_id: str) -> bytes | None:
        r = self.conn.execute("SELECT image_png FROM studies WHERE id = ?", (study_id,)).fetchone()
        return None if r is None else bytes(r[0])

    def latest_prediction(self, study_id: str) -> dict | None:
        return _row(self.conn.execute(f"SELECT {_PREDICTION_COLUMNS} FROM predictions WHERE study_id = ? "
                                      "ORDER BY id DESC LIMIT 1", (study_id,)).fetchone())

    def heatmap(self, prediction_id: int) -> bytes | None:
        r = self.conn.execute("SELECT heatmap_png FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
        return None if r is None or r[0] is None else bytes(r[0])

    def reviews(self, study_id: str) -> list[dict]:
        rows = self.conn.execute("SELECT * FROM reviews WHERE study_id = ? ORDER BY id", (study_id,)).fetchall()
        return [_row(r) for r in rows]

    def list_studies(self, limit: int = 50, offset: int = 0) -> list[dict]:
        """Studies, most recently predicted first, with their latest prediction and latest review."""
        rows = self.conn.execute(
            "SELECT s.id, s.patient_id, s.received, s.format, s.modality, "
            "p.id AS prediction_id, p.probability, p.calibrated_probability, p.threshold, p.label, "
            "p.created AS predicted, r.decision AS review_decision, r.reviewer AS review_reviewer, "
            "r.created AS reviewed, (SELECT count(*) FROM predictions WHERE study_id = s.id) AS n_predictions "
            "FROM studies s "
            "LEFT JOIN predictions p ON p.id = (SELECT max(id) FROM predictions WHERE study_id = s.id) "
            "LEFT JOIN reviews r ON r.id = (SELECT max(id) FROM reviews WHERE study_id = s.id) "
            "ORDER BY p.id DESC LIMIT ? OFFSET ?", (limit, offset)).fetchall()
        return [_row(r) for r in rows]

    def counts(self) -> dict[str, int]:
        return {t: self.conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in TABLES}


def export_csv(db_path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write ``<table>.csv`` for every table into ``out_dir``. Image columns (BLOBs) are written as their size in
    bytes (column ``<name>_bytes``): the images stay in the database (``GET /studies/{id}/image.png``)."""
    db_path, out = Path(db_path), Path(out_dir)
    if not db_path.is_file():
        raise ConfigError(f"no study database at {db_path}; pass the --db of `pneumoscope serve`")
    out.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(str(db_path))
    written = []
    try:
        for table in TABLES:
            cur = conn.execute(f"SELECT * FROM {table} ORDER BY rowid")
            names = [d[0] for d in cur.description]
            blob_cols = {"image_png", "heatmap_png"}
            header = [f"{n}_bytes" if n in blob_cols else n for n in names]
            path = out / f"{table}.csv"
            with open(path, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(header)
                for row in cur:
                    w.writerow([(len(v) if v is not None else "") if n in blob_cols else v for n, v in zip(names, row)])
            written.append(path)
    finally:
        conn.close()
    return written
