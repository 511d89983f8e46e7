"""The clinic service: ``create_app`` (app.py: routes), the model thread (worker.py), upload decoding (uploads.py),
API key and body limits (security.py), the structured report (study_report.py) and the web viewer (static/); the
study database is its own room (studydb/), shared with the DICOM node. ``pneumoscope serve`` runs it with uvicorn
(cli/serve.py)."""
from pneumoscope._lazy import lazy_api

__all__ = ["create_app", "build_report"]
__getattr__, __dir__ = lazy_api(__name__, {"create_app": "app", "build_report": "study_report"})
