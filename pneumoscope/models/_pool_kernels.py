"""numba kernels behind `pneumoscope.models.pooling` (imported only when numba is installed).

Tensors arrive as NHWC integer views of their float bits (int16 for bf16, int32 for fp32): numba has no bf16,
and integer order equals float order after ``key`` (two's complement of the magnitude for negative numbers;
-0 and +0 get the same key, as they compare equal as floats).
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange


@njit(inline="always")
def key(v, flip):
    return ((v ^ flip) + 1) if v < 0 else v


@njit(parallel=True, cache=True)
def pool_relu_forward(x, flip, y, where):  # pragma: no cover - compiled; tested through pooling.py
    """y[n, p, q, c] = relu(max of the 2x2 window at (2p, 2q)); where[...] = the maximum's position in the window
    (0..3; the first maximum in row-major order wins, like PyTorch) or 255 where the ReLU passes no gradient.
    As torch.relu: -0 stays -0, negatives become +0, (positive) NaN passes."""
    n_img, _, _, n_ch = x.shape
    _, h, w, _ = y.shape
    zero = np.zeros(1, y.dtype)[0]
    for r in prange(n_img * h):
        n, p = r // h, r % h
        i = 2 * p
        for q in range(w):
            j = 2 * q
            for c in range(n_ch):
                best = x[n, i, j, c]
                kb = key(best, flip)
                k = 0
                v = x[n, i, j + 1, c]
                kv = key(v, flip)
                if kv > kb:
                    best, kb, k = v, kv, 1
                v = x[n, i + 1, j, c]
                kv = key(v, flip)
                if kv > kb:
                    best, kb, k = v, kv, 2
                v = x[n, i + 1, j + 1, c]
                kv = key(v, flip)
                if kv > kb:
                    best, kb, k = v, kv, 3
                if kb > 0:
                    y[n, p, q, c] = best
                    where[n, p, q, c] = k
                else:
                    y[n, p, q, c] = best if kb == 0 else zero
                    where[n, p, q, c] = 255


@njit(parallel=True, cache=True)
def pool_relu_backward(g, where, gi):  # pragma: no cover - compiled; tested through pooling.py
    """gi = g routed to each window's maximum where the ReLU passed it, 0 elsewhere (also in a last odd row or
    column that the pooling skipped)."""
    n_img, h, w, n_ch = g.shape
    _, big_h, big_w, _ = gi.shape
    zero = np.zeros(1, gi.dtype)[0]
    for r in prange(n_img * big_h):
        n, i = r // big_h, r % big_h
        p = i >> 1
        for j in range(big_w):
            q = j >> 1
            if p >= h or q >= w:
                for c in range(n_ch):
                    gi[n, i, j, c] = zero
                continue
            k = 2 * (i & 1) + (j & 1)
            for c in range(n_ch):
                gi[n, i, j, c] = g[n, p, q, c] if where[n, p, q, c] == k else zero
