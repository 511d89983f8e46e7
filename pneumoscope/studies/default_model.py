"""Build the bundled default model: train with ``resources/default_model.yaml``, fit its out-of-distribution
reference on its own training images, and pack best.pt as fp16 into the package (``inference/default_model.py``)."""
from __future__ import annotations

from pathlib import Path

from pneumoscope.inference.default_model import (
    DEFAULT_CONFIG,
    DEFAULT_MODEL,
    RESOURCES,
    pack,
)
from pneumoscope.training.loop import train
from pneumoscope.trust.ood import reference_for_checkpoint


def build(data: str | Path, out: str | Path = "runs/default_model", config: str | Path | None = None,
          dest: str | Path | None = None) -> dict:
    """Train the default model on ``data`` and pack it into the package resources."""

    metrics = train(str(config or DEFAULT_CONFIG), data=str(data), out=str(out))

    target = Path(dest) if dest else RESOURCES / DEFAULT_MODEL
    best = Path(metrics["run_dir"]) / "best.pt"
    # embedding-space out-of-distribution reference, fitted on (up to 2,000) of the model's own training images
    ref = reference_for_checkpoint(best, data, limit=2000)
    pack(best, target, extra={"ood_reference": ref.to_dict()})
    metrics["packed"] = str(target)
    return metrics
