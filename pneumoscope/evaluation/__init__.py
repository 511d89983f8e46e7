"""Evaluation: metrics with bootstrap CIs and thresholds (metrics.py), calibration (calibration.py), report files
and plots (report.py), and ``evaluate`` of a checkpoint on a labelled folder or its own validation split."""
from pneumoscope._lazy import lazy_api

__all__ = ["evaluate", "binary_metrics", "bootstrap_ci", "choose_threshold", "fit_calibration_and_threshold"]
__getattr__, __dir__ = lazy_api(__name__, {
    "evaluate": "evaluate", "binary_metrics": "metrics", "bootstrap_ci": "metrics", "choose_threshold": "metrics",
    "fit_calibration_and_threshold": "calibration",
})
