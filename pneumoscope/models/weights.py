"""Local weight files: reading a state_dict safely, mapping original layouts to the registry's, folding an RGB stem
to one channel; and the fine-tuning helpers (discriminative learning rates, a frozen backbone)."""
from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from pneumoscope.errors import CheckpointError, ConfigError
from pneumoscope.models.names import parse_trainable
from pneumoscope.models.preprocess import IMAGENET_GREY_MEAN, IMAGENET_GREY_STD


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist; pass the path of a .pt/.pth state_dict")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:  # corrupt/foreign file
        raise CheckpointError(f"cannot read weights file {path}: {e}") from e
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(
            f"{path} holds no state_dict: expected a dict of tensors, or a dict with a 'state_dict'/'model' key"
        )
    sd = {}
    for k, v in obj.items():
        for prefix in ("module.", "_orig_mod."):  # DataParallel / torch.compile wrappers
            k = k[len(prefix):] if k.startswith(prefix) else k
        sd[k] = v
    return sd


_TV_DENSELAYER = re.compile(r"^(.*denselayer\d+)\.(norm|relu|conv)\.?([12])\.(\w+)$")


def to_wrapped_keys(sd: dict[str, torch.Tensor], raw_head: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Map an original-layout state_dict (MONAI/torchvision/efficientnet package) to backbone./head. keys."""
    if all(k.startswith(("backbone.", "head.")) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        head = next((p for p in raw_head if k.startswith(p)), None)
        if head is not None:
            out["head.fc." + k[len(head):]] = v
            continue
        k = _TV_DENSELAYER.sub(r"\1.layers.\2\3.\4", k) if ".layers." not in k else k
        out["backbone." + k] = v
    return out


def fold_rgb_stem(weight: torch.Tensor, rgb_mean: Sequence[float] | None = None,
                  rgb_std: Sequence[float] | None = None, grey_mean: float = IMAGENET_GREY_MEAN,
                  grey_std: float = IMAGENET_GREY_STD) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold a 3-channel conv weight (O, 3, k, k) to 1 channel; returns (weight (O, 1, k, k), offset (O,)).

    Without rgb_mean/std: plain sum over channels, offset 0 (exact for a grey image replicated to RGB
    with the same normalisation on every channel). With them: the conv on z = (g - grey_mean) / grey_std
    equals the RGB conv on x_c = (g - rgb_mean_c) / rgb_std_c minus `offset`:
    w1 = sum_c w_c * grey_std / rgb_std_c and offset_o = sum_c (grey_mean - rgb_mean_c) / rgb_std_c * sum_k w_oc,
    exact away from the zero-padded border.
    """
    if weight.shape[1] != 3:
        raise CheckpointError(f"cannot fold a first conv with {weight.shape[1]} input channels; expected 3")
    w = weight.float()
    if rgb_mean is None or rgb_std is None:
        return w.sum(1, keepdim=True).to(weight.dtype), torch.zeros(w.shape[0])
    mean = torch.tensor(rgb_mean, dtype=torch.float32)
    std = torch.tensor(rgb_std, dtype=torch.float32)
    w1 = (w * (grey_std / std)[None, :, None, None]).sum(1, keepdim=True)
    offset = (w.sum((2, 3)) * ((grey_mean - mean) / std)[None, :]).sum(1)
    return w1.to(weight.dtype), offset


# Fine-tuning helpers


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float = 0.1, layer_decay: float = 1.0) -> list[dict]:
    """Optimizer groups with discriminative learning rates: backbone at lr * backbone_lr_mult, head at lr.

    ``layer_decay`` < 1: layer-wise learning-rate decay (one group per backbone stage, `backbone_stages`): the last
    stage at lr * backbone_lr_mult, each earlier one ``layer_decay`` times its successor's rate.
    All parameters are included (also frozen ones, so unfreezing later needs no new optimizer).
    """
    if lr <= 0 or backbone_lr_mult < 0 or not 0 < layer_decay <= 1:
        raise ConfigError(f"lr={lr} must be > 0, backbone_lr_mult={backbone_lr_mult} >= 0 and layer_decay={layer_decay} "
                          "in (0, 1]")
    backbone = list(model.backbone.parameters())
    ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in ids]
    if layer_decay < 1:
        stages = [list(m.parameters()) for m in backbone_stages(model)]
        if sum(len(ps) for ps in stages) != len(backbone):
            raise ConfigError(f"layer_decay={layer_decay} needs the backbone split into stages; model "
                              f"{type(model).__name__}'s stages miss some parameters: use layer_decay 1")
        n = len(stages)
        groups = [{"name": f"backbone.{i}", "params": ps, "lr": lr * backbone_lr_mult * layer_decay ** (n - 1 - i)}
                  for i, ps in enumerate(stages)]
    else:
        groups = [{"name": "backbone", "params": backbone, "lr": lr * backbone_lr_mult}]
    groups.append({"name": "head", "params": head, "lr": lr})
    return [g for g in groups if g["params"]]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) the backbone parameters for a frozen warm-up.

    Only `requires_grad` changes: BatchNorm running statistics still update in train mode.
    """
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)


def backbone_stages(model: nn.Module) -> list[nn.Module]:
    """The backbone as an ordered list of stages for partial fine-tuning (`apply_trainable`).

    EfficientNet-Lite0: stem, each of its 16 MBConv blocks, then the conv head (+ its BN) as one stage.
    Other models: the backbone's direct children in order.
    """
    b = model.backbone
    if hasattr(b, "_blocks"):
        head = nn.ModuleList([m for n, m in b.named_children() if n in ("_conv_head", "_bn1")])
        stem = nn.ModuleList([m for n, m in b.named_children() if n in ("_conv_stem", "_bn0")])
        return [stem, *b._blocks, head]
    return list(b.children())


def apply_trainable(model: nn.Module, spec: str) -> list[nn.Module]:
    """Freeze the backbone except its last N stages (``spec`` as in `names.parse_trainable`); returns the frozen
    stages. The caller puts them in eval mode after ``model.train()`` so their BatchNorm keeps the pretrained
    statistics (frozen features mean frozen, running statistics included)."""
    n = parse_trainable(spec)
    if n is None:
        return []
    stages = backbone_stages(model)
    frozen = stages[: max(0, len(stages) - n)]
    for m in frozen:
        for p in m.parameters():
            p.requires_grad_(False)
    return frozen
