"""The study database: migrations, duplicates, reviews, listing, thread safety, CSV export. Every test that takes
``study_db`` runs on SQLite and on a real PostgreSQL (tests/serve/conftest.py)."""
from __future__ import annotations

import csv
import shutil
import threading

import pytest
from sqlalchemy import exc, inspect, text

from pneumoscope.cli import build_parser
from pneumoscope.errors import ConfigError
from pneumoscope.studydb.db import (
    ModelRecord,
    PredictionRecord,
    StudyDB,
    StudyRecord,
    export_csv,
)
from pneumoscope.studydb.schema import (
    MIGRATIONS,
    current_revision,
    engine_for,
    migrate,
    revisions,
)

MODEL = ModelRecord(name="seed_cnn", version="0.1.0", checksum="sha256:" + "0" * 64,
                    threshold_info={"method": "youden", "threshold": 0.7})


def entry(sha: str, **kw) -> PredictionRecord:
    e = {"sha256": sha, "format": "DICOM", "width": 20, "height": 10, "image_png": b"\x89PNG-fake", "warnings": ["w"],
         "patient_id": "P1", "study_uid": "1.2.3", "modality": "DX", "manufacturer": None, "device_model": None,
         "probability": 0.4, "calibrated_probability": 0.6, "threshold": 0.7, "label": "NORMAL",
         "label_from": "calibrated_probability", "latency_ms": 12.0, "heatmap_png": None}
    e.update(kw)
    pred = {k: e.pop(k) for k in ("probability", "calibrated_probability", "threshold", "label", "label_from",
                                  "latency_ms", "heatmap_png")}
    return PredictionRecord(study=StudyRecord(**e), **pred)


def sql(db: StudyDB, statement: str):
    """One value of a statement on ``db``'s connection of this thread (its transaction ended at once)."""
    try:
        return db.conn.execute(text(statement)).scalar()
    finally:
        db.conn.rollback()


def test_migrations_set_the_version_and_are_idempotent(study_db):
    steps = revisions()
    assert [int(v) for v in steps] == list(range(1, len(steps) + 1))
    db = StudyDB(study_db)
    assert db.version == len(steps)
    assert sql(db, "SELECT version_num FROM alembic_version") == steps[-1]
    if db.dialect == "sqlite":
        assert sql(db, "PRAGMA journal_mode") == "wal"
        assert sql(db, "PRAGMA synchronous") == 2  # FULL
    tables = set(inspect(db.engine).get_table_names())
    assert {"patients", "studies", "predictions", "reviews"} <= tables
    assert "filename" in {c["name"] for c in inspect(db.engine).get_columns("studies")}
    assert {tuple(u["column_names"]) for u in inspect(db.engine).get_unique_constraints("studies")} == {("sha256",)}
    db.close()
    assert StudyDB(study_db).version == len(steps)  # reopening applies nothing


def test_version_3_stores_label_from_and_fills_it_for_older_rows(study_db, tmp_path):
    """A database made at version 2 (before ``predictions.label_from``) keeps its rows; the migration gives each the
    probability its label came from then (the calibrated one when there was one)."""
    scripts = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, scripts)
    (scripts / "versions" / "0003_prediction_label_from.py").unlink()
    engine = engine_for(study_db)
    assert migrate(engine, scripts) == 2
    with engine.begin() as c:
        c.execute(text("INSERT INTO studies (id, received, sha256, format, width, height, image_png) "
                       "VALUES ('s', 't', 'h', 'PNG', 1, 1, :png)"), {"png": b"x"})
        for cal in (0.9, None):
            c.execute(text("INSERT INTO predictions (study_id, model_name, model_checksum, probability, "
                           "calibrated_probability, threshold, label, latency_ms, created) "
                           "VALUES ('s', 'm', 'c', 0.5, :cal, 0.7, 'PNEUMONIA', 1, 't')"), {"cal": cal})
    assert migrate(engine) == 3
    with engine.connect() as c:
        got = c.execute(text("SELECT calibrated_probability, label_from FROM predictions ORDER BY id")).all()
    engine.dispose()
    assert [tuple(r) for r in got] == [(0.9, "calibrated_probability"), (None, "probability")]
    db = StudyDB(study_db)
    sid = db.add_predictions([entry("c" * 64, label_from="probability")], MODEL)[0]["study_id"]
    assert db.latest_prediction(sid)["label_from"] == "probability"  # stored as the predictor said, not re-derived
    db.close()


