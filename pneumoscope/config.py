"""The training configuration: one dataclass, a YAML file whose keys mirror the CLI flags, loud validation.

Free of torch (the CLI resolves it before PyTorch is imported) and below every room that reads a run's config:
training, the split re-made from a checkpoint (evaluation, trust), the studies."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from pneumoscope.data.intensity import METHODS as INTENSITY_METHODS
from pneumoscope.errors import ConfigError
from pneumoscope.models.names import list_models, parse_trainable


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
    min_val_split: int = 100  # a given val/ split is used only when it has at least this many images of each class... in total
    seed: int = 0
    imbalance: str = "weighted"  # weighted (class-weighted loss) | sampler (balanced sampling) | none
    label_smoothing: float = 0.0
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
    hflip: bool = False  # off by default: the heart is on the left; a flipped film is not a real chest X-ray
    patience: int = 5  # early stopping: epochs without a better validation AUC
    threshold: str = "youden"  # youden | sensitivity:0.95 (any target)
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
        if self.epochs < 1:
            raise bad("epochs", "must be at least 1")
        if self.batch_size < 2:
            raise bad("batch_size", "must be at least 2")
        if self.image_size is not None and self.image_size < 16:
            raise bad("image_size", "must be at least 16 pixels")
        if not 0.0 < self.val_fraction < 1.0:
            raise bad("val_fraction", "must be between 0 and 1, e.g. 0.15")
        if self.lr <= 0:
            raise bad("lr", "must be positive")
        if self.weight_decay < 0:
            raise bad("weight_decay", "must be >= 0")
        if self.labels not in ("binary", "ternary"):
            raise bad("labels", "choose binary or ternary")
        if self.imbalance not in ("weighted", "sampler", "none"):
            raise bad("imbalance", "choose weighted, sampler or none")
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise bad("precision", "choose auto, bf16, fp16 or fp32")
        if not (self.threshold == "youden" or self.threshold.startswith("sensitivity:")):
            raise bad("threshold", "choose youden or sensitivity:TARGET, e.g. sensitivity:0.95")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise bad("label_smoothing", "must be in [0, 0.5)")
        if self.blur < 0 or self.noise < 0 or self.downsample < 0:
            raise ConfigError(f"config values blur={self.blur!r}, noise={self.noise!r} and downsample="
                              f"{self.downsample!r} must be >= 0 (0 = off)")
        if self.intensity not in INTENSITY_METHODS:
            raise bad("intensity", f"choose one of {', '.join(INTENSITY_METHODS)}")
        parse_trainable(self.trainable)
        if self.patience < 1:
            raise bad("patience", "must be at least 1")
        if self.limit < 0 or self.threads < 0 or self.workers < 0 or self.freeze_epochs < 0:
            raise ConfigError("config values limit, threads, workers and freeze_epochs must be >= 0")
        if self.model not in list_models():
            raise bad("model", f"unknown model; choose one of {', '.join(list_models())}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def default_out(self) -> str:
        size = f"{self.image_size}px-" if self.image_size else ""
        return str(Path("runs") / f"{self.model}-{self.labels}-{size}seed{self.seed}")


def config_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(TrainConfig)]


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
        values.update({k.replace("-", "_"): v for k, v in loaded.items()})
    values.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(values) - set(config_keys()))
    if unknown:
        raise ConfigError(f"unknown config key(s) {unknown}; known keys: {', '.join(config_keys())}")
    types = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
    for k, v in values.items():
        t = str(types[k])
        try:
            if t.startswith("int") and v is not None and not isinstance(v, bool):
                values[k] = int(v)
            elif t.startswith("float"):
                values[k] = float(v)
            elif t.startswith("bool") and isinstance(v, str):
                values[k] = v.lower() in ("1", "true", "yes", "on")
        except (TypeError, ValueError) as e:
            raise ConfigError(f"config value {k}={v!r} is invalid: expected {t}") from e
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
