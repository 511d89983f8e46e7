"""The registry's model names and default input sizes, free of torch: the CLI validates a config and starts
decoding at the model's size (data/prefetch.py) before PyTorch is imported. ``registry.py`` builds from these."""
from __future__ import annotations

DEFAULT_INPUT_SIZE = {"seed_cnn": 150, "cnn_rnn": 224, "efficientnet_lite0": 224, "densenet121": 224, "resnet18": 224}


def list_models() -> list[str]:
    """Names accepted by ``create_model``, sorted."""
    return sorted(DEFAULT_INPUT_SIZE)
