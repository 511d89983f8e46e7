"""Test-time augmentation that travels with a model (issue 23). A checkpoint's ``tta`` config key names extra views
of the uint8 model input; the model scores the image and each view and the logits are averaged. The same function
serves training's validation (so the stored calibration, threshold and best epoch are those of the averaged logits),
``Predictor.logits`` on either backend, and exported ONNX models (their metadata carries the views).

Measured on r9's recipe out-of-fold over all 5,216 training films (docs/selection.md, ``scripts/tta_oof.py``): the
90 % centre crop as a second view raised AUC by +0.0023 [+0.0016, +0.0030] (paired, patient bootstrap) and the
shifted-copy AUC alike; a 4 % shift added +0.0006. Inside an ensemble the members' views are not used.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F

from pneumoscope.config import TTA_VIEWS, parse_tta


def centre_crop(u8, keep: float = 0.9):
    """The central ``keep`` of each side of uint8 images (..., S, S), resized back to S (bilinear, antialiased) and
    rounded: a numpy array or a tensor in, the same kind out."""
    t = torch.as_tensor(u8)
    s = t.shape[-1]
    c = int(round(s * (1 - keep) / 2))
    flat = t.reshape(-1, 1, *t.shape[-2:])[..., c:s - c, c:s - c].float()
    out = F.interpolate(flat, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
    out = out.round_().clamp_(0, 255).to(torch.uint8).reshape(t.shape)
    return out.numpy() if isinstance(u8, np.ndarray) else out


VIEWS: dict[str, Callable] = {"crop90": centre_crop}
if set(VIEWS) != set(TTA_VIEWS):  # config.py holds the torch-free copy of the names
    raise ImportError(f"config.TTA_VIEWS lists {TTA_VIEWS} but inference/tta.py defines {sorted(VIEWS)}")
parse_views = parse_tta


def averaged(logits_of: Callable, u8, views: tuple[str, ...]) -> np.ndarray:
    """The mean of ``logits_of`` over the images and each view of them (``logits_of`` alone when no view)."""
    out = logits_of(u8)
    if not views:
        return out
    return np.mean([out, *[logits_of(VIEWS[v](u8)) for v in views]], axis=0).astype(np.float32)
