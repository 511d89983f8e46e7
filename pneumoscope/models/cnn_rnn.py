"""cnn_rnn: the study's hybrid CNN-RNN; conv features read row by row (top to bottom) by a bidirectional GRU."""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from torch import nn

from pneumoscope.errors import ConfigError
from pneumoscope.models.layers import Classifier, ModelSpec, RowGRUHead, conv_block
from pneumoscope.models.names import DEFAULT_INPUT_SIZE
from pneumoscope.models.preprocess import Preprocess


def _build_cnn_rnn(num_classes: int, image_size: int, channels: Sequence[int] = (32, 64, 128, 128),
                   hidden: int = 128, dropout: float = 0.3) -> nn.Module:
    if len(channels) < 1:
        raise ConfigError(f"cnn_rnn needs at least one conv block, got channels={channels}")
    blocks: list[tuple[str, nn.Module]] = []
    cin = 1
    for i, cout in enumerate(channels, start=1):
        blocks.append((f"block{i}", nn.Sequential(OrderedDict(conv_block(cin, int(cout), padding=1, bn=True)))))
        cin = int(cout)
    model = Classifier(nn.Sequential(OrderedDict(blocks)), RowGRUHead(cin, num_classes, int(hidden), dropout))
    model.preprocess = Preprocess(image_size, 1, (0.5,), (0.25,))
    model.gradcam_layer = f"backbone.block{len(channels)}.bn"  # last conv block, before pooling
    return model


SPECS = {"cnn_rnn": ModelSpec(
    _build_cnn_rnn, DEFAULT_INPUT_SIZE["cnn_rnn"], lambda kw: 2 ** len(kw["channels"]),
    stem_key="backbone.block1.conv.weight",
    defaults={"channels": [32, 64, 128, 128], "hidden": 128, "dropout": 0.3},
)}
