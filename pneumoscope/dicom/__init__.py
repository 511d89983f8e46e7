"""DICOM networking: the Storage SCP that predicts every received radiograph (listen.py) and the derived
objects it sends back, a Comprehensive SR and a Grad-CAM Secondary Capture (results.py). See docs/dicom.md."""
from pneumoscope._lazy import lazy_api

__all__ = ["Listener", "result_datasets"]
__getattr__, __dir__ = lazy_api(__name__, {"Listener": "listen", "result_datasets": "results"})
