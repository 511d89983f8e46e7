"""Where the study database lives and which schema version it is at.

``--db`` is a path (SQLite, the default: WAL, ``synchronous=FULL``, foreign keys on, set on every new connection)
or a SQLAlchemy URL (``postgresql+psycopg://user@host:port/name``). ``engine_for`` checks a path before anything
opens it, so a missing folder or a file that is not a database is a ``ConfigError`` naming the path and the fix.

The schema is the Alembic revisions in ``migrations/versions`` (``0001_initial``, ``0002_study_filename``, ...),
run programmatically by ``migrate`` (from ``StudyDB.__init__`` and ``pneumoscope db migrate``; no alembic.ini).
The version of a database is the number of its revision (``0002`` -> 2); one newer than the code is refused.
"""
from __future__ import annotations

from pathlib import Path

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool

from pneumoscope.errors import ConfigError

MIGRATIONS = Path(__file__).with_name("migrations")
SQLITE_HEADER = b"SQLite format 3\x00"
_PG_MIGRATION_LOCK = 0x706E6575  # pg_advisory_lock key: one migrating process at a time


def is_url(db: str | Path) -> bool:
    return "://" in str(db)


def describe(db: str | Path) -> str:
    """``db`` for messages and logs: a URL without its password."""
    if not is_url(db):
        return str(db)
    try:
        return make_url(str(db)).render_as_string(hide_password=True)
    except ArgumentError:
        return "(an invalid URL)"


def engine_for(db: str | Path) -> Engine:
    """An engine on ``db`` (path or URL). Connections are not pooled: ``StudyDB`` keeps one per thread."""
    if is_url(db):
        try:
            url = make_url(str(db))
            if url.get_backend_name() == "sqlite":
                return engine_for(url.database or "")
            if url.drivername == "postgresql":  # SQLAlchemy's default driver is psycopg2; the serve extra has psycopg 3
                url = url.set(drivername="postgresql+psycopg")
            return create_engine(url, poolclass=NullPool)
        except (ArgumentError, ImportError) as e:
            raise ConfigError(f"study database URL {describe(db)}: {e}; pass a path (SQLite) or "
                              "postgresql+psycopg://user@host:port/name") from None
    path = Path(db)
    if not str(db) or not path.parent.is_dir():
        raise ConfigError(f"study database {path}: the folder {path.parent} does not exist; create it "
                          f"(mkdir -p {path.parent}) or pass another --db")
    if path.is_dir() or (path.is_file() and path.stat().st_size and _header(path) != SQLITE_HEADER):
        raise ConfigError(f"{path} is not a SQLite database; pass a new file name (it is created), an existing "
                          "pneumoscope study database, or a postgresql+psycopg:// URL as --db")
    engine = create_engine(f"sqlite:///{path}", poolclass=NullPool,
                           connect_args={"timeout": 30.0, "check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record) -> None:
        dbapi_conn.isolation_level = None  # the driver starts no transaction of its own: BEGIN below, DDL included
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=FULL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.close()

    @event.listens_for(engine, "begin")
    def _begin(conn: Connection) -> None:
        # writers take SQLite's write lock at BEGIN (no deadlock on a read -> write upgrade); readers do not
        conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.info.pop("immediate", False) else "BEGIN")

    return engine


def _header(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(16)


def _config(script_location: str | Path | None):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(script_location or MIGRATIONS))
    return cfg


def version_number(revision: str | None) -> int:
    return int(revision) if revision else 0


def revisions(script_location: str | Path | None = None) -> list[str]:
    """The revision ids, oldest first (``["0001", "0002", ...]``)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(_config(script_location))
    return [s.revision for s in reversed(list(script.walk_revisions()))]


def current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    try:
        return MigrationContext.configure(conn).get_current_revision()
    finally:
        conn.rollback()


def migrate(engine: Engine, script_location: str | Path | None = None) -> int:
    """Apply the pending revisions (each in its own transaction); return the version the database is at."""
    from alembic import command

    cfg = _config(script_location)
    known = revisions(script_location)
    with engine.connect() as conn:
        pg = engine.dialect.name == "postgresql"
        if pg:  # several `serve --workers` processes start together: one migrates, the others then find it done
            conn.exec_driver_sql(f"SELECT pg_advisory_lock({_PG_MIGRATION_LOCK})")
            conn.commit()
        try:
            current = current_revision(conn)
            if current is not None and current not in known:
                raise RuntimeError(f"database is at schema version {version_number(current)}, newer than this "
                                   f"pneumoscope ({version_number(known[-1] if known else None)}): upgrade pneumoscope")
            if current != (known[-1] if known else None):
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
                conn.commit()
            return version_number(current_revision(conn))
        finally:
            if pg:
                conn.rollback()
                conn.exec_driver_sql(f"SELECT pg_advisory_unlock({_PG_MIGRATION_LOCK})")
                conn.commit()
