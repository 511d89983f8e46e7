"""Augmentation on whole batches of tensors (one affine_grid/grid_sample call per batch, no per-image PIL).

Images are float (B, 1, H, W) in [0, 1]. Parameters come from a ``torch.Generator`` so a run is reproducible
and a resumed run draws exactly what an uninterrupted one would.
"""
from __future__ import annotations

import io
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image


def _uniform(n: int, bound: float, g: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=g) * 2 - 1) * bound


def random_affine(x: torch.Tensor, g: torch.Generator, rotate_deg: float, scale: float, translate: float,
                  hflip: bool = False) -> torch.Tensor:
    """Small rotation, zoom and shift (and optional horizontal flip); the border is filled with black (air)."""
    b = x.shape[0]
    if rotate_deg == 0 and scale == 0 and translate == 0 and not hflip:
        return x
    a = _uniform(b, math.radians(rotate_deg), g)
    s = 1 + _uniform(b, scale, g)
    tx, ty = _uniform(b, 2 * translate, g), _uniform(b, 2 * translate, g)  # grid units span 2 per side
    flip = torch.where(torch.rand(b, generator=g) < 0.5, -1.0, 1.0) if hflip else torch.ones(b)
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_border_crop(x: torch.Tensor, g: torch.Generator, fraction: float) -> torch.Tensor:
    """Crop each side independently by up to ``fraction`` of the side and stretch back (another collimation, field
    of view or aspect ratio: the borders, labels and neck leave or enter the image). 0 = off (draws nothing)."""
    if fraction <= 0:
        return x
    b = x.shape[0]
    left, right, top, bottom = (torch.rand(4, b, generator=g) * fraction).unbind(0)
    zero = torch.zeros(b)
    # input coordinate = scale * output coordinate + offset, in grid units (-1..1): keep [-1 + 2l, 1 - 2r]
    theta = torch.stack([torch.stack([1 - left - right, zero, left - right], 1),
                         torch.stack([zero, 1 - top - bottom, top - bottom], 1)], 1)
    grid = F.affine_grid(theta.to(x.device, x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def random_jpeg(x: torch.Tensor, g: torch.Generator, min_quality: int) -> torch.Tensor:
    """Re-encode each image as JPEG (Pillow) at a quality uniform in [``min_quality``, 95]: the storage / PACS
    compression of another site, applied last in the chain. 0 = off (draws nothing)."""
    if min_quality <= 0:
        return x
    q = torch.randint(int(min_quality), 96, (x.shape[0],), generator=g).tolist()
    u8 = (x.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = np.empty_like(u8)
    for i in range(u8.shape[0]):
        buf = io.BytesIO()
        Image.fromarray(u8[i, 0]).save(buf, format="JPEG", quality=q[i])
        out[i, 0] = np.asarray(Image.open(buf))
    return torch.from_numpy(out).to(x.device, x.dtype) / 255


def random_intensity(x: torch.Tensor, g: torch.Generator, brightness: float, contrast: float, gamma: float = 0.0) -> torch.Tensor:
    """Per-image contrast around the image mean, additive brightness and gamma; clamped back to [0, 1]."""
    b = x.shape[0]
    shape = (b, 1, 1, 1)
    if gamma > 0:
        gam = torch.exp(_uniform(b, gamma, g)).view(shape).to(x.device, x.dtype)
        x = x.clamp_min(1e-6) ** gam
    if contrast > 0:
        c = (1 + _uniform(b, contrast, g)).view(shape).to(x.device, x.dtype)
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * c + mean
    if brightness > 0:
        x = x + _uniform(b, brightness, g).view(shape).to(x.device, x.dtype)
    return x.clamp(0, 1)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """Normalised 1-D Gaussian kernel of radius ceil(3 sigma)."""
    r = max(1, math.ceil(3 * sigma))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def random_blur(x: torch.Tensor, g: torch.Generator, sigma: float) -> torch.Tensor:
    """Per-image blur between none and Gaussian ``sigma`` px (another focus / detector sharpness / resolution).

    One separable convolution per batch at the largest sigma, then each image is blended with its blurred copy
    by a uniform weight in [0, 1]: a batched stand-in for a per-image sigma.
    """
    if sigma <= 0:
        return x
    k = gaussian_kernel(sigma).to(x.device, x.dtype)
    r = k.numel() // 2
    b, c, h, w = x.shape
    # images as the channels of one depthwise convolution: ~50x faster on CPU than a 1-channel conv over a batch
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).expand(b * c, 1, 1, -1), groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1).expand(b * c, 1, -1, 1), groups=b * c)
    y = y.view(b, c, h, w)
    w = torch.rand(x.shape[0], generator=g).view(-1, 1, 1, 1).to(x.device, x.dtype)
    return x + w * (y - x)


def random_noise(x: torch.Tensor, g: torch.Generator, std: float) -> torch.Tensor:
    """Additive Gaussian noise, per-image std uniform in [0, ``std``] (fraction of the range); clamped to [0, 1]."""
    if std <= 0:
        return x
    s = (torch.rand(x.shape[0], generator=g) * std).view(-1, 1, 1, 1)
    n = torch.randn(x.shape, generator=g) * s
    return (x + n.to(x.device, x.dtype)).clamp(0, 1)


def random_downsample(x: torch.Tensor, g: torch.Generator, max_log2: float) -> torch.Tensor:
    """Resolution loss: shrink by 2 ** u (u uniform in [0, ``max_log2``], one draw per batch; area filter) and
    resize back (bilinear), blended per image by a uniform weight like ``random_blur``. 0 = off (draws nothing)."""
    if max_log2 <= 0:
        return x
    h, w = x.shape[-2:]
    f = 2.0 ** (torch.rand((), generator=g).item() * max_log2)
    small = F.interpolate(x, size=(max(1, round(h / f)), max(1, round(w / f))), mode="area")
    y = F.interpolate(small, size=(h, w), mode="bilinear", align_corners=False)
    wgt = torch.rand(x.shape[0], generator=g).view(-1, 1, 1, 1).to(x.device, x.dtype)
    return x + wgt * (y - x)


def augment_batch(x: torch.Tensor, g: torch.Generator, cfg) -> torch.Tensor:
    """Apply the configured augmentation (a ``TrainConfig``) to a float batch in [0, 1].

    Order follows the imaging chain: geometry (positioning, collimation), sharpness (focus, detector),
    exposure/contrast (detector response, post-processing), noise, then storage (JPEG).
    """
    x = random_affine(x, g, cfg.rotate_deg, cfg.scale, cfg.translate, cfg.hflip)
    x = random_border_crop(x, g, cfg.border_crop)
    x = random_blur(x, g, cfg.blur)
    x = random_downsample(x, g, cfg.downsample)
    x = random_intensity(x, g, cfg.brightness, cfg.contrast, cfg.gamma)
    x = random_noise(x, g, cfg.noise)
    return random_jpeg(x, g, cfg.jpeg)
