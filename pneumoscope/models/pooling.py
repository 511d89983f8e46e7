"""relu(2x2 max-pooling) with a faster CPU path, bit-identical to ``F.relu(F.max_pool2d(x, 2))``.

PyTorch's CPU max-pooling stores an int64 index per output and its backward zero-fills the full-size gradient
before scattering into it: on seed_cnn at 150 px (bf16, batch 32) the first pooling layer cost ~18 ms of a
~90 ms training step on the reference CPU, more than the convolution before it. The numba kernels in
``_pool_kernels.py`` keep a one-byte window position instead, apply the ReLU that follows every pooling in the
conv blocks in the same pass, and write the gradient in one pass (~5 ms). Values and gradients are the same bit
for bit, ties and signed zeros included (tested), so training results do not change.

`MaxPoolReLU` takes that path for plain CPU tensors in channels_last bf16/fp32 when numba is installed and
nothing is tracing (torch.export/ONNX, torch.compile, TorchScript and FX see ``max_pool2d`` + ``relu``);
otherwise it runs exactly those two PyTorch ops. ``set_fast_pooling(False)`` turns the path off (benchmarks
compare both).
"""
from __future__ import annotations

import functools
import logging
import threading

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

log = logging.getLogger(__name__)

_INT_VIEW = {torch.bfloat16: (torch.int16, 0x7FFF), torch.float32: (torch.int32, 0x7FFFFFFF)}
_enabled = True
# numba's fallback "workqueue" threading layer aborts on concurrent calls (e.g. the service's request threads);
# the kernels take a few ms, so they simply run one at a time
_lock = threading.Lock()


def set_fast_pooling(on: bool) -> bool:
    """Use (True) or bypass (False) the numba path; returns the previous setting."""
    global _enabled
    prev, _enabled = _enabled, bool(on)
    return prev


@functools.cache
def _kernels():
    try:
        import numba
    except ImportError:
        log.info("numba is not installed: 2x2 max-pooling uses PyTorch's kernel (slower on CPU)")
        return None
    # numba's OpenMP layer shares the libgomp that PyTorch loaded, so the two never run rival thread pools
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
    from pneumoscope.models import (
        _pool_kernels,  # compiles with numba at import: loaded on first use only
    )

    return numba, _pool_kernels


def fast_path_available(x: torch.Tensor) -> bool:
    return (_enabled and type(x) is torch.Tensor and x.device.type == "cpu" and x.dtype in _INT_VIEW
            and x.dim() == 4 and x.shape[2] >= 2 and x.shape[3] >= 2
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.jit.is_scripting() and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and _kernels() is not None)


def _nhwc(t: torch.Tensor, as_int: torch.dtype):
    """numpy view (N, H, W, C) of a channels_last tensor's bits."""
    return t.detach().permute(0, 2, 3, 1).view(as_int).numpy()


def _threads(numba) -> None:
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))


class _MaxPoolReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        numba, k = _kernels()
        as_int, flip = _INT_VIEW[x.dtype]
        n, c, h, w = x.shape
        y = torch.empty((n, c, h // 2, w // 2), dtype=x.dtype, memory_format=torch.channels_last)
        where = torch.empty((n, h // 2, w // 2, c), dtype=torch.uint8)
        with _lock:
            _threads(numba)
            k.pool_relu_forward(_nhwc(x, as_int), flip, _nhwc(y, as_int), where.numpy())
        ctx.save_for_backward(where)
        ctx.input_shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        numba, k = _kernels()
        (where,) = ctx.saved_tensors
        as_int, _ = _INT_VIEW[g.dtype]
        g = g.contiguous(memory_format=torch.channels_last)
        gi = torch.empty(ctx.input_shape, dtype=g.dtype, memory_format=torch.channels_last)
        with _lock:
            _threads(numba)
            k.pool_relu_backward(_nhwc(g, as_int), where.numpy(), _nhwc(gi, as_int))
        return gi


def warm_up(dtype: torch.dtype = torch.float32) -> None:
    """Import numba and load the kernels for ``dtype`` now (~1 s, once per process) rather than in the first
    training step; `train` does it while another process prepares the data. No-op where the path is off."""
    x = torch.zeros(1, 2, 2, 2, dtype=dtype).contiguous(memory_format=torch.channels_last).requires_grad_()
    if fast_path_available(x):
        _MaxPoolReLU.apply(x).sum().backward()


class MaxPoolReLU(nn.Module):
    """``relu(max_pool2d(x, 2))`` (floor mode) with the numba CPU path above.

    Max-pooling and ReLU commute (ReLU is monotonic), so a conv block's conv -> pool -> ReLU equals the usual
    conv -> ReLU -> pool; the ReLU then touches a 4x smaller tensor.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast_path_available(x):
            return _MaxPoolReLU.apply(x)
        return F.relu(F.max_pool2d(x, 2), inplace=True)
