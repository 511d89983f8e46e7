"""The study database, shared by the HTTP service (serve/) and the DICOM node (dicom/): SQLAlchemy Core reads and
writes (db.py), the engine of a path or URL and the Alembic migrations (schema.py, migrations/), and what is kept of
one image and its prediction (records.py). It knows nothing of HTTP or DICOM networking."""
from pneumoscope._lazy import lazy_api

__all__ = ["StudyDB", "export_csv", "upload_of", "prediction_record"]
__getattr__, __dir__ = lazy_api(__name__, {"StudyDB": "db", "export_csv": "db", "upload_of": "records",
                                           "prediction_record": "records"})
