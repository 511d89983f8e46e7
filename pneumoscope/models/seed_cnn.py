"""seed_cnn: the study's CNN (4 valid 3x3 conv blocks, 3 fully connected layers, one sigmoid output unit)."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from pneumoscope.errors import ConfigError
from pneumoscope.models.layers import Classifier, ModelSpec, conv_block
from pneumoscope.models.names import DEFAULT_INPUT_SIZE
from pneumoscope.models.preprocess import Preprocess


def _seed_feature_size(image_size: int, n_blocks: int) -> int:
    """Side of the seed_cnn feature map: each block is a valid 3x3 conv (-2) then a 2x2 max-pool (//2)."""
    s = image_size
    for _ in range(n_blocks):
        s = (s - 2) // 2
    return s


def _build_seed_cnn(num_classes: int, image_size: int, channels: Sequence[int] = (32, 64, 128, 128),
                    fc: Sequence[int] = (128, 64), dropout: float = 0.5) -> nn.Module:
    if len(channels) != 4 or len(fc) != 2:
        raise ConfigError(f"seed_cnn needs 4 conv channels and 2 hidden FC sizes, got channels={channels} fc={fc}")
    layers: list[tuple[str, nn.Module]] = []
    cin = 1
    for i, cout in enumerate(channels, start=1):
        layers += [(f"{n}{i}", m) for n, m in conv_block(cin, int(cout), padding=0, bn=False)]
        cin = int(cout)
    layers.append(("flatten", nn.Flatten(1)))
    side = _seed_feature_size(image_size, len(channels))
    flat = cin * side * side
    head = nn.Sequential(OrderedDict([
        ("drop", nn.Dropout(dropout)),
        ("fc1", nn.Linear(flat, int(fc[0]))), ("relu1", nn.ReLU()),
        ("fc2", nn.Linear(int(fc[0]), int(fc[1]))), ("relu2", nn.ReLU()),
        ("out", nn.Linear(int(fc[1]), num_classes)),  # the output unit; sigmoid/softmax applied outside
    ]))
    model = Classifier(nn.Sequential(OrderedDict(layers)), head)
    model.flatten_size = flat
    model.preprocess = Preprocess(image_size, 1, (0.5,), (0.25,))
    model.gradcam_layer = "backbone.conv4"  # the last conv layer, before pooling (15x15 at 150 px)
    return model


def _seed_min_size(kw: dict) -> int:
    m = 1
    for _ in range(len(kw["channels"])):
        m = 2 * m + 2  # inverse of (s - 2) // 2 >= m
    return m


SPECS = {"seed_cnn": ModelSpec(
    _build_seed_cnn, DEFAULT_INPUT_SIZE["seed_cnn"], _seed_min_size, stem_key="backbone.conv1.weight",
    defaults={"channels": [32, 64, 128, 128], "fc": [128, 64], "dropout": 0.5},
)}
