"""Inference: the runtime (runtime.py: device and precision, normalisation, logits -> probability, the ONE place),
``Predictor`` (predictor.py), ``load`` (loader.py: checkpoint, ONNX or the bundled default model), ONNX export and
the ONNX Runtime backend (onnx.py), the embedding OOD reference (embedding.py), the bundled model (default_model.py)."""
from pneumoscope._lazy import lazy_api

__all__ = ["load", "Predictor", "pneumonia_score", "default_checkpoint", "export_onnx"]
__getattr__, __dir__ = lazy_api(__name__, {
    "load": "loader", "Predictor": "predictor", "pneumonia_score": "runtime", "default_checkpoint": "default_model",
    "export_onnx": "onnx",
})
