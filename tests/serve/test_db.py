"""The study database: migrations, duplicates, reviews, listing, thread safety, CSV export."""
from __future__ import annotations

import csv
import sqlite3
import threading

import pytest

from pneumoscope.cli import build_parser
from pneumoscope.errors import ConfigError
from pneumoscope.serve.db import (
    ModelRecord,
    PredictionRecord,
    StudyDB,
    StudyRecord,
    connect,
    export_csv,
    migrate,
    migrations,
)

MODEL = ModelRecord(name="seed_cnn", version="0.1.0", checksum="sha256:" + "0" * 64,
                    threshold_info={"method": "youden", "threshold": 0.7})


def entry(sha: str, **kw) -> PredictionRecord:
    e = {"sha256": sha, "format": "DICOM", "width": 20, "height": 10, "image_png": b"\x89PNG-fake", "warnings": ["w"],
         "patient_id": "P1", "study_uid": "1.2.3", "modality": "DX", "manufacturer": None, "device_model": None,
         "probability": 0.4, "calibrated_probability": 0.6, "threshold": 0.7, "label": "NORMAL", "latency_ms": 12.0,
         "heatmap_png": None}
    e.update(kw)
    pred = {k: e.pop(k) for k in ("probability", "calibrated_probability", "threshold", "label", "latency_ms",
                                  "heatmap_png")}
    return PredictionRecord(study=StudyRecord(**e), **pred)


def test_migrations_set_user_version_and_are_idempotent(tmp_path):
    steps = migrations()
    assert [v for v, _, _ in steps] == list(range(1, len(steps) + 1))
    db = StudyDB(tmp_path / "s.db")
    assert db.version == len(steps)
    c = db.conn
    assert c.execute("PRAGMA user_version").fetchone()[0] == len(steps)
    assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert c.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    tables = {r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"patients", "studies", "predictions", "reviews"} <= tables
    db.close()
    assert StudyDB(tmp_path / "s.db").version == len(steps)  # reopening applies nothing


def test_failed_migration_rolls_back_entirely(tmp_path):
    conn = connect(tmp_path / "m.db")
    steps = [(1, "0001_a.sql", "CREATE TABLE a (x INTEGER);"),
             (2, "0002_b.sql", "CREATE TABLE b (x INTEGER); INSERT INTO nowhere VALUES (1);")]
    with pytest.raises(sqlite3.OperationalError, match="nowhere"):
        migrate(conn, steps)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"a"}  # b was rolled back with its failed step
    assert migrate(conn, steps[:1]) == 1


def test_newer_database_is_refused(tmp_path):
    conn = connect(tmp_path / "n.db")
    conn.execute("PRAGMA user_version = 99")
    with pytest.raises(RuntimeError, match="schema version 99"):
        migrate(conn)


def test_duplicate_file_is_one_study_with_every_prediction(tmp_path):
    db = StudyDB(tmp_path / "s.db")
    first = db.add_predictions([entry("a" * 64)], MODEL)[0]
    again = db.add_predictions([entry("a" * 64, probability=0.9, label="PNEUMONIA")], MODEL)[0]
    assert first["study_id"] == again["study_id"] == "1.2.3"
    assert (first["duplicate"], again["duplicate"]) == (False, True)
    assert db.counts() == {"patients": 1, "studies": 1, "predictions": 2, "reviews": 0}
    latest = db.latest_prediction("1.2.3")
    assert latest["id"] == again["prediction_id"] and latest["probability"] == 0.9
    assert latest["threshold_info"] == MODEL.threshold_info and latest["has_heatmap"] == 0
    # another image of the same DICOM study (same StudyInstanceUID, other bytes) gets its own id
    other = db.add_predictions([entry("b" * 64)], MODEL)[0]
    assert other["study_id"] != "1.2.3" and len(other["study_id"]) == 32
    s = db.study("1.2.3")
    assert s["warnings"] == ["w"] and s["patient_id"] == "P1" and s["width"] == 20
    assert db.study_image("1.2.3") == b"\x89PNG-fake"


