"""The model shipped inside the package (``resources/default_model.pt``, see MODEL_CARD.md): where it is, and
``pack`` (a checkpoint without training state, weights in fp16). ``studies/default_model.py`` builds it."""
from __future__ import annotations

import logging
from importlib.resources import files
from pathlib import Path

import torch

from pneumoscope.data.digest import file_digest
from pneumoscope.errors import CheckpointError
from pneumoscope.models.checkpoint import load_checkpoint, save_checkpoint

log = logging.getLogger(__name__)

MAX_BYTES = 25 * 1024 * 1024  # issue 13: an ensemble default may take up to 25 MB
DEFAULT_MODEL = "default_model.pt"
RESOURCES = Path(str(files("pneumoscope") / "resources"))
DEFAULT_CONFIG = RESOURCES / "default_model.yaml"


def default_checkpoint() -> Path:
    """The bundled default model's file (CheckpointError when the package was installed without it)."""
    p = RESOURCES / DEFAULT_MODEL
    if not p.is_file():
        raise CheckpointError(f"no bundled default model at {p}; pass --checkpoint RUN_DIR/best.pt")
    return p


def pack(checkpoint: str | Path, dest: str | Path, extra: dict | None = None) -> Path:
    """Copy a checkpoint without training state, weights in fp16 (``extra`` keys added). Predictions run in fp32."""
    ck = load_checkpoint(checkpoint)
    ck.update(extra or {})
    ck.pop("train_state", None)
    ck["state_dict"] = {k: (v.half() if torch.is_floating_point(v) else v) for k, v in ck["state_dict"].items()}
    ck["packed_from"] = {"path": str(checkpoint), "sha256": file_digest(checkpoint)}
    ck.pop("format", None)
    ck.pop("format_version", None)
    ck.pop("pneumoscope_version", None)
    dest = save_checkpoint(ck, dest)
    size = dest.stat().st_size
    if size > MAX_BYTES:
        raise ValueError(f"packed model {dest} is {size / 1e6:.1f} MB, over the {MAX_BYTES / 1e6:.0f} MB limit")
    log.info("packed %s -> %s (%.1f MB)", checkpoint, dest, size / 1e6)
    return dest
