"""Build the bundled default model: train with pneumoscope/resources/default_model.yaml, then pack best.pt as fp16 (< 10 MB)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from pneumoscope.checkpoint import file_sha256, load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

MAX_BYTES = 10 * 1024 * 1024
DEFAULT_CONFIG = Path(__file__).resolve().parent / "resources" / "default_model.yaml"


def pack(checkpoint: str | Path, dest: str | Path, extra: dict | None = None) -> Path:
    """Copy a checkpoint without training state, weights in fp16 (``extra`` keys added). Predictions run in fp32."""
    ck = load_checkpoint(checkpoint)
    ck.update(extra or {})
    ck.pop("train_state", None)
    ck["state_dict"] = {k: (v.half() if torch.is_floating_point(v) else v) for k, v in ck["state_dict"].items()}
    ck["packed_from"] = {"path": str(checkpoint), "sha256": file_sha256(checkpoint)}
    ck.pop("format", None)
    ck.pop("format_version", None)
    ck.pop("pneumoscope_version", None)
    dest = save_checkpoint(ck, dest)
    size = dest.stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"packed model {dest} is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit")
    log.info("packed %s -> %s (%.1f MB)", checkpoint, dest, size / 1e6)
    return dest


def build(data: str | Path, out: str | Path = "runs/default_model", config: str | Path | None = None,
          dest: str | Path | None = None) -> dict:
    """Train the default model on ``data`` and pack it into the package resources."""
    from pneumoscope.predict import DEFAULT_MODEL
    from pneumoscope.train import train

    metrics = train(str(config or DEFAULT_CONFIG), data=str(data), out=str(out))
    from pneumoscope.ood import reference_for_checkpoint

    target = Path(dest) if dest else Path(__file__).resolve().parent / "resources" / DEFAULT_MODEL
    best = Path(metrics["run_dir"]) / "best.pt"
    # embedding-space out-of-distribution reference, fitted on (up to 2,000) of the model's own training images
    ref = reference_for_checkpoint(best, data, limit=2000)
    pack(best, target, extra={"ood_reference": ref.to_dict()})
    metrics["packed"] = str(target)
    return metrics
