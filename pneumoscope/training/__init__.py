"""Training: ``train(cfg) -> metrics`` (loop.py, the epoch loop in one screen), process set-up (setup.py: device,
precision, threads, allocator, torchrun), data as tensors (data.py), augmentation, losses, the checkpointed
training state (checkpoint.py) and the per-epoch history (history.py). The config is ``pneumoscope.config``.
Nothing outside ``training/`` imports it, except the studies and the CLI that run it."""
from pneumoscope._lazy import lazy_api

__all__ = ["train", "weights_digest"]
__getattr__, __dir__ = lazy_api(__name__, {"train": "loop", "weights_digest": "checkpoint"})
