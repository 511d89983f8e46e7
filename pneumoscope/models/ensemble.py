"""Several trained binary classifiers as ONE model: ``Ensemble``.

Its input is the grey image in [0, 1] (mean 0, std 1) at the largest member input size, with the members' common
per-image intensity standardisation. For each member it resizes (bilinear, antialiased) to that member's input
size and applies its mean/std, turns its logit into its **calibrated** probability (the member's own temperature
and bias, fitted on its validation split) and returns the logit of the mean of those probabilities. So a
checkpoint, ``predict``, Grad-CAM (``gradcam_layers``: one map per member, averaged by ``trust.explain``), ONNX
and the service treat an ensemble like any network. It is never trained: ``studies.ensemble.build`` assembles
it from finished runs and fits its own calibration and threshold on their shared validation split.

``arch = {"name": "ensemble", "members": [{"arch", "preprocess", "temperature", "bias"}, ...]}``; the registry's
``rebuild`` builds the members from their own ``arch`` (see models/registry.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pneumoscope.errors import ConfigError
from pneumoscope.models.preprocess import Preprocess

NAME = "ensemble"


class Ensemble(nn.Module):
    def __init__(self, members: list[nn.Module], temperatures: list[float], biases: list[float]) -> None:
        """``members``: registry models, each with its own ``preprocess``; their calibration ``temperatures`` and
        ``biases``."""
        super().__init__()
        if not (len(members) >= 2 and len(members) == len(temperatures) == len(biases)):
            raise ConfigError("an ensemble needs >= 2 members, each with its temperature and bias")
        preprocesses = [m.preprocess for m in members]
        if len({p.intensity for p in preprocesses}) != 1:
            raise ConfigError(f"ensemble members standardise intensity differently "
                              f"({[p.intensity for p in preprocesses]}): combine members with the same 'intensity'")
        if any(p.channels != 1 for p in preprocesses):
            raise ConfigError("ensemble members must take 1-channel (grey) input")
        if any(not (t and t > 0) for t in temperatures):
            raise ConfigError(f"ensemble members need a fitted temperature > 0 (got {temperatures}): use best.pt files")
        self.members = nn.ModuleList(members)
        self.temperatures = [float(t) for t in temperatures]
        self.biases = [float(b) for b in biases]
        size = max(p.input_size for p in preprocesses)
        self.preprocess = Preprocess(size, 1, (0.0,), (1.0,), preprocesses[0].intensity)
        self.gradcam_layers = [f"members.{i}.{m.gradcam_layer}" for i, m in enumerate(members)]
        self.gradcam_layer = self.gradcam_layers[0]
        self.arch = {"name": NAME, "members": [
            {"arch": m.arch, "preprocess": p.to_dict(), "temperature": t, "bias": b}
            for m, p, t, b in zip(members, preprocesses, self.temperatures, self.biases)]}

    def member_input(self, x: torch.Tensor, i: int) -> torch.Tensor:
        pre = self.members[i].preprocess
        s = pre.input_size
        if x.shape[-1] != s or x.shape[-2] != s:
            x = F.interpolate(x, size=(s, s), mode="bilinear", antialias=True, align_corners=False)
        return (x - pre.mean[0]) / pre.std[0]

    def member_logit(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Member ``i``'s uncalibrated logit (N, 1) of the ensemble's input ``x``."""
        return self.members[i](self.member_input(x, i)).float()[:, :1]

    def member_probability(self, x: torch.Tensor, i: int) -> torch.Tensor:
        """Member ``i``'s calibrated probability (N, 1) of the ensemble's input ``x``."""
        return torch.sigmoid(self.member_logit(x, i) / self.temperatures[i] + self.biases[i])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = torch.stack([self.member_probability(x, i) for i in range(len(self.members))]).mean(0)
        return logit(p)


class OneMember(nn.Module):
    """Member ``i`` of an ensemble seen like the ensemble (same input, logit of its calibrated probability): the
    out-of-fold predictions of a cross-validated ensemble (studies/ensemble.py)."""

    def __init__(self, ensemble: Ensemble, i: int) -> None:
        super().__init__()
        self.ensemble, self.i, self.preprocess = ensemble, i, ensemble.preprocess

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logit(self.ensemble.member_probability(x, self.i))


def logit(p: torch.Tensor) -> torch.Tensor:
    p = p.clamp(1e-6, 1 - 1e-6)
    return torch.log(p) - torch.log1p(-p)


def from_arch(arch: dict, rebuild_member) -> Ensemble:
    """``Ensemble`` with untrained members built by ``rebuild_member(member_arch)`` (registry.rebuild)."""
    try:
        specs = list(arch["members"])
        return Ensemble([_with_pre(rebuild_member(m["arch"]), m["preprocess"]) for m in specs],
                        [m["temperature"] for m in specs], [m.get("bias", 0.0) for m in specs])
    except (KeyError, TypeError) as e:
        raise ConfigError(f"invalid ensemble arch (needs members with arch, preprocess, temperature): {e}") from e


def _with_pre(model: nn.Module, pre: dict) -> nn.Module:
    model.preprocess = Preprocess.from_dict(pre)  # the member's intensity lives in its preprocess, not its arch
    return model
