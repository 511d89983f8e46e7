"""Batched augmentation: reproducible from the generator, range-preserving, each knob does what it says."""
import numpy as np
import torch

from pneumoscope.config import TrainConfig
from pneumoscope.training.augment import (
    augment_batch,
    gaussian_kernel,
    random_blur,
    random_noise,
)


def _batch(n=6, s=48):
    g = torch.Generator().manual_seed(1)
    x = torch.zeros(n, 1, s, s)
    x[:, :, s // 4: 3 * s // 4, s // 4: 3 * s // 4] = 0.8  # a bright square with sharp edges
    return x + 0.1 * torch.rand(n, 1, s, s, generator=g)


def test_same_generator_same_batch_and_range():
    cfg = TrainConfig(data="x", blur=1.5, noise=0.05, gamma=0.3, contrast=0.3)
    x = _batch()
    a = augment_batch(x, torch.Generator().manual_seed(7), cfg)
    b = augment_batch(x, torch.Generator().manual_seed(7), cfg)
    c = augment_batch(x, torch.Generator().manual_seed(8), cfg)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_blur_softens_edges_by_a_per_image_amount():
    x = _batch(n=16)
    y = random_blur(x, torch.Generator().manual_seed(0), sigma=2.0)
    grad = lambda t: (t[..., 1:] - t[..., :-1]).abs().amax(dim=(1, 2, 3))  # noqa: E731
    assert (grad(y) <= grad(x) + 1e-6).all() and (grad(y) < 0.9 * grad(x)).any()
    assert grad(y).std() > 0.01  # different strengths in one batch
    assert torch.allclose(y.mean(dim=(1, 2, 3)), x.mean(dim=(1, 2, 3)), atol=1e-3)  # blur keeps the exposure
    assert torch.equal(random_blur(x, torch.Generator(), 0.0), x)
    assert abs(gaussian_kernel(1.0).sum().item() - 1.0) < 1e-6 and gaussian_kernel(1.0).numel() == 7


def test_noise_std_is_bounded_and_zero_is_identity():
    x = torch.full((32, 1, 64, 64), 0.5)
    y = random_noise(x, torch.Generator().manual_seed(0), std=0.1)
    per_image = (y - x).std(dim=(1, 2, 3))
    assert per_image.max() < 0.11 and per_image.min() < 0.05 and per_image.max() > 0.05
    assert torch.equal(random_noise(x, torch.Generator(), 0.0), x)


def test_negative_strength_is_a_config_error():
    import pytest

    from pneumoscope.errors import ConfigError

    with pytest.raises(ConfigError, match="blur"):
        TrainConfig(data="x", blur=-1).validate()


def test_batched_blur_equals_per_image_separable_convolution():
    """The depthwise formulation (fast on CPU) computes exactly the plain separable Gaussian blur."""
    import torch.nn.functional as F

    x = torch.rand(5, 1, 40, 52, generator=torch.Generator().manual_seed(0))
    k = gaussian_kernel(1.5)
    r = k.numel() // 2
    ref = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    ref = F.conv2d(F.pad(ref, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    w = torch.rand(5, generator=torch.Generator().manual_seed(3)).view(-1, 1, 1, 1)
    out = random_blur(x, torch.Generator().manual_seed(3), 1.5)
    torch.testing.assert_close(out, x + w * (ref - x), atol=1e-6, rtol=0)


def test_random_downsample_off_and_shape():
    from pneumoscope.training.augment import random_downsample

    x = torch.rand(4, 1, 32, 32)
    g = torch.Generator().manual_seed(0)
    assert random_downsample(x, g, 0.0) is x
    y = random_downsample(x, torch.Generator().manual_seed(0), 2.0)
    assert y.shape == x.shape and 0 <= y.min() and y.max() <= 1
    assert y.std() < x.std()  # fine detail removed (towards the blurred copy)
    torch.testing.assert_close(y, random_downsample(x, torch.Generator().manual_seed(0), 2.0))


def test_random_border_crop_removes_a_marked_border():
    from pneumoscope.training.augment import random_border_crop

    x = torch.zeros(64, 1, 40, 40)
    x[:, :, :, :4] = 1.0  # a bright label strip on the left 10 %
    g = torch.Generator().manual_seed(0)
    assert random_border_crop(x, g, 0.0) is x
    y = random_border_crop(x, torch.Generator().manual_seed(0), 0.3)
    assert y.shape == x.shape and float(y.min()) >= 0 and float(y.max()) <= 1
    strip = y[:, 0, :, :].mean(dim=(1, 2))  # the strip's share of each image: 10 % before
    # gone where the left crop reached it (P = 2/3), stretched at most by 1 / (1 - 0.3) where only the right was cut
    assert 0.4 < float((strip < 0.005).float().mean()) < 0.9 and float(strip.max()) <= 0.1 / 0.7 + 1e-3
    torch.testing.assert_close(y, random_border_crop(x, torch.Generator().manual_seed(0), 0.3))  # reproducible


def test_random_jpeg_is_lossy_close_and_reproducible(chest_xray):
    from pneumoscope.data.intake import load_uint8
    from pneumoscope.training.augment import random_jpeg

    films = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:2] + sorted(
        (chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:2]
    x = torch.from_numpy(np.stack([load_uint8(f, 96) for f in films])).float().unsqueeze(1) / 255
    assert random_jpeg(x, torch.Generator().manual_seed(0), 0) is x
    y = random_jpeg(x, torch.Generator().manual_seed(0), 10)
    err = (y - x).abs().mean(dim=(1, 2, 3))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert bool((err > 0).all()) and float(err.max()) < 0.05  # compression artefacts, not another image
    torch.testing.assert_close(y, random_jpeg(x, torch.Generator().manual_seed(0), 10))
