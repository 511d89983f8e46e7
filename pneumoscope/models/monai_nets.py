"""MONAI DenseNet-121 and ResNet-18 (2D, one input channel); ImageNet weights only from a local file (weights=PATH)."""
from __future__ import annotations

from torch import nn

from pneumoscope.models.layers import Classifier, LinearHead, ModelSpec
from pneumoscope.models.names import DEFAULT_INPUT_SIZE
from pneumoscope.models.preprocess import grey_imagenet


def _build_densenet121(num_classes: int, image_size: int, dropout: float = 0.0) -> nn.Module:
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_classes)
    in_features = net.class_layers.out.in_features
    net.class_layers = net.class_layers[:-1]  # keep relu, pool, flatten; the head owns the Linear
    model = Classifier(net, LinearHead(in_features, num_classes, dropout))
    model.preprocess = grey_imagenet(image_size)
    model.gradcam_layer = "backbone.class_layers.relu"
    return model


def _build_resnet18(num_classes: int, image_size: int, dropout: float = 0.0, conv1_t_stride: int = 2,
                    bias_downsample: bool = False) -> nn.Module:
    from monai.networks.nets import resnet18

    # conv1 stride 2 and bias-free downsample convs = the standard (torchvision) ResNet-18 layout, so
    # ImageNet ResNet-18 state_dicts load; MONAI's own defaults (stride 1, biased) are 3D-oriented.
    net = resnet18(spatial_dims=2, n_input_channels=1, num_classes=num_classes, feed_forward=False,
                   conv1_t_stride=conv1_t_stride, bias_downsample=bias_downsample)
    model = Classifier(net, LinearHead(512, num_classes, dropout))
    model.preprocess = grey_imagenet(image_size)
    model.gradcam_layer = "backbone.layer4"
    return model


SPECS = {
    "densenet121": ModelSpec(
        _build_densenet121, DEFAULT_INPUT_SIZE["densenet121"], lambda kw: 32, stem_key="backbone.features.conv0.weight",
        raw_head=("class_layers.out.", "classifier."), defaults={"dropout": 0.0},
    ),
    "resnet18": ModelSpec(
        _build_resnet18, DEFAULT_INPUT_SIZE["resnet18"], lambda kw: 32, stem_key="backbone.conv1.weight",
        raw_head=("fc.",), defaults={"dropout": 0.0, "conv1_t_stride": 2, "bias_downsample": False},
    ),
}
