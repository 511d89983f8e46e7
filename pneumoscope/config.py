"""The training configuration: one dataclass, a YAML file whose keys mirror the CLI flags, loud validation.

Free of torch (the CLI resolves it before PyTorch is imported) and below every room that reads a run's config:
training, the split re-made from a checkpoint (evaluation, trust), the studies."""
from __future__ import annotations

import dataclasses
import numbers
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pneumoscope.data.intensity import METHODS as INTENSITY_METHODS
from pneumoscope.errors import ConfigError
from pneumoscope.models.names import list_models, parse_trainable

# THE table of allowed values, one row per key that has bounds or choices; types come from TrainConfig's
# annotations. (lo, hi): inclusive; "(lo" / "hi)" in OPEN marks an open end. A new field only needs a row here.
# Checked once per value, for YAML files and flags alike (``check_value``), and again by ``TrainConfig.validate``.
BOUNDS: dict[str, tuple[float, float]] = {
    "image_size": (16, 1024), "epochs": (1, 1000), "batch_size": (2, 4096), "lr": (0.0, 10.0),
    "weight_decay": (0.0, 1.0), "val_fraction": (0.0, 1.0), "min_val_split": (0, 1_000_000),
    "seed": (0, 2**32 - 1), "label_smoothing": (0.0, 0.5), "rotate_deg": (0.0, 180.0), "scale": (0.0, 0.9),
    "translate": (0.0, 0.5), "brightness": (0.0, 1.0), "contrast": (0.0, 1.0), "gamma": (0.0, 3.0),
    "blur": (0.0, 20.0), "downsample": (0.0, 4.0), "border_crop": (0.0, 0.4), "jpeg": (0, 95), "noise": (0.0, 1.0),
    "patience": (1, 1000), "threads": (0, 256), "workers": (0, 256),
    "limit": (0, 100_000_000), "freeze_epochs": (0, 1000), "backbone_lr_mult": (0.0, 100.0),
    "mixup": (0.0, 10.0), "ema": (0.0, 1.0), "layer_decay": (0.0, 1.0),
}
OPEN = {"lr": "(lo", "val_fraction": "(lo hi)", "label_smoothing": "hi)", "ema": "hi)", "layer_decay": "(lo"}
CHOICES: dict[str, tuple[str, ...]] = {
    "labels": ("binary", "ternary"), "imbalance": ("weighted", "sampler", "none"),
    "precision": ("auto", "bf16", "fp16", "fp32"), "intensity": tuple(INTENSITY_METHODS),
}
_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _allowed(key: str) -> str:
    lo, hi = BOUNDS[key]
    o = OPEN.get(key, "")
    return f"{'(' if '(lo' in o else '['}{lo:g}, {hi:g}{')' if 'hi)' in o else ']'}"


def check_value(key: str, value, where: str = "config value"):
    """``value`` of ``key`` coerced to the field's type and checked against BOUNDS / CHOICES; raises a
    ConfigError naming the key, the value, where it came from and what is allowed. Bools must be bools (or
    yes/no, true/false, on/off strings), ints must not have a fraction."""
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainConfig)}
    if key not in types:
        raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(config_keys())}")
    t = types[key]

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{where} {key}={value!r} is invalid: {why}")

    if value is None:
        if "None" in t:
            return None
        raise bad(f"expected {t.split(' ')[0]}, got nothing")
    base = t.split(" ")[0]
    if base == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise bad("expected true or false (yes/no)")
    if base in ("int", "float"):
        v = value
        if isinstance(v, str):
            try:
                v = float(v.strip()) if base == "float" or "." in v or "e" in v.lower() else int(v.strip())
            except ValueError:
                raise bad(f"expected a{'n integer' if base == 'int' else ' number'}") from None
        if isinstance(v, bool) or not isinstance(v, numbers.Real):  # numpy numbers too
            raise bad(f"expected a{'n integer' if base == 'int' else ' number'}, got {type(value).__name__}")
        if v != v or v in (float("inf"), float("-inf")):
            raise bad("expected a finite number")
        if base == "int":
            if float(v) != int(v):
                raise bad("expected a whole number (no fraction)")
            v = int(v)
        else:
            v = float(v)
        if key in BOUNDS:
            lo, hi = BOUNDS[key]
            o = OPEN.get(key, "")
            if v < lo or v > hi or (v == lo and "(lo" in o) or (v == hi and "hi)" in o):
                raise bad(f"allowed range {_allowed(key)}")
        return v
    if base == "dict":
        if not isinstance(value, dict):
            raise bad("expected a mapping of keyword arguments, e.g. {dropout: 0.2}")
        return value
    if isinstance(value, (dict, list, tuple)):
        raise bad("expected a single text value")
    v = str(value)
    if key in CHOICES and v not in CHOICES[key]:
        raise bad(f"choose {', '.join(CHOICES[key])}")
    return v


