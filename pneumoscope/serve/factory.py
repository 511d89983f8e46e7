"""``pneumoscope serve --workers N``: uvicorn starts N processes and each calls ``app_from_env`` (an app factory,
``uvicorn pneumoscope.serve.factory:app_from_env --factory``), so each worker loads the model once and opens its
own connections to the shared study database. The settings travel in ``$PNEUMOSCOPE_SERVE_SETTINGS`` (JSON); the
API key and the pseudonym salt stay in their own variables ($PNEUMOSCOPE_API_KEY, $PNEUMOSCOPE_PSEUDONYM_SALT)."""
from __future__ import annotations

import json
import os

SETTINGS_ENV = "PNEUMOSCOPE_SERVE_SETTINGS"
API_KEY_ENV = "PNEUMOSCOPE_API_KEY"
SALT_ENV = "PNEUMOSCOPE_PSEUDONYM_SALT"


def settings_json(checkpoint: str | None, db: str, pseudonymize: bool, max_upload_bytes: int, device: str,
                  threads: int = 0) -> str:
    return json.dumps({"checkpoint": checkpoint, "db": str(db), "pseudonymize": pseudonymize,
                       "max_upload_bytes": max_upload_bytes, "device": device, "threads": threads})


def app_from_env():
    """The FastAPI app of one worker, from the environment ``pneumoscope serve`` set."""
    from pneumoscope.serve.app import create_app

    s = json.loads(os.environ[SETTINGS_ENV])
    return create_app(s["checkpoint"], s["db"], api_key=os.environ.get(API_KEY_ENV) or None,
                      pseudonymize_salt=os.environ.get(SALT_ENV) if s["pseudonymize"] else None,
                      max_upload_bytes=s["max_upload_bytes"], device=s["device"],
                      threads=int(s.get("threads", 0)))
