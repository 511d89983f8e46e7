"""The clinic service: ``create_app`` (app.py: routes), the model thread (worker.py), upload decoding (uploads.py),
API key and body limits (security.py), the study database (db.py), the structured report (study_report.py) and
the web viewer (static/). ``pneumoscope serve`` runs it with uvicorn (cli/serve.py)."""
from pneumoscope._lazy import lazy_api

__all__ = ["create_app", "StudyDB", "build_report"]
__getattr__, __dir__ = lazy_api(__name__, {"create_app": "app", "StudyDB": "db", "build_report": "study_report"})
