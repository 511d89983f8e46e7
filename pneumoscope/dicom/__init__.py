"""DICOM networking: the shared ``Pipeline`` and the Storage SCP that predicts every received radiograph
(listen.py), the derived objects sent back, a Comprehensive SR and a Grad-CAM Secondary Capture (results.py), and
the idempotent DICOMweb pass over an archive (sync.py). See docs/dicom.md."""
from pneumoscope._lazy import lazy_api

__all__ = ["Listener", "Pipeline", "result_datasets"]
__getattr__, __dir__ = lazy_api(__name__, {"Listener": "listen", "Pipeline": "listen", "result_datasets": "results"})