FAILING = {"0001_a.py": ("0001", None, 'op.execute("CREATE TABLE a (x INTEGER)")'),
           "0002_b.py": ("0002", "0001", 'op.execute("CREATE TABLE b (x INTEGER)")\n'
                                         '    op.execute("INSERT INTO nowhere VALUES (1)")')}


def test_failed_migration_rolls_back_entirely(study_db, tmp_path):
    scripts = tmp_path / "migrations"
    (scripts / "versions").mkdir(parents=True)
    shutil.copy(MIGRATIONS / "env.py", scripts / "env.py")
    for name, (rev, down, body) in FAILING.items():
        (scripts / "versions" / name).write_text(f"from alembic import op\nrevision = {rev!r}\n"
                                                 f"down_revision = {down!r}\n\n\ndef upgrade():\n    {body}\n")
    engine = engine_for(study_db)
    with pytest.raises(exc.DBAPIError, match="nowhere"):
        migrate(engine, scripts)
    with engine.connect() as c:
        assert current_revision(c) == "0001"
    assert set(inspect(engine).get_table_names()) == {"a", "alembic_version"}  # b was rolled back with its step
    (scripts / "versions" / "0002_b.py").unlink()
    assert migrate(engine, scripts) == 1
    engine.dispose()


def test_newer_database_is_refused(study_db):
    StudyDB(study_db).close()
    engine = engine_for(study_db)
    with engine.begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(RuntimeError, match="schema version 99"):
        migrate(engine)
    engine.dispose()


def test_a_bad_db_path_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"folder .*nowhere does not exist; create it \(mkdir -p"):
        StudyDB(tmp_path / "nowhere" / "s.db")
    junk = tmp_path / "notes.txt"
    junk.write_text("not a database at all, just some text\n")
    with pytest.raises(ConfigError, match=r"notes.txt is not a SQLite database; pass a new file name"):
        StudyDB(junk)
    with pytest.raises(ConfigError, match="is not a SQLite database"):
        StudyDB(tmp_path)  # a folder


def test_duplicate_file_is_one_study_with_every_prediction(study_db):
    db = StudyDB(study_db)
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


def test_reviews_and_listing(study_db):
    db = StudyDB(study_db)
    a = db.add_predictions([entry("a" * 64, study_uid=None, patient_id=None)], MODEL)[0]["study_id"]
    b = db.add_predictions([entry("b" * 64, study_uid=None, patient_id=None)], MODEL)[0]["study_id"]
    assert db.add_review("missing", "dr", "agree") is None
    r = db.add_review(a, "Dr A", "disagree", "effusion, not pneumonia")
    assert (r["study_id"], r["reviewer"], r["decision"], r["comment"]) == (a, "Dr A", "disagree", "effusion, not pneumonia")
    assert r["prediction_id"] == db.latest_prediction(a)["id"]
    with pytest.raises(exc.IntegrityError):
        db.add_review(a, "Dr A", "maybe")
    rows = db.list_studies()
    assert [x["id"] for x in rows] == [b, a]  # most recently predicted first
    assert rows[1]["review_decision"] == "disagree" and rows[0]["review_decision"] is None
    assert db.counts()["patients"] == 0 and db.counts()["reviews"] == 1


def test_one_connection_per_thread_and_concurrent_writers(study_db):
    db = StudyDB(study_db)
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
    if db.dialect == "sqlite":
        assert sql(db, "PRAGMA integrity_check") == "ok"


def test_export_csv_one_file_per_table(study_db, tmp_path):
    db = StudyDB(study_db)
    sid = db.add_predictions([entry("a" * 64, heatmap_png=b"12345")], MODEL)[0]["study_id"]
    db.add_review(sid, "Dr, \"Quote\"", "agree", "line1\nline2")
    db.close()
    # through the `db export` sub-command as cli.py wires it
    args = build_parser().parse_args(["db", "export", "--db", study_db, "--format", "csv", "--out",
                                      str(tmp_path / "csv")])
    assert args.func(args) == 0
    out = {f.stem: list(csv.DictReader(open(f, newline=""))) for f in (tmp_path / "csv").glob("*.csv")}
    assert set(out) == {"patients", "studies", "predictions", "reviews"}
    assert out["patients"][0]["id"] == "P1"
    assert out["studies"][0]["image_png_bytes"] == str(len(b"\x89PNG-fake")) and "image_png" not in out["studies"][0]
    assert out["predictions"][0]["heatmap_png_bytes"] == "5" and float(out["predictions"][0]["probability"]) == 0.4
    assert out["reviews"][0]["reviewer"] == 'Dr, "Quote"' and out["reviews"][0]["comment"] == "line1\nline2"
    with pytest.raises(ConfigError, match="no study database"):
        export_csv(tmp_path / "absent.db", tmp_path / "x")


