"""``pneumoscope serve`` (the clinic service: serve/app.py; ``--workers N``: serve/factory.py) and
``pneumoscope db migrate|export`` (serve/schema.py, serve/db.py)."""
from __future__ import annotations

import argparse
import logging
import os

from pneumoscope.cli.options import check_port_free
from pneumoscope.errors import ConfigError

log = logging.getLogger("pneumoscope")

API_KEY_ENV = "PNEUMOSCOPE_API_KEY"
SALT_ENV = "PNEUMOSCOPE_PSEUDONYM_SALT"
DB_HELP = "study database: a SQLite file path, or a URL such as postgresql+psycopg://user@host:5432/name"


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pneumoscope.studydb.schema import engine_for

    check_port_free(args.host, args.port)  # before the model loads and the database is created
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    salt = None
    if args.pseudonymize:
        salt = os.environ.get(SALT_ENV, "")
        if len(salt) < 16:
            raise ConfigError(f"--pseudonymize needs a secret salt of at least 16 characters in ${SALT_ENV} "
                              "(keep it: the same salt maps the same patient to the same pseudonym)")
    if api_key is None and args.host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("serving on %s without an API key: anyone on the network can read the studies; "
                    "set $%s", args.host, API_KEY_ENV)
    engine_for(args.db).dispose()  # a missing folder, a file that is no database: said now, before the model loads
    max_upload = int(args.max_upload_mb * 2**20)
    # several workers: each model gets its share of the cores this process may use (two workers of 2 threads on 2
    # cores: p99 811 vs 602 ms with 1 thread each, docs/service.md); one worker: ONNX Runtime's own default (0)
    if not args.threads and args.workers > 1:
        args.threads = max(1, len(os.sched_getaffinity(0)) // args.workers)
    if args.workers <= 1:
        from pneumoscope.serve.app import create_app

        app = create_app(args.checkpoint, args.db, api_key=api_key, pseudonymize_salt=salt,
                         max_upload_bytes=max_upload, device=args.device, threads=args.threads)
        uvicorn.run(app, host=args.host, port=args.port, log_level="info", limit_concurrency=args.max_connections)
        return 0
    _serve_workers(args, api_key, max_upload, uvicorn)
    return 0


def _serve_workers(args: argparse.Namespace, api_key: str | None, max_upload: int, uvicorn) -> None:
    """N uvicorn worker processes, each building the app with serve/factory.py (one model load per worker)."""
    from pathlib import Path

    from pneumoscope.errors import CheckpointError
    from pneumoscope.serve.factory import SETTINGS_ENV, settings_json
    from pneumoscope.studydb.db import StudyDB

    if args.checkpoint and not Path(args.checkpoint).is_file():
        raise CheckpointError(f"checkpoint {args.checkpoint} not found: pass the best.pt of a run, or no "
                              "--checkpoint for the bundled model")
    StudyDB(args.db).close()  # check --db and migrate once, before the workers start
    os.environ[SETTINGS_ENV] = settings_json(args.checkpoint, args.db, args.pseudonymize, max_upload, args.device,
                                                 args.threads)
    if api_key:
        os.environ[API_KEY_ENV] = api_key
    # the workers share the cores: without a setting of the operator's, each gets its share of torch threads
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.workers)))
    log.info("starting %d worker processes", args.workers)
    uvicorn.run("pneumoscope.serve.factory:app_from_env", factory=True, workers=args.workers, host=args.host,
                port=args.port, log_level="info", limit_concurrency=args.max_connections)


def register(sub) -> None:
    s = sub.add_parser("serve", help="the clinic web service and viewer (FastAPI + uvicorn)")
    s.add_argument("--checkpoint", help="best.pt of a run (default: the bundled model)")
    s.add_argument("--db", default="pneumoscope-studies.db", help=DB_HELP + " (created and migrated when missing)")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--api-key", help=f"require this X-API-Key header (default ${API_KEY_ENV}; prefer the variable, "
                                     "a flag is visible in the process list)")
    s.add_argument("--pseudonymize", action="store_true",
                   help=f"store a keyed SHA-256 of DICOM PatientID and StudyInstanceUID (secret salt in ${SALT_ENV})")
    s.add_argument("--max-upload-mb", type=float, default=20.0, help="request body limit in MiB (default 20)")
    s.add_argument("--max-connections", type=int, default=100, help="answer 503 beyond this many (default 100)")
    s.add_argument("--device", default="auto")
    s.add_argument("--workers", type=int, default=1,
                   help="worker processes, each with its own copy of the model (default 1); they share --db")
    s.add_argument("--threads", type=int, default=0,
                   help="ONNX Runtime threads of each worker's model (default 0: the cores divided among the workers)")
    s.set_defaults(func=_serve)
    _register_db(sub)


def _db_export(args: argparse.Namespace) -> int:
    from pneumoscope.studydb.db import export_csv

    for p in export_csv(args.db, args.out):
        log.info("wrote %s", p)
    return 0


def _db_migrate(args: argparse.Namespace) -> int:
    from pneumoscope.studydb.db import StudyDB

    db = StudyDB(args.db)
    log.info("study database %s is at schema version %d", db.path, db.version)
    db.close()
    return 0


def _register_db(sub) -> None:
    db = sub.add_parser("db", help="the study database of `pneumoscope serve`")
    actions = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    m = actions.add_parser("migrate", help="create the database or bring it to this version's schema (Alembic)")
    m.add_argument("--db", required=True, help=DB_HELP)
    m.set_defaults(func=_db_migrate)
    s = actions.add_parser("export", help="one CSV file per table (images are left in the database)")
    s.add_argument("--db", required=True, help="the --db of `pneumoscope serve` (path or URL)")
    s.add_argument("--format", default="csv", choices=["csv"])
    s.add_argument("--out", required=True, help="folder for patients.csv, studies.csv, predictions.csv, reviews.csv")
    s.set_defaults(func=_db_export)