TTA_VIEWS = ("crop90",)  # the test-time views of inference/tta.py (names only: this module imports no torch)


def parse_tta(spec) -> tuple[str, ...]:
    """``""`` -> no extra view; ``"crop90"``, ``"crop90,..."`` or a list -> the view names, checked."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec or []) if str(n).strip()]
    unknown = [n for n in names if n not in TTA_VIEWS]
    if unknown:
        raise ConfigError(f"config value tta={spec!r} is invalid: unknown view(s) {unknown}; known: "
                          f"{', '.join(TTA_VIEWS)} (empty: no test-time augmentation)")
    return tuple(names)


@dataclass
class TrainConfig:
    data: str = ""  # folder in either layout of the data layer (required)
    out: str = ""  # run folder; empty -> runs/<model>-<labels>-<image_size>px-seed<seed>
    model: str = "seed_cnn"
    image_size: int | None = None  # None -> the model's default input size
    labels: str = "binary"  # binary (NORMAL/PNEUMONIA) | ternary (NORMAL/BACTERIAL/VIRAL)
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    val_fraction: float = 0.15  # patient-level, stratified; ignored when the data has a large enough val/ split
    fold: str = ""  # "i/k": validate on patient fold i of k (stratified, seeded) of train/, train on the rest (CV)
    min_val_split: int = 100  # a given val/ split is used only when it has at least this many images of each class... in total
    seed: int = 0
    imbalance: str = "weighted"  # weighted (class-weighted loss) | sampler (balanced sampling) | none
    label_smoothing: float = 0.0
    tta: str = ""  # test-time views averaged with the image, e.g. crop90 (inference/tta.py); needs intensity none
    mixup: float = 0.0  # mixup: each batch blended with a shuffled copy, weight ~ Beta(mixup, mixup), labels alike; 0 = off
    augment: bool = True
    rotate_deg: float = 10.0  # random affine: rotation in degrees (uniform +-)
    scale: float = 0.10  # zoom +- fraction
    translate: float = 0.08  # shift +- fraction of the side
    brightness: float = 0.15  # additive +- (images in [0, 1])
    contrast: float = 0.20  # multiplicative 1 +- around the image mean
    gamma: float = 0.0  # log-uniform gamma in [exp(-g), exp(g)]; 0 = off
    blur: float = 0.0  # per-image Gaussian blur up to this sigma in px at the model's input size; 0 = off
    downsample: float = 0.0  # resolution loss: shrink by up to 2 ** this and resize back (augment.py); 0 = off
    noise: float = 0.0  # per-image additive Gaussian noise up to this std (fraction of the range); 0 = off
    border_crop: float = 0.0  # crop each side by up to this fraction and stretch back (collimation); 0 = off
    jpeg: int = 0  # re-encode as JPEG at a quality uniform in [this, 95] (another site's storage); 0 = off
    hflip: bool = False  # off by default: the heart is on the left; a flipped film is not a real chest X-ray
    patience: int = 5  # early stopping: epochs without a better validation AUC
    threshold: str = "youden"  # youden | sensitivity:0.95 | specificity:0.9 (any target)
    precision: str = "auto"  # auto (bf16 on CPUs with AVX512-BF16/AMX and on CUDA) | bf16 | fp16 | fp32
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int = 0  # torch intra-op threads; 0 = all cores
    workers: int = 0  # decode threads; 0 = automatic
    cache_dir: str = ""  # on-disk cache of decoded images; empty = off
    limit: int = 0  # use at most this many training and validation images each (stratified; for quick tests); 0 = all
    pretrained: bool = False  # ImageNet weights where the model has them offline (efficientnet_lite0)
    weights: str = ""  # local weights file for a backbone
    freeze_epochs: int = 0  # epochs with the backbone frozen (head warm-up) before fine-tuning
    backbone_lr_mult: float = 1.0  # discriminative learning rate: backbone lr = lr * this
    layer_decay: float = 1.0  # layer-wise lr decay: backbone stage i of n at lr * backbone_lr_mult * this ** (n-1-i); 1 = off
    ema: float = 0.0  # weight EMA decay per step (parameters and BatchNorm buffers); validated and saved as best.pt; 0 = off
    trainable: str = "all"  # all | head (frozen features + head) | last:N (last N backbone stages + head)
    intensity: str = "none"  # uint8 standardisation at the input size: none | equalize | clahe (data/intensity.py)
    model_kwargs: dict = field(default_factory=dict)  # extra constructor arguments of the model
    allow_cross_split_duplicates: bool = False
    progress: bool = True

    def validate(self) -> "TrainConfig":
        def bad(key: str, why: str) -> ConfigError:
            return ConfigError(f"config value {key}={getattr(self, key)!r} is invalid: {why}")

        if not self.data:
            raise ConfigError("config value data is missing: pass --data DIR (a folder with NORMAL/ and PNEUMONIA/)")
        for f in dataclasses.fields(self):  # types, ranges and choices: the one table above
            setattr(self, f.name, check_value(f.name, getattr(self, f.name)))
        try:
            threshold_target(self.threshold)
        except ConfigError:
            raise bad("threshold", "choose youden, sensitivity:TARGET or specificity:TARGET with TARGET in (0, 1], "
                      "e.g. sensitivity:0.95") from None
        parse_trainable(self.trainable)
        parse_fold(self.fold)
        if parse_tta(self.tta) and self.intensity != "none":
            raise bad("tta", "test-time views are taken of the decoded image, before an intensity method; use "
                             "intensity: none with tta")
        if self.model not in list_models():
            raise bad("model", f"unknown model; choose one of {', '.join(list_models())}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def default_out(self) -> str:
        size = f"{self.image_size}px-" if self.image_size else ""
        return str(Path("runs") / f"{self.model}-{self.labels}-{size}seed{self.seed}")


def threshold_target(method: str) -> tuple[str, float] | None:
    """The one rule for a threshold method: None for "youden"; ("sensitivity", target) for "sensitivity:<target>"
    and ("specificity", target) for "specificity:<target>", target in (0, 1]; ConfigError otherwise
    (``TrainConfig.validate``, ``evaluation.metrics.choose_threshold``)."""
    if method == "youden":
        return None
    m = re.fullmatch(r"(sensitivity|specificity):\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)", str(method).strip())
    if m is None or not 0 < float(m.group(2)) <= 1:
        raise ConfigError(f"unknown threshold method {method!r}: use 'youden', 'sensitivity:<target in (0, 1]>' or "
                          "'specificity:<target in (0, 1]>', e.g. 'sensitivity:0.95'")
    return m.group(1), float(m.group(2))


def parse_fold(fold: str) -> tuple[int, int] | None:
    """``"i/k"`` -> (i, k): patient fold i (1-based) of k validates, the other k - 1 train; "" -> None."""
    if not fold:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(fold))
    if m is None or not 2 <= int(m.group(2)) <= 20 or not 1 <= int(m.group(1)) <= int(m.group(2)):
        raise ConfigError(f"config value fold={fold!r} is invalid: write i/k with 2 <= k <= 20 and 1 <= i <= k, "
                          "e.g. fold: 1/5 (validate on patient fold 1 of 5, train on the other 4)")
    return int(m.group(1)), int(m.group(2))


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


def _refuse_unknown(values: dict) -> None:
    unknown = sorted(set(values) - set(config_keys()))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known keys: {', '.join(config_keys())}")


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """Config from a YAML file (keys = flag names with underscores), then ``overrides`` that are not None."""
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} not found")
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping of keys to values")
        loaded = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        _refuse_unknown(loaded)
        # every value of the file is checked, also those a flag overrides: a wrong file is never hidden
        values.update({k: check_value(k, v, f"config file {p}: value") for k, v in loaded.items()})
    given = {k: v for k, v in overrides.items() if v is not None}
    _refuse_unknown(given)
    values.update({k: check_value(k, v) for k, v in given.items()})
    return TrainConfig(**values)


def resolve(cfg: TrainConfig | dict | str | None = None, resume: str | None = None, *, validate: bool = True,
            **overrides) -> TrainConfig:
    """A validated config from a TrainConfig, a dict, a YAML path, or a run folder to resume.

    ``validate=False`` skips `TrainConfig.validate` (which imports the model registry, hence torch)."""
    if resume:
        run = Path(resume)
        if not (run / "config.yaml").is_file():
            raise ConfigError(f"cannot resume {run}: no config.yaml there (is it a run folder of pneumoscope train?)")
        base = yaml.safe_load((run / "config.yaml").read_text())
        base.update({k: v for k, v in overrides.items() if v is not None})
        base["out"] = str(run)
        c = load_config(None, **base)
        return c.validate() if validate else c
    if isinstance(cfg, TrainConfig):
        c = TrainConfig(**{**cfg.to_dict(), **{k: v for k, v in overrides.items() if v is not None}})
    elif isinstance(cfg, dict):
        c = load_config(None, **{**cfg, **overrides})
    else:
        c = load_config(cfg, **overrides)
    return c.validate() if validate else c
