"""The images of a training run as tensors: uint8 (N, 1, S, S) at the model's input size, and their labels."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pneumoscope.config import TrainConfig
from pneumoscope.data.cache import Decoded
from pneumoscope.data.folders import Sample
from pneumoscope.data.splits import decode_samples
from pneumoscope.errors import DatasetLayoutError


@dataclass
class Arrays:
    x: torch.Tensor  # (N, 1, S, S) uint8
    y: torch.Tensor  # (N,) int64
    samples: list[Sample]


def decode(samples: list[Sample], size: int, cfg: TrainConfig, show: bool) -> Arrays:
    return to_arrays(decode_samples(samples, size, cfg, show), samples, cfg)


def to_arrays(d: Decoded, samples: list[Sample], cfg: TrainConfig) -> Arrays:
    """Decoded images of ``samples`` as tensors, unreadable files left out (decode_all has listed them)."""
    keep = np.flatnonzero(d.ok)
    if len(keep) == 0:
        raise DatasetLayoutError(f"{cfg.data}: none of the {len(samples)} images could be decoded")
    images = d.images if len(keep) == len(samples) else d.images[keep]  # no 100 MB copy when every file decoded
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.tensor([samples[i].label for i in keep], dtype=torch.int64)
    return Arrays(x=x, y=y, samples=[samples[i] for i in keep])
