"""Trust: Grad-CAM explanations (explain.py), the acquisition-shift study (shift.py), the out-of-distribution
reference of a checkpoint (ood.py) and the comparison of two image folders (data_compare.py)."""
from pneumoscope._lazy import lazy_api

__all__ = ["heatmaps", "explain", "shift_study", "reference_for_checkpoint", "data_compare"]
__getattr__, __dir__ = lazy_api(__name__, {
    "heatmaps": "explain", "explain": "explain", "shift_study": "shift", "reference_for_checkpoint": "ood",
    "data_compare": "data_compare",
})
