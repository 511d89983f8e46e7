"""Process set-up for training: the allocator setting, the process group under torchrun, work done ahead.

Speed machinery lives here and in ``models/pooling.py`` / ``data/prefetch.py`` only, each with a plain fallback.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as tdist
import yaml

from pneumoscope.config import TrainConfig
from pneumoscope.data.prefetch import Prefetch
from pneumoscope.data.splits import split_samples
from pneumoscope.errors import ConfigError
from pneumoscope.inference.runtime import pick_device, pick_precision
from pneumoscope.models.pooling import warm_up
from pneumoscope.models.registry import create_model
from pneumoscope.training.data import Arrays, decode, to_arrays

log = logging.getLogger(__name__)


def reuse_freed_memory(on: bool = True) -> bool:
    """Let glibc's malloc keep freed memory for reuse (True when set; False off glibc).

    By default glibc serves blocks over 32 MB with a fresh mmap and unmaps them on free, so every training step
    page-faults its largest activations anew (seed_cnn at 150 px, batch 32: the first feature map and its gradient
    are 45 MB each); that costs about a fifth of a CPU training step here (docs/speed.md). ``on=False`` restores
    glibc's defaults. The price: the process keeps its peak heap instead of returning it to the system (the first
    few steps may still grow it: an aligned re-allocation does not always fit the block just freed).
    """
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        log.debug("allocator: no glibc mallopt here; keeping the system allocator's behaviour")
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    ok = mallopt(m_mmap_max, 0 if on else 65536) == 1
    ok &= mallopt(m_trim_threshold, 2**30 if on else 128 * 1024) == 1
    return bool(ok)


# ------------------------------------------------------------------------------------------- distributed
@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_name: str) -> Dist:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1): gloo on CPU, NCCL on CUDA."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if not tdist.is_initialized():
        use_cuda = torch.cuda.is_available() and device_name != "cpu"
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Dist(rank=tdist.get_rank(), world=tdist.get_world_size())


# ------------------------------------------------------------------------------------------- data

def import_ahead(device: torch.device, amp: torch.dtype | None) -> None:
    """Do now the ~1 s of single-threaded loading that the first step and the first validation would do
    (numba's pooling kernels, scikit-learn's metrics)."""
    import sklearn.metrics  # noqa: F401  (imported for its load time only)

    if device.type == "cpu":
        warm_up(amp or torch.float32)


# ------------------------------------------------------------------------------------------- one run
@dataclass
class Run:
    """Everything a training run holds besides the optimizer: where, how precise, which images, which model."""

    cfg: TrainConfig
    dist: Dist
    device: torch.device
    amp: torch.dtype | None
    out: Path
    model: torch.nn.Module
    label_names: tuple[str, ...]
    val_how: str
    tr: Arrays
    va: Arrays
    prefetched: bool
    t_start: float

    @property
    def n_classes(self) -> int:
        return len(self.label_names)


def start_run(cfg: TrainConfig, prefetch: Prefetch | None) -> Run:
    """Process set-up, the split (prefetched or made here), the model (its preprocessing decides the input size),
    the run folder with the resolved config, and the decoded images. ``cfg`` is not changed: ``Run.cfg`` is a copy
    with what the run derived (``out``, ``image_size``)."""
    if prefetch is not None and not prefetch.matches(cfg):
        log.warning("ignoring the prefetched data: they were prepared for another data/split configuration")
        prefetch.close()
        prefetch = None
    dist = init_distributed(cfg.device)
    if dist.world > 1 and cfg.freeze_epochs:
        raise ConfigError("config value freeze_epochs must be 0 under torchrun: DDP cannot change which parameters train mid-run")
    device = pick_device(cfg.device)
    if device.type == "cuda" and dist.world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // dist.world))
    if device.type == "cpu":
        reuse_freed_memory()
    amp = pick_precision(cfg.precision, device)
    out = Path(cfg.out or cfg.default_out())
    t_start = time.perf_counter()

    torch.manual_seed(cfg.seed)
    train_s, val_s, label_names, val_how = prefetch.split() if prefetch else split_samples(cfg)
    n_classes = len(label_names)
    model = create_model(cfg.model, num_classes=1 if n_classes == 2 else n_classes, image_size=cfg.image_size,
                         pretrained=cfg.pretrained, weights=cfg.weights or None, intensity=cfg.intensity,
                         **cfg.model_kwargs)
    size = model.preprocess.input_size
    cfg = replace(cfg, out=str(out), image_size=size)  # derived here, returned in Run.cfg: not changed in place
    if dist.main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        log.info("model %s at %d px, %s on %s%s; validation: %s", cfg.model, size,
                 "bf16" if amp == torch.bfloat16 else "fp16" if amp == torch.float16 else "fp32", device,
                 f" x{dist.world} processes" if dist.world > 1 else "", val_how)
    model = model.to(device).to(memory_format=torch.channels_last)

    prefetched = prefetch is not None and prefetch.size == size
    if prefetched:
        import_ahead(device, amp)  # while the other process still decodes: these imports then cost no wall time
        dtr, dva = prefetch.decoded()
        tr, va = to_arrays(dtr, train_s, cfg), to_arrays(dva, val_s, cfg)
    else:
        if prefetch is not None:  # decoded at another size than the model's: stop it, decode here
            prefetch.close()
        tr, va = decode(train_s, size, cfg, dist.main), decode(val_s, size, cfg, dist.main)
    if model.preprocess.intensity != "none":  # standardised once, as Predictor / ONNX / Grad-CAM do before the model
        for a in (tr, va):
            a.x = torch.from_numpy(model.preprocess.standardise(a.x.numpy()))
    if dist.main:
        def counts(a: Arrays) -> str:
            return ", ".join(f"{n} {c}" for c, n in zip(label_names, torch.bincount(a.y, minlength=n_classes).tolist()))

        log.info("train: %d images (%s), val: %d images (%s)%s", len(tr.y), counts(tr), len(va.y), counts(va),
                 "; decoded by a second process during start-up" if prefetched else "")
    return Run(cfg, dist, device, amp, out, model, tuple(label_names), val_how, tr, va, prefetched, t_start)
