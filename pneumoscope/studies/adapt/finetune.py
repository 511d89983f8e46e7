"""Partial fine-tuning of the base model on a site's films, optionally with replay of the base's own training
images so that it does not forget them (strategies c and d of ``pneumoscope adapt``).

The stem and all but the last ``TRAINED_BLOCKS`` MBConv blocks stay frozen (``cut_of``; for the Lite0 default of
issue 13, blocks 0..11, as its recipe ``trainable: last:5``; for a Lite2 base, blocks 0..16): their output
is computed once per film (``views.cut_features``), and only the last blocks, the conv head and the linear head
are trained, on those cached maps. The price: no pixel augmentation (a few hundred films, few epochs, weight
decay instead). The settings below were fixed before any site figure was seen; they are not tuned on the folds.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
import torch.nn.functional as F

from pneumoscope.models.efficientnet import forward_from

TRAINED_BLOCKS = 4  # the last 4 MBConv blocks + the conv head + the linear head are trained
EPOCHS = 10
BATCH = 32
LR = 3e-4
WEIGHT_DECAY = 0.05


def cut_of(model: torch.nn.Module) -> int:
    """The first trained block of an EfficientNet-Lite base (16 blocks for Lite0: 12; 21 for Lite1/2: 17)."""
    return len(model.backbone._blocks) - TRAINED_BLOCKS


def _logits(model: torch.nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.head(forward_from(model.backbone, h, cut_of(model)))[:, 0]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    b = model.backbone
    mods = [*b._blocks[cut_of(model):], b._conv_head, b._bn1, model.head]
    return [p for m in mods for p in m.parameters()]


def finetune(base: torch.nn.Module, cut: np.ndarray, y: np.ndarray,
             replay: tuple[np.ndarray, np.ndarray] | None = None, seed: int = 0) -> torch.nn.Module:
    """A copy of ``base`` whose last blocks and heads are trained on the cached maps ``cut`` (N, C, h, w) of a
    site's films with labels ``y``; ``replay`` = (maps, labels) of the base's training images, drawn as many per
    step as site films and trained in the same batch (so BatchNorm sees both populations)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base).float()
    params = trainable_parameters(model)
    keep = {id(p) for p in params}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)
    x, t = torch.from_numpy(cut), torch.from_numpy(np.asarray(y, dtype=np.float32))
    steps = max(1, len(t) // BATCH) * EPOCHS
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=LR, total_steps=steps, pct_start=0.2)
    pos_weight = (t == 0).sum().clamp_min(1) / (t == 1).sum().clamp_min(1)  # classes weigh equally
    model.train()
    model.backbone._conv_stem.eval()
    model.backbone._bn0.eval()
    for block in model.backbone._blocks[:cut_of(model)]:
        block.eval()
    step = 0
    while step < steps:
        order = torch.randperm(len(t), generator=g)
        for i in range(0, len(order) - BATCH + 1, BATCH):
            idx = order[i:i + BATCH]
            hb, tb = x[idx], t[idx]
            if replay is not None:
                r = torch.randint(0, len(replay[1]), (len(idx),), generator=g)
                hb = torch.cat([hb, torch.from_numpy(replay[0][r.numpy()])])
                tb = torch.cat([tb, torch.from_numpy(np.asarray(replay[1], dtype=np.float32)[r.numpy()])])
            loss = F.binary_cross_entropy_with_logits(_logits(model, hb), tb, pos_weight=pos_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if step == steps:
                break
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


@torch.inference_mode()
def tail_logits(model: torch.nn.Module, cut: np.ndarray, batch: int = 64) -> np.ndarray:
    """(N,) logits of a (fine-tuned) model from cached maps; equal to the full model's logits on the films."""
    model.eval()
    x = torch.from_numpy(cut)
    return torch.cat([_logits(model, x[i:i + batch]) for i in range(0, len(x), batch)]).numpy()
