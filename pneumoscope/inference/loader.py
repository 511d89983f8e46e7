"""``load(checkpoint)``: a ``Predictor`` from a checkpoint (.pt), an exported ONNX model (.onnx), or ``None`` for
the bundled default model. Prediction runs in fp32 by default so probabilities are reproducible across machines."""
from __future__ import annotations

import logging
from importlib.util import find_spec
from pathlib import Path

import torch

from pneumoscope.config import parse_tta
from pneumoscope.data.digest import file_digest
from pneumoscope.errors import ConfigError
from pneumoscope.inference.default_model import default_checkpoint
from pneumoscope.inference.embedding import reference_from_dict
from pneumoscope.inference.onnx import cached_backend, load_onnx_predictor
from pneumoscope.inference.predictor import Predictor
from pneumoscope.inference.runtime import pick_device, pick_precision
from pneumoscope.models.checkpoint import load_checkpoint, model_from_checkpoint

log = logging.getLogger(__name__)


def load(checkpoint: str | Path | None = None, device: str = "auto", precision: str = "fp32",
         backend: str = "auto", threads: int = 0) -> Predictor:
    """A predictor from a checkpoint file (``None`` = the bundled default model).

    ``backend``: "auto" computes the logits with ONNX Runtime on the CPU (fp32) when it is installed and the model
    exports and agrees with PyTorch within 1e-4 (``onnx.cached_backend``: exported once per checkpoint, 5x faster
    for EfficientNet-Lite0 on the development CPU, docs/speed.md), else with PyTorch; "torch" always PyTorch. The
    PyTorch model is kept either way (Grad-CAM, embeddings). ``threads``: ONNX Runtime's intra-op threads for the
    model and the OOD features (0 = one per physical core; the service gives each worker its share)."""
    if backend not in ("auto", "torch"):
        raise ConfigError(f"backend={backend!r} is invalid: use auto or torch")
    path = Path(checkpoint) if checkpoint else default_checkpoint()
    if path.suffix.lower() == ".onnx":  # exported by pneumoscope export: preprocessing and threshold inside
        return load_onnx_predictor(path, threads)
    ckpt = load_checkpoint(path)
    dev = pick_device(device)
    model = model_from_checkpoint(ckpt).to(dev).to(memory_format=torch.channels_last)
    threshold = ckpt.get("threshold")
    if threshold is None:
        log.warning("%s stores no decision threshold; using 0.5", path)
        threshold = 0.5
    info = {
        "name": ckpt["arch"]["name"], "checkpoint": str(path), "version": ckpt.get("pneumoscope_version"),
        "checksum": "sha256:" + file_digest(path), "epoch": ckpt.get("epoch"),
        "threshold": float(threshold), "threshold_info": ckpt.get("threshold_info"),
        "temperature": ckpt.get("temperature"), "calibration_bias": ckpt.get("calibration_bias", 0.0),
        "label_names": list(ckpt["label_names"]),
        "val_operating_points": ckpt.get("val_operating_points"), "val_metrics": ckpt.get("metrics"),
        "val_prior": ckpt.get("val_prior"),
    }
    ood_reference = None
    if ckpt.get("ood_reference"):
        ood_reference = reference_from_dict(ckpt["ood_reference"])
    pre, amp = model.preprocess, pick_precision(precision, dev)
    tta = parse_tta((ckpt.get("config") or {}).get("tta", ""))
    runtime = None
    if backend == "auto" and dev.type == "cpu" and amp is None and find_spec("onnxruntime") is not None:
        runtime = cached_backend(model, pre, info["checksum"].removeprefix("sha256:")[:32], threads, views=tta)
    info["backend"] = "onnxruntime" if runtime is not None else "pytorch"
    return Predictor(model=model, preprocess=pre, ood_reference=ood_reference,
                     label_names=tuple(ckpt["label_names"]), threshold=float(threshold),
                     temperature=ckpt.get("temperature"), calibration_bias=float(ckpt.get("calibration_bias") or 0.0),
                     info=info, device=dev, amp=amp, backend=runtime, threads=threads, tta=tta)