def test_reviews_and_listing(tmp_path):
    db = StudyDB(tmp_path / "s.db")
    a = db.add_predictions([entry("a" * 64, study_uid=None, patient_id=None)], MODEL)[0]["study_id"]
    b = db.add_predictions([entry("b" * 64, study_uid=None, patient_id=None)], MODEL)[0]["study_id"]
    assert db.add_review("missing", "dr", "agree") is None
    r = db.add_review(a, "Dr A", "disagree", "effusion, not pneumonia")
    assert (r["study_id"], r["reviewer"], r["decision"], r["comment"]) == (a, "Dr A", "disagree", "effusion, not pneumonia")
    assert r["prediction_id"] == db.latest_prediction(a)["id"]
    with pytest.raises(sqlite3.IntegrityError):
        db.add_review(a, "Dr A", "maybe")
    rows = db.list_studies()
    assert [x["id"] for x in rows] == [b, a]  # most recently predicted first
    assert rows[1]["review_decision"] == "disagree" and rows[0]["review_decision"] is None
    assert db.counts()["patients"] == 0 and db.counts()["reviews"] == 1


def test_one_connection_per_thread_and_concurrent_writers(tmp_path):
    db = StudyDB(tmp_path / "s.db")
    conns, errors = set(), []

    def work(t: int) -> None:
        try:
            conns.add(id(db.conn))
            for i in range(10):
                db.add_predictions([entry(f"{t:02d}{i:02d}".ljust(64, "0"), study_uid=None)], MODEL)
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(conns) == 4
    assert db.counts()["studies"] == 40 and db.counts()["predictions"] == 40
    assert db.conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_export_csv_one_file_per_table(tmp_path):
    db = StudyDB(tmp_path / "s.db")
    sid = db.add_predictions([entry("a" * 64, heatmap_png=b"12345")], MODEL)[0]["study_id"]
    db.add_review(sid, "Dr, \"Quote\"", "agree", "line1\nline2")
    db.close()
    # through the `db export` sub-command as cli.py wires it
    args = build_parser().parse_args(["db", "export", "--db", str(tmp_path / "s.db"), "--format", "csv", "--out", str(tmp_path / "csv")])
    assert args.func(args) == 0
    out = {f.stem: list(csv.DictReader(open(f, newline=""))) for f in (tmp_path / "csv").glob("*.csv")}
    assert set(out) == {"patients", "studies", "predictions", "reviews"}
    assert out["patients"][0]["id"] == "P1"
    assert out["studies"][0]["image_png_bytes"] == str(len(b"\x89PNG-fake")) and "image_png" not in out["studies"][0]
    assert out["predictions"][0]["heatmap_png_bytes"] == "5" and float(out["predictions"][0]["probability"]) == 0.4
    assert out["reviews"][0]["reviewer"] == 'Dr, "Quote"' and out["reviews"][0]["comment"] == "line1\nline2"
    with pytest.raises(ConfigError, match="no study database"):
        export_csv(tmp_path / "absent.db", tmp_path / "x")


def test_group_commit_writes_waiting_requests_together_and_isolates_a_bad_one(tmp_path):
    db = StudyDB(tmp_path / "s.db")
    results, errors = {}, {}

    def write(name: str, e: dict) -> None:
        try:
            results[name] = db.add_predictions([e], MODEL)
        except sqlite3.Error as x:
            errors[name] = x

    jobs = {"a": entry("a" * 64, study_uid=None), "bad": entry("b" * 64, study_uid=None, format=None),
            "c": entry("c" * 64, study_uid=None)}
    db._write.acquire()  # a writer is busy: the three requests queue up
    threads = [threading.Thread(target=write, args=kv) for kv in jobs.items()]
    for t in threads:
        t.start()
    for _ in range(500):
        if len(db._pending) == 3:
            break
        threading.Event().wait(0.01)
    assert len(db._pending) == 3
    db._write.release()
    for t in threads:
        t.join(10)
    assert set(results) == {"a", "c"} and list(errors) == ["bad"]
    assert isinstance(errors["bad"], sqlite3.IntegrityError) and "studies.format" in str(errors["bad"])
    assert db.counts()["studies"] == 2 and db.counts()["predictions"] == 2
    assert db._pending == []
