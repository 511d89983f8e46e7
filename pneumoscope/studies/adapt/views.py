"""What the strategies and the confounding check read of each film, computed once per film by the models' own
code: a trunk's features exactly as ``FeatureHead`` computes them, the frozen part of a partial fine-tune, and
"style" features that describe how a film was taken rather than what it shows."""
from __future__ import annotations

import numpy as np
import torch

from pneumoscope.inference.features import features as ood_features
from pneumoscope.inference.runtime import to_input
from pneumoscope.models.efficientnet import forward_until
from pneumoscope.models.feature_head import Trunk

BATCH = 32
HIST_BINS = 32


@torch.inference_mode()
def run_batches(fn, images_u8: np.ndarray, preprocess, batch: int = BATCH) -> np.ndarray:
    """``fn(normalised input)`` over uint8 images (N, S, S) at the model's input size, in batches, as float32."""
    x = torch.from_numpy(np.ascontiguousarray(preprocess.standardise(images_u8))).unsqueeze(1)
    dev = torch.device("cpu")
    return torch.cat([fn(to_input(x[i:i + batch], preprocess, dev)).float() for i in range(0, len(x), batch)]).numpy()


def trunk_features(model: torch.nn.Module, images_u8: np.ndarray, kind: str) -> np.ndarray:
    """(N, D) features of a registry model's backbone, ``kind`` "pooled" or "block_stats" (models/feature_head.py)."""
    trunk = Trunk(model.backbone, kind).eval()
    return run_batches(trunk, images_u8, model.preprocess)


def cut_features(model: torch.nn.Module, images_u8: np.ndarray, stop: int) -> np.ndarray:
    """(N, C, h, w) output of the stem and the first ``stop`` blocks: the frozen part of a partial fine-tune,
    computed once instead of in every epoch of every fold."""
    model.eval()
    return run_batches(lambda x: forward_until(model.backbone, x, stop), images_u8, model.preprocess)


def style_features(images_u8: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Features with no notion of anatomy, one row per film:

    - ``histogram``: the 32-bin intensity histogram of the film at the model's input size (exposure, windowing,
      burnt-in borders; no spatial information at all);
    - ``texture``: the ImageNet block statistics of the out-of-distribution check (inference/features.py: channel
      mean and std of three blocks at 128 px: texture, noise, sharpness, scale);
    - ``size``: the original height and width in pixels (device, detector, export).
    """
    hist = np.stack([np.bincount(im.ravel() >> 3, minlength=HIST_BINS) for im in images_u8]).astype(np.float32)
    hist /= hist.sum(1, keepdims=True)
    return {"histogram": hist, "texture": ood_features(images_u8), "size": np.asarray(sizes, dtype=np.float32)}
