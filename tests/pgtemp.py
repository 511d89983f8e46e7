"""A throw-away PostgreSQL server, for the tests and ``benchmarks/service_load.py``: ``initdb`` in a temporary
folder, ``pg_ctl start`` on a free port of 127.0.0.1 (its socket in the same folder, trust authentication for the
user ``pneumoscope``, nothing outside this machine can reach it), one fresh database per ``create_database()``;
``stop()`` stops the server and removes the folder. Run as root, the server runs as the ``postgres`` user
(``initdb`` refuses root). Needs Debian's ``postgresql`` (binaries under /usr/lib/postgresql/*/bin).

    with TempPostgres() as pg:
        url = pg.create_database()   # postgresql+psycopg://pneumoscope@127.0.0.1:PORT/pneumoscope_1
"""
from __future__ import annotations

import glob
import itertools
import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

PROGRAMS = ("initdb", "pg_ctl", "postgres")
USER = "pneumoscope"


def find_program(name: str) -> Path | None:
    """``name`` from the newest /usr/lib/postgresql/*/bin, else from $PATH; None when absent."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(Path(d).parent.name)
                  if Path(d).parent.name.isdigit() else 0, reverse=True)
    for d in dirs:
        if (Path(d) / name).is_file():
            return Path(d) / name
    found = shutil.which(name)
    return Path(found) if found else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TempPostgres:
    def __init__(self, max_connections: int = 300) -> None:
        missing = [p for p in PROGRAMS if find_program(p) is None]
        if missing:
            raise FileNotFoundError(f"PostgreSQL programs not found: {', '.join(missing)}; sudo apt-get install "
                                    "postgresql, or bash scripts/install-system-deps.sh")
        self.bindir = find_program("pg_ctl").parent
        self.dir = Path(tempfile.mkdtemp(prefix="pneumoscope-pg-"))
        self.data = self.dir / "data"
        self.port = _free_port()
        self._prefix: list[str] = []
        self._names = itertools.count(1)
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._prefix = ["runuser", "-u", "postgres", "--"]
        try:
            self._run("initdb", "-D", self.data, "-U", USER, "--auth=trust", "-E", "UTF8", "--no-sync")
            opts = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                    f"-c max_connections={max_connections}")
            self._run("pg_ctl", "-D", self.data, "-l", self.dir / "server.log", "-w", "-t", "60", "-o", opts, "start")
        except BaseException:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise

    def _run(self, program: str, *args) -> None:
        cmd = [*self._prefix, str(self.bindir / program), *map(str, args)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=self.dir)
        if r.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout}{r.stderr}{tail}")

    def url(self, database: str) -> str:
        return f"postgresql+psycopg://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str | None = None) -> str:
        """A new empty database; its SQLAlchemy URL."""
        import psycopg

        name = name or f"pneumoscope_{next(self._names)}"
        with psycopg.connect(host="127.0.0.1", port=self.port, user=USER, dbname="postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        if self.dir.exists():
            try:
                self._run("pg_ctl", "-D", self.data, "-m", "fast", "-w", "stop")
            finally:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> TempPostgres:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
