"""How a model sees an image and what its output means: the one place for device and precision picks, input
normalisation, batched logits and the logits -> probability formula. Training, prediction, evaluation, the
explanations and the service all use these, so they cannot drift apart."""
from __future__ import annotations

import contextlib
import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch

from pneumoscope.errors import ConfigError

log = logging.getLogger(__name__)


def onnx_cache_dir() -> Path:
    """Where models exported for ONNX Runtime are kept: ``$PNEUMOSCOPE_CACHE/onnx`` or ``~/.cache/pneumoscope/onnx``."""
    return Path(os.environ.get("PNEUMOSCOPE_CACHE") or Path.home() / ".cache" / "pneumoscope") / "onnx"


@contextlib.contextmanager
def quiet_exporter():
    """The ONNX exporter's own lines (graph passes, initializer names, missing torchvision) kept out of the log."""
    names = ("onnx_ir", "onnxscript", "torch.onnx", "torch.export")
    levels = {n: logging.getLogger(n).level for n in names}
    for n in names:
        logging.getLogger(n).setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        for n, level in levels.items():
            logging.getLogger(n).setLevel(level)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"config value device={name!r} is invalid: no CUDA device is visible; use --device cpu or auto")
    return torch.device(name)


def cpu_has_bf16() -> bool:
    """True when the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX): there bf16 autocast is fast."""
    f = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
    g = getattr(torch.cpu, "_is_amx_tile_supported", None)
    return bool((f and f()) or (g and g()))


def pick_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None = plain fp32), logging why when 'auto' falls back."""
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "fp16" or (precision == "auto" and not torch.cuda.is_bf16_supported()):
            return torch.float16
        return torch.bfloat16
    if precision == "fp16":
        raise ConfigError("config value precision='fp16' is invalid on CPU: use bf16 or fp32")
    if precision == "auto" and not cpu_has_bf16():
        log.info("precision: fp32 (this CPU has no AVX512-BF16/AMX; bf16 autocast would be emulated and slower)")
        return None
    return torch.bfloat16


def to_input(xb: torch.Tensor, pre, device: torch.device) -> torch.Tensor:
    """uint8 (B,1,S,S) -> normalised float on ``device``, channels_last. The one preprocessing of the project."""
    x = xb.to(device, non_blocking=True).float().div_(255)
    return normalize(x, pre)


def normalize(x: torch.Tensor, pre) -> torch.Tensor:
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def pneumonia_score(logits: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """Probability of pneumonia: sigmoid(logit / T + bias) (binary) or 1 - softmax(logits / T)[NORMAL] (ternary)."""
    logits = np.asarray(logits, dtype=np.float64) / (temperature or 1.0)
    if logits.shape[1] == 1:
        return 0.5 * (1.0 + np.tanh(0.5 * (logits[:, 0] + (bias or 0.0))))  # the sigmoid, overflow-free
    return 1.0 - softmax(logits)[:, 0]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax of (N, K) logits."""
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


@torch.no_grad()
def predict_logits(model: torch.nn.Module, x: torch.Tensor, pre, device: torch.device, amp: torch.dtype | None,
                   batch_size: int = 16) -> np.ndarray:
    """Logits (N, K) of uint8 images ``x`` (N, 1, S, S) in eval mode, in batches, under ``amp`` autocast."""
    model.eval()
    out = []
    for i in range(0, len(x), batch_size):
        with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
            out.append(model(to_input(x[i:i + batch_size], pre, device)).float().cpu())
    return torch.cat(out).numpy()