def test_group_commit_writes_waiting_requests_together_and_isolates_a_bad_one(study_db):
    db = StudyDB(study_db)
    results, errors = {}, {}

    def write(name: str, e: dict) -> None:
        try:
            results[name] = db.add_predictions([e], MODEL)
        except exc.DBAPIError as x:
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
    not_null = "studies.format" if db.dialect == "sqlite" else 'column "format" of relation "studies"'
    assert isinstance(errors["bad"], exc.IntegrityError) and not_null in str(errors["bad"])
    assert db.counts()["studies"] == 2 and db.counts()["predictions"] == 2
    assert db._pending == []


def test_db_migrate_command(study_db):
    args = build_parser().parse_args(["db", "migrate", "--db", study_db])
    assert args.func(args) == 0
    db = StudyDB(study_db)
    assert db.version == len(revisions()) and db.counts()["studies"] == 0


def test_same_file_from_two_processes_at_once_is_one_study(study_db):
    """Two StudyDB objects = two service processes (their own writer locks and connections): the same file stored
    by both at the same moment is one study (UNIQUE sha256 + ON CONFLICT DO NOTHING), with both predictions."""
    dbs = [StudyDB(study_db) for _ in range(4)]
    start, results, errors = threading.Barrier(8), [], []

    def work(db: StudyDB, i: int) -> None:
        try:
            start.wait()
            results.append(db.add_predictions([entry("f" * 64, study_uid=None, filename=f"copy{i}.jpeg")], MODEL)[0])
        except Exception as e:  # noqa: BLE001 - surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(dbs[i % 4], i)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert errors == [] and len(results) == 8
    assert len({r["study_id"] for r in results}) == 1 and sorted(r["duplicate"] for r in results) == [False] + [True] * 7
    assert dbs[0].counts() == {"patients": 1, "studies": 1, "predictions": 8, "reviews": 0}
    row = dbs[0].list_studies()[0]
    assert row["n_predictions"] == 8 and row["filename"].startswith("copy") and row["patient_id"] == "P1"
    for db in dbs:
        db.close()


def test_urls(postgres):
    from pneumoscope.studydb.schema import describe

    url = postgres.create_database()
    plain = url.replace("postgresql+psycopg://", "postgresql://")  # SQLAlchemy's default driver would be psycopg2
    db = StudyDB(plain)
    assert db.dialect == "postgresql" and db.version == len(revisions())
    db.close()
    assert describe("postgresql+psycopg://u:secret@h/x") == "postgresql+psycopg://u:***@h/x"
    with pytest.raises(ConfigError, match="study database URL"):
        StudyDB("nosuchdialect://x/y")
    with pytest.raises(ConfigError, match=r"cannot open the study database postgresql\+psycopg://u:\*\*\*@127.0.0.1:1/x"):
        StudyDB("postgresql+psycopg://u:secret@127.0.0.1:1/x")


def test_worklist_puts_likely_pneumonia_first_keeps_not_assessed_and_closes_on_review(study_db):
    db = StudyDB(study_db)
    cases = [("a", "NORMAL", 0.30), ("b", "PNEUMONIA", 0.80), ("c", "not assessed", 0.99), ("d", "PNEUMONIA", 0.95),
             ("e", "NORMAL", 0.45), ("f", "not assessed", 0.10)]
    ids = {}
    for sha, label, p in cases:  # arrival order a..f
        ids[sha] = db.add_predictions([entry(sha * 64, label=label, calibrated_probability=p, study_uid=None,
                                             filename=f"{sha}.png")], MODEL)[0]["study_id"]
    items = db.worklist()
    assert [i["filename"] for i in items] == ["d.png", "b.png", "c.png", "f.png", "e.png", "a.png"]
    assert [i["position"] for i in items] == list(range(1, 7))
    assert [i["tier"] for i in items] == ["likely pneumonia"] * 2 + ["not assessed"] * 2 + ["likely normal"] * 2
    db.add_review(ids["d"], "Dr R", "agree")
    db.add_review(ids["c"], "Dr R", "disagree")
    assert [i["filename"] for i in db.worklist()] == ["b.png", "f.png", "e.png", "a.png"]
    assert [i["filename"] for i in db.worklist(limit=2)] == ["b.png", "f.png"]
    db.close()
