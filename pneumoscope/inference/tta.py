"""Test-time views that travel with a model (issue 23). A checkpoint's ``tta`` config key names extra views of the
model's input; ``with_views(model, views)`` is the model that scores the image and each view in one batch and
averages the logits. Views are taken of the normalised input: a crop and a bilinear resize commute with the affine
normalisation, so this equals viewing the decoded image first. The same module serves training's validation (so
the stored calibration, threshold and best epoch are those of the averaged logits), the PyTorch predictor, and the
ONNX graph (``inference.onnx``: the views are inside the exported file, so a bare ONNX Runtime loop over it runs
exactly what ``predict`` runs).

Measured on r9's recipe out-of-fold over all 5,216 training films (docs/selection.md, ``scripts/tta_oof.py``): the
90 % centre crop as a second view raised AUC by +0.0023 [+0.0016, +0.0030] (paired, patient bootstrap) and the
shifted-copy AUC alike; a 4 % shift added +0.0006. Inside an ensemble the members' views are not used.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pneumoscope.config import TTA_VIEWS, parse_tta


def centre_crop(x: torch.Tensor, keep: float = 0.9) -> torch.Tensor:
    """The central ``keep`` of each side of images (N, C, S, S), resized back to S x S (bilinear, antialiased)."""
    s = x.shape[-1]
    c = int(round(s * (1 - keep) / 2))
    return F.interpolate(x[..., c:s - c, c:s - c], size=(s, s), mode="bilinear", antialias=True, align_corners=False)


VIEWS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"crop90": centre_crop}
if set(VIEWS) != set(TTA_VIEWS):  # config.py holds the torch-free copy of the names
    raise ImportError(f"config.TTA_VIEWS lists {TTA_VIEWS} but inference/tta.py defines {sorted(VIEWS)}")
parse_views = parse_tta


class WithViews(nn.Module):
    """``model`` scoring each input and its ``views`` as one batch; the mean of their logits."""

    def __init__(self, model: nn.Module, views: tuple[str, ...]) -> None:
        super().__init__()
        self.model, self.views = model, tuple(views)
        self.preprocess = getattr(model, "preprocess", None)  # the wrapped model's input, unchanged

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch = torch.cat([x, *[VIEWS[v](x) for v in self.views]])
        return self.model(batch).reshape(1 + len(self.views), x.shape[0], -1).mean(0)


def with_views(model: nn.Module, views) -> nn.Module:
    """``model`` itself when there is no view, else ``WithViews(model, views)`` (``views``: names or a ``tta`` string)."""
    views = parse_tta(views)
    return WithViews(model, views) if views else model
