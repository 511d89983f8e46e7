"""The registry's torch-free facts: model names, default input sizes, and the ``trainable`` spec (which part of a
model trains). The CLI validates a config and starts decoding at the model's size (data/prefetch.py) before
PyTorch is imported. ``registry.py`` builds from these."""
from __future__ import annotations

from pneumoscope.errors import ConfigError

DEFAULT_INPUT_SIZE = {"seed_cnn": 150, "cnn_rnn": 224, "efficientnet_lite0": 224, "efficientnet_lite1": 224,
                      "efficientnet_lite2": 224, "densenet121": 224, "resnet18": 224}


def list_models() -> list[str]:
    """Names accepted by ``create_model``, sorted."""
    return sorted(DEFAULT_INPUT_SIZE)


def parse_trainable(spec: str) -> int | None:
    """``all`` -> None (everything trains), ``head`` -> 0 (frozen features + head), ``last:N`` -> N (the last N
    backbone stages + head; ``models.weights.apply_trainable``)."""
    if spec == "all":
        return None
    if spec == "head":
        return 0
    if spec.startswith("last:") and spec[5:].isdigit() and int(spec[5:]) >= 1:
        return int(spec[5:])
    raise ConfigError(f"config value trainable={spec!r} is invalid: choose all, head or last:N (N >= 1)")
