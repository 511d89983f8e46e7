"""Fixtures of the service tests: one tiny trained checkpoint per session, apps on temporary databases, a
temporary PostgreSQL server per session (``study_db`` runs a test on SQLite and on PostgreSQL), and a real
``python -m pneumoscope serve`` process on a free local port."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from pneumoscope.serve.app import create_app
from tests.pgtemp import PROGRAMS, TempPostgres, find_program


@pytest.fixture(scope="session")
def checkpoint(tiny_checkpoint: Path) -> Path:
    """The session's tiny seed_cnn (tests/conftest.py)."""
    return tiny_checkpoint


@pytest.fixture(scope="session")
def predictor(checkpoint: Path):
    from pneumoscope.inference.loader import load

    return load(checkpoint, device="cpu")


@pytest.fixture(scope="session")
def jpegs(chest_xray: Path) -> list[Path]:
    """Real shared JPEGs, NORMAL and PNEUMONIA alternating."""
    normal = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:6]
    pneumonia = sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:6]
    return [p for pair in zip(normal, pneumonia) for p in pair]


@pytest.fixture(scope="session")
def postgres(system_program):
    """A temporary PostgreSQL server for the session (skipped, or failed under CI, without Debian's postgresql)."""
    for name in PROGRAMS:
        found = find_program(name)
        system_program(name, "postgresql", [found] if found else [])
    pg = TempPostgres()
    yield pg
    pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def study_db(request, tmp_path) -> str:
    """The --db of a test, once per back-end: a new SQLite file, or a new database on the session's PostgreSQL."""
    if request.param == "sqlite":
        return str(tmp_path / "studies.db")
    return request.getfixturevalue("postgres").create_database()


@pytest.fixture
def make_app(predictor, tmp_path):
    """create_app on a fresh database in tmp_path, sharing the session's loaded model."""
    def make(**kw):
        return create_app(predictor, tmp_path / "studies.db", **kw)
    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``python -m pneumoscope serve`` in a subprocess (cwd: a temporary folder), waited for until /health answers."""

    def __init__(self, checkpoint: Path, db: Path | str, cwd: Path, api_key: str | None = None, extra: list[str] = ()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.pop("PNEUMOSCOPE_API_KEY", None)
        if api_key:
            env["PNEUMOSCOPE_API_KEY"] = api_key
        self.log = open(cwd / "server.log", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pneumoscope", "serve", "--checkpoint", str(checkpoint), "--db", str(db),
             "--host", "127.0.0.1", "--port", str(self.port), "--device", "cpu", *extra],
            cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.cwd = cwd
        deadline = time.monotonic() + 120
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"server did not answer /health within 120 s:\n{self.output()}")
            time.sleep(0.25)

    def output(self) -> str:
        if not self.log.closed:
            self.log.flush()
        return (self.cwd / "server.log").read_text(errors="replace")[-4000:]

    def worker_pids(self) -> list[int]:
        """The uvicorn worker processes of ``--workers N`` (children started by multiprocessing's spawn)."""
        pids = []
        for task in Path(f"/proc/{self.proc.pid}/task").iterdir():
            for pid in (task / "children").read_text().split():
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
                if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
                    pids.append(int(pid))
        return pids

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()


@pytest.fixture
def server_factory(checkpoint: Path, tmp_path: Path):
    started: list[Server] = []

    def start(db: Path | str | None = None, **kw) -> Server:
        s = Server(checkpoint, db or tmp_path / "studies.db", tmp_path, **kw)
        started.append(s)
        return s

    yield start
    for s in started:
        s.stop()
