"""The training objective: class-weighted (or plain) binary / multi-class cross-entropy with label smoothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pneumoscope.config import TrainConfig
from pneumoscope.errors import DatasetLayoutError


def make_loss(cfg: TrainConfig, y_train: torch.Tensor, n_classes: int, device: torch.device):
    counts = torch.bincount(y_train, minlength=n_classes).float()
    if (counts == 0).any():
        raise DatasetLayoutError(f"training split lacks a class (counts per class: {counts.tolist()})")
    ls = cfg.label_smoothing
    if n_classes == 2:
        pos_weight = (counts[0] / counts[1]).to(device) if cfg.imbalance == "weighted" else None

        def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            t = y.float() * (1 - ls) + 0.5 * ls
            return F.binary_cross_entropy_with_logits(logits[:, 0].float(), t, pos_weight=pos_weight)
    else:
        weight = (counts.sum() / (n_classes * counts)).to(device) if cfg.imbalance == "weighted" else None

        def loss_fn(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(logits.float(), y, weight=weight, label_smoothing=ls)
    return loss_fn
