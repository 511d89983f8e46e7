"""How an image must be prepared for a model: ``Preprocess`` (square side, channels, per-image intensity
standardisation, mean/std on [0, 1]) and the normalisation constants of the ImageNet weights. Free of torch:
checkpoints, ONNX metadata and the service share it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from pneumoscope.data.intensity import METHODS, standardise
from pneumoscope.errors import ConfigError

# Grayscale ImageNet statistics: the means of the RGB ImageNet mean/std (0.485, 0.456, 0.406) and
# (0.229, 0.224, 0.225). Used by the ImageNet-style models (efficientnet_lite0, densenet121, resnet18).
IMAGENET_GREY_MEAN = 0.449
IMAGENET_GREY_STD = 0.226
# Normalisation the EfficientNet-Lite ImageNet weights were trained with: the official TensorFlow
# builder (efficientnet_lite_builder.py) uses MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3 on
# 0..255 pixels, i.e. (x - 127/255) / (128/255) on [0, 1] images.
EFFNET_LITE_RGB_MEAN = (127.0 / 255.0,) * 3
EFFNET_LITE_RGB_STD = (128.0 / 255.0,) * 3


# Preprocessing config


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a model: square resize, channels, per-channel mean/std on [0, 1]."""

    input_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    intensity: str = "none"  # uint8 standardisation before normalisation: none | equalize | clahe (data/intensity.py)

    def __post_init__(self) -> None:
        if self.intensity not in METHODS:
            raise ConfigError(f"Preprocess intensity={self.intensity!r} must be one of {', '.join(METHODS)}")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))
        if int(self.input_size) <= 0 or int(self.channels) <= 0:
            raise ConfigError(f"Preprocess input_size={self.input_size} and channels={self.channels} must be > 0")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ConfigError(
                f"Preprocess mean {self.mean} and std {self.std} must have one value per channel ({self.channels})"
            )
        if any(s <= 0 for s in self.std):
            raise ConfigError(f"Preprocess std {self.std} must be > 0")

    def to_dict(self) -> dict:
        """JSON-serialisable dict (tuples become lists). ``intensity`` only when not "none": the dict of a model
        without standardisation stays exactly what it was before the field existed."""
        d = {"input_size": int(self.input_size), "channels": int(self.channels),
             "mean": list(self.mean), "std": list(self.std)}
        return d if self.intensity == "none" else {**d, "intensity": self.intensity}

    def standardise(self, images_u8: np.ndarray) -> np.ndarray:
        """uint8 images at the input size, (N, S, S) or (N, 1, S, S), standardised as this model was trained."""
        return standardise(images_u8, self.intensity)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
        """Inverse of `to_dict`."""
        try:
            return cls(input_size=int(d["input_size"]), channels=int(d["channels"]),
                       mean=tuple(d["mean"]), std=tuple(d["std"]), intensity=str(d.get("intensity", "none")))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"invalid preprocess dict {dict(d)!r}: needs input_size, channels, mean, std ({e})"
            ) from e


def grey_imagenet(size: int) -> Preprocess:
    return Preprocess(size, 1, (IMAGENET_GREY_MEAN,), (IMAGENET_GREY_STD,))
