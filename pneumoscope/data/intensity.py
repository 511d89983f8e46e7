"""Intensity standardisation of uint8 images at the model input size (after decode/resize, before normalisation).

One function, ``standardise(images_u8, method)``, reached through ``Preprocess.standardise`` by training (train and
val arrays), ``inference.predictor.Predictor``, the ONNX backend and Grad-CAM, so all of them see the same pixels.
Methods:

- ``none``: unchanged (the default; checkpoints made before this field existed load as ``none``);
- ``equalize``: global histogram equalisation (``skimage.exposure.equalize_hist``, 256 bins);
- ``clahe``: contrast-limited adaptive histogram equalisation (``skimage.exposure.equalize_adapthist``,
  clip_limit ``CLAHE_CLIP``, kernel 1/8 of the side: scikit-image's default).

Each image is standardised on its own (no batch statistics), so the result does not depend on the batch.
"""
from __future__ import annotations

import numpy as np

METHODS = ("none", "equalize", "clahe")
CLAHE_CLIP = 0.015


def _one(img: np.ndarray, method: str) -> np.ndarray:
    # scikit-image takes ~0.5 s to import: loaded when an image is first standardised, not when the config (and
    # so the CLI) reads METHODS from this module
    from skimage import exposure

    if img.min() == img.max():  # a blank image: nothing to equalise (equalize_hist would divide by zero)
        return img.copy()
    f = img.astype(np.float64) / 255.0
    if method == "equalize":
        out = exposure.equalize_hist(f, nbins=256)
    else:
        out = exposure.equalize_adapthist(f, clip_limit=CLAHE_CLIP)
    return np.clip(np.rint(out * 255.0), 0, 255).astype(np.uint8)


def standardise(images_u8: np.ndarray, method: str) -> np.ndarray:
    """uint8 (N, H, W) or (N, 1, H, W) -> the same shape and dtype, each image standardised by ``method``."""
    if method not in METHODS:
        raise ValueError(f"unknown intensity method {method!r}; choose one of {', '.join(METHODS)}")
    x = np.asarray(images_u8)
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[1] != 1):
        raise ValueError(f"standardise needs uint8 (N, H, W) or (N, 1, H, W), got {x.dtype} {x.shape}")
    if method == "none":
        return x
    flat = x.reshape(-1, *x.shape[-2:])
    out = np.stack([_one(img, method) for img in flat]) if len(flat) else flat.copy()
    return out.reshape(x.shape)
