"""Building blocks shared by the model families: the backbone/head wrapper, heads, the conv block, and the
registry entry type ``ModelSpec`` (each family file defines its ``SPECS``; ``registry.py`` collects them)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from pneumoscope.models.pooling import MaxPoolReLU


class Classifier(nn.Module):
    """head(backbone(x)); the split is what `param_groups` / `set_backbone_trainable` use."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class LinearHead(nn.Module):
    """Dropout (optional) + Linear on pooled features (B, in_features)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


class RowGRUHead(nn.Module):
    """Reads a feature map (B, C, H', W') as a top-to-bottom sequence of H' rows.

    Each row is max-pooled across the width to C features, a bidirectional GRU runs over the rows,
    the final forward and backward states are concatenated and a Linear gives the logits.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.gru = nn.GRU(in_channels, hidden, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        rows = f.amax(dim=3).transpose(1, 2)  # (B, H', C), row 0 = top of the image
        _, h = self.gru(rows)  # h: (2, B, hidden), final states of the forward and backward passes
        return self.fc(self.drop(torch.cat([h[0], h[1]], dim=1)))


def conv_block(cin: int, cout: int, padding: int, bn: bool) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = [("conv", nn.Conv2d(cin, cout, 3, padding=padding, bias=not bn))]
    if bn:
        layers.append(("bn", nn.BatchNorm2d(cout)))
    # pool, then ReLU, in one module: max-pool and ReLU commute (ReLU is monotonic), so the output is identical to
    # the usual conv-ReLU-pool, and the ReLU runs on a 4x smaller tensor; pooling.py has a faster CPU path for it
    return layers + [("pool", MaxPoolReLU())]


@dataclass(frozen=True)
class ModelSpec:
    build: Callable[..., nn.Module]  # build(num_classes, image_size, **kwargs) -> Classifier
    default_size: int
    min_size: Callable[[dict], int]  # kwargs -> smallest image_size the architecture accepts
    stem_key: str  # state_dict key of the first conv weight (for 3 -> 1 channel folding)
    stem_bn_key: str | None = None  # BN after the stem: its running_mean absorbs the fold's constant
    rgb_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # RGB mean/std of 3-channel weights
    raw_head: tuple[str, ...] = ()  # head prefixes of the original (unwrapped) state_dict layout
    packaged_weights: Callable[[], str] | None = None  # path of weights shipped by an installed package
    defaults: dict = field(default_factory=dict)
