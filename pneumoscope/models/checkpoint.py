"""Checkpoints that rebuild their own model and preprocessing, written atomically, loaded safely.

A checkpoint is a plain dict (``torch.load(weights_only=True)`` can read it: no pickled code):
``arch`` (for ``models.rebuild``), ``preprocess``, ``label_names``, ``state_dict``, ``threshold`` and how it was
chosen, ``temperature`` (calibration), ``metrics``, ``config``, ``epoch``; ``last.pt`` also holds ``train_state``
(optimizer, scheduler, history, early-stopping counters) so ``--resume`` continues exactly.
"""
from __future__ import annotations

import os
import pickle
import zipfile
from pathlib import Path

import torch

from pneumoscope import __version__
from pneumoscope.errors import CheckpointError
from pneumoscope.models.preprocess import Preprocess
from pneumoscope.models.registry import rebuild

FORMAT = "pneumoscope-checkpoint"
FORMAT_VERSION = 1
REQUIRED = ("arch", "preprocess", "label_names", "state_dict")
# What torch.load(weights_only=True) raises on a file that is not a pneumoscope checkpoint, found by trying: zero
# bytes (EOFError), random bytes (UnpicklingError, IndexError 'pop from empty list', KeyError, UnicodeDecodeError),
# text (KeyError), a zip that is not torch's and a truncated checkpoint (RuntimeError), a pickled nn.Module
# (UnpicklingError with advice to weaken the safe loader: never passed on).
LOAD_ERRORS = (pickle.UnpicklingError, EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError,
               AttributeError, OSError, zipfile.BadZipFile, MemoryError)


def _not_a_checkpoint(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"{path} is not a pneumoscope checkpoint (expected a file written by pneumoscope train, with keys "
        f"{', '.join(REQUIRED)}): {why}; pass the best.pt of a training run, or leave --checkpoint out to use the "
        "bundled model")


def save_checkpoint(payload: dict, path: str | Path) -> Path:
    """Write to a temporary file in the same folder, fsync, then rename: a crash never leaves half a checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    data = {"format": FORMAT, "format_version": FORMAT_VERSION, "pneumoscope_version": __version__, **payload}
    with open(tmp, "wb") as f:
        torch.save(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} not found: pass the best.pt of a training run "
                              "(pneumoscope train --out RUN_DIR)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except LOAD_ERRORS as e:  # torch's message may suggest weights_only=False or safe globals: never repeated
        why = "the file is empty" if path.stat().st_size == 0 else (
            "the file is truncated (its zip directory is missing)" if "central directory" in str(e) else
            "it is not a torch file of tensors (pickled code, or other bytes)" if isinstance(e, pickle.UnpicklingError) else
            f"it cannot be read as a torch file ({type(e).__name__})")
        raise _not_a_checkpoint(path, why) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise _not_a_checkpoint(path, f"it holds a {type(ckpt).__name__}" + (
            f" with keys {sorted(map(str, ckpt))[:8]}" if isinstance(ckpt, dict) else "")
            + f", without the '{FORMAT}' format tag")
    if ckpt.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has checkpoint format {ckpt['format_version']}; this pneumoscope reads up to "
                              f"{FORMAT_VERSION}: upgrade pneumoscope")
    missing = [k for k in REQUIRED if k not in ckpt]
    if missing:
        raise _not_a_checkpoint(path, f"it lacks {missing}")
    return ckpt


def model_from_checkpoint(ckpt: dict) -> torch.nn.Module:
    """Rebuild the architecture from ``arch``, load the weights (fp16 weights are cast back to fp32) and give it the
    checkpoint's own preprocessing (``preprocess``: input size, normalisation and intensity standardisation), so no
    caller patches it."""
    model = rebuild(ckpt["arch"])
    model.preprocess = Preprocess.from_dict(ckpt["preprocess"])
    state = {k: (v.float() if torch.is_floating_point(v) else v) for k, v in ckpt["state_dict"].items()}
    model.load_state_dict(state)
    return model.eval()
