"""A frozen trunk read as features, and a logistic head fitted on them: ``FeatureHead``, the model that
``pneumoscope adapt`` ships when a linear head on frozen features wins a site's cross-validation.

- ``features="pooled"``: the trunk backbone's pooled last features (EfficientNet-Lite0: 1280);
- ``features="block_stats"``: the spatial mean and standard deviation of every MBConv block's channels
  (``efficientnet.block_stats``: 3616 numbers).

The head is ``fc((f - mean) / scale)``: scikit-learn's ``StandardScaler`` + ``LogisticRegression`` copied into
torch (``set_head``), so its logit equals the fitted pipeline's ``decision_function`` (tested), and the whole model
is an ordinary network for ``predict``, Grad-CAM, ONNX and the service. Its ``backbone``/``head`` split is the
registry's: ``inference.embedding.feature_layer`` reads the head's input, the features themselves.

``arch = {"name": "feature_head", "trunk": <registry arch>, "trunk_preprocess": {...}, "features": ..., "dim": D}``;
``registry.rebuild`` builds the trunk from its own arch (weights come from the checkpoint's state_dict).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from pneumoscope.errors import ConfigError
from pneumoscope.models.efficientnet import block_stats
from pneumoscope.models.preprocess import Preprocess

NAME = "feature_head"
FEATURES = ("pooled", "block_stats")


class StandardisedLinear(nn.Module):
    """``fc((f - mean) / scale)`` with one output: a logistic regression on standardised features."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.fc = nn.Linear(dim, 1)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.fc((f - self.mean) / self.scale)


class Trunk(nn.Module):
    """The trunk model's backbone, read as ``features`` (see the module docstring)."""

    def __init__(self, backbone: nn.Module, features: str) -> None:
        super().__init__()
        self.net = backbone
        self.features = features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_stats(self.net, x) if self.features == "block_stats" else self.net(x)


class FeatureHead(nn.Module):
    def __init__(self, trunk: nn.Module, features: str, dim: int) -> None:
        """``trunk``: a registry model (its ``backbone`` and ``preprocess`` are used, its head is dropped)."""
        super().__init__()
        if features not in FEATURES:
            raise ConfigError(f"feature_head features={features!r} must be one of {', '.join(FEATURES)}")
        if features == "block_stats" and not hasattr(trunk.backbone, "_blocks"):
            raise ConfigError(f"block_stats features need an EfficientNet trunk, not {trunk.arch['name']}")
        self.backbone = Trunk(trunk.backbone, features)
        self.head = StandardisedLinear(int(dim))
        self.preprocess: Preprocess = trunk.preprocess
        if features == "block_stats":  # every block feeds the head: a map of the middle (14 px) and last (7 px) blocks
            n = len(trunk.backbone._blocks)
            self.gradcam_layers = [f"backbone.net._blocks.{n // 2 + 2}", f"backbone.net._blocks.{n - 1}"]
        else:
            self.gradcam_layers = ["backbone.net." + trunk.gradcam_layer.removeprefix("backbone.")]
        self.gradcam_layer = self.gradcam_layers[-1]
        self.arch = {"name": NAME, "trunk": trunk.arch, "trunk_preprocess": trunk.preprocess.to_dict(),
                     "features": features, "dim": int(dim)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))

    def set_head(self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: float) -> "FeatureHead":
        """Copy a fitted StandardScaler (mean_, scale_) and LogisticRegression (coef_, intercept_) into the head."""
        h = self.head
        with torch.no_grad():
            h.mean.copy_(torch.as_tensor(np.asarray(mean, dtype=np.float32)))
            h.scale.copy_(torch.as_tensor(np.asarray(scale, dtype=np.float32)))
            h.fc.weight.copy_(torch.as_tensor(np.asarray(coef, dtype=np.float32).reshape(1, -1)))
            h.fc.bias.fill_(float(intercept))
        return self


def from_arch(arch: dict, rebuild_trunk) -> FeatureHead:
    """An untrained ``FeatureHead`` whose trunk is built by ``rebuild_trunk(trunk_arch)`` (registry.rebuild)."""
    try:
        trunk = rebuild_trunk(arch["trunk"])
        trunk.preprocess = Preprocess.from_dict(arch["trunk_preprocess"])
        return FeatureHead(trunk, arch["features"], arch["dim"])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"invalid feature_head arch (needs trunk, trunk_preprocess, features, dim): {e}") from e
