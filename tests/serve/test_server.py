"""A real ``python -m pneumoscope serve`` process on 127.0.0.1: uploads over HTTP, and a SIGKILL in the middle of
a burst of concurrent uploads that must leave an intact database holding every answered prediction; on SQLite
and on PostgreSQL (``study_db``), and with ``--workers 2``."""
from __future__ import annotations

import os
import signal
import threading
import time

import httpx
import pytest
from sqlalchemy import text

from pneumoscope.studydb.schema import engine_for

KEY = "server-test-key-42"
H = {"X-API-Key": KEY}


def query(db: str, statement: str) -> list[tuple]:
    """Rows of ``statement`` on a fresh connection (SQLite: recovers the WAL a killed server left behind)."""
    engine = engine_for(db)
    try:
        with engine.connect() as c:
            return [tuple(r) for r in c.execute(text(statement))]
    finally:
        engine.dispose()


def intact(db: str) -> bool:
    return not db.endswith(".db") or query(db, "PRAGMA integrity_check") == [("ok",)]


@pytest.mark.parametrize("workers", [1, 2])
def test_real_server_predicts_a_shared_jpeg_and_dicom(server_factory, study_db, workers, jpegs, dicom_dir):
    s = server_factory(db=study_db, api_key=KEY, extra=["--workers", str(workers)])
    dcm = dicom_dir / "chest_dx_nih_no_finding.dcm"
    with httpx.Client(base_url=s.url, headers=H, timeout=60) as c:
        health = httpx.get(s.url + "/health", timeout=10).json()
        assert health["model"]["name"] == "seed_cnn" and health["api_key_required"] is True
        assert httpx.get(s.url + "/studies", timeout=10).status_code == 401
        r = c.post("/predict", files=[("file", (jpegs[1].name, jpegs[1].read_bytes(), "image/jpeg")),
                                      ("file", (dcm.name, dcm.read_bytes(), "application/dicom"))])
        assert r.status_code == 200, r.text
        a, b = r.json()["results"]
        assert (a["format"], b["format"], b["modality"]) == ("JPEG", "DICOM", "DX")
        for x in (a, b):
            assert 0.0 <= x["probability"] <= 1.0 and x["label"] in ("NORMAL", "PNEUMONIA")
            assert bool(x["heatmap_png_base64"]) == (x["label"] == "PNEUMONIA")  # a map only for PNEUMONIA
        img = c.get(b["image_url"])
        assert img.status_code == 200 and img.content[:8] == b"\x89PNG\r\n\x1a\n"
        assert c.get(b["report_url"]).json()["study"]["modality"] == "DX"
        studies = c.get("/studies").json()["studies"]
        assert sorted(x["filename"] for x in studies) == sorted([jpegs[1].name, dcm.name])
        assert all("patient_id" in x for x in studies)
    s.stop()  # SIGTERM: graceful shutdown
    assert s.proc.returncode in (0, -15), s.output()  # recent uvicorn re-raises SIGTERM after its shutdown
    assert "Application shutdown complete" in s.output()
    assert query(study_db, "SELECT count(*) FROM predictions") == [(2,)]
    assert intact(study_db)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigkill_during_a_burst_loses_no_answered_prediction(server_factory, study_db, workers, jpegs):
    """``workers=1``: the server process is SIGKILLed; ``workers=2``: one of its two worker processes is."""
    s = server_factory(db=study_db, extra=["--workers", str(workers)])
    answered: list[tuple[int, str]] = []
    failures: list[str] = []
    lock, stop = threading.Lock(), threading.Event()
    payloads = [(p.name, p.read_bytes()) for p in jpegs]

    def client(i: int) -> None:
        with httpx.Client(base_url=s.url, timeout=30) as c:
            n = i
            while not stop.is_set():
                name, data = payloads[n % len(payloads)]
                n += 1
                try:
                    r = c.post("/predict?heatmap=false", files=[("file", (name, data, "image/jpeg"))])
                except httpx.TransportError:
                    return  # the server is gone
                with lock:
                    if r.status_code == 200:
                        answered.extend((x["prediction_id"], x["study_id"]) for x in r.json()["results"])
                    else:
                        failures.append(r.text)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 90
    while len(answered) < 30 and time.monotonic() < deadline and not failures:
        time.sleep(0.05)
    if workers == 1:
        s.kill()  # SIGKILL while the clients are still sending
    else:
        pids = s.worker_pids()
        assert len(pids) == 2, (pids, s.output())
        os.kill(pids[0], signal.SIGKILL)
    stop.set()
    for t in threads:
        t.join(60)
    s.stop()  # the other worker: shut down gracefully
    assert failures == [] and len(answered) >= 30, (failures[:3], len(answered), s.output())

    assert intact(study_db)
    stored = dict(query(study_db, "SELECT id, study_id FROM predictions"))
    missing = [(pid, sid) for pid, sid in answered if stored.get(pid) != sid]
    assert missing == []
    studies = {r[0] for r in query(study_db, "SELECT id FROM studies")}
    assert {sid for _, sid in answered} <= studies
    assert len(studies) == len({sid for sid in stored.values()}) <= len(payloads)  # duplicates: one study each
