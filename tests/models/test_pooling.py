"""The numba pooling path must equal F.relu(F.max_pool2d(x, 2)) bit for bit, forward and backward."""
import pytest
import torch
import torch.nn.functional as F

from pneumoscope.models import pooling
from pneumoscope.models.pooling import MaxPoolReLU, fast_path_available
from pneumoscope.models.registry import create_model

pytest.importorskip("numba")

BITS = {torch.bfloat16: torch.int16, torch.float32: torch.int32}


def _input(dtype, shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    if shape[2] >= 8:
        x[:, :, :4] = 0.5  # whole windows of ties
        x[:, :, 4:6] = 0.0
        x[:, :, 4, ::2] = -0.0  # -0 beside +0 in one window: equal, so the first one wins as in PyTorch
        x[:, :, 5, :] = -0.0  # windows of -0 and +0 only: relu keeps the sign of a -0 maximum, as torch.relu does
        x[:, :, 6:8, 1:] = torch.finfo(dtype).min  # the most negative value beside others
    return x.contiguous(memory_format=torch.channels_last).requires_grad_()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(3, 32, 16, 16), (2, 5, 15, 17), (1, 1, 2, 3), (4, 128, 9, 9)])
def test_forward_and_gradient_bitwise_equal_to_pytorch(dtype, shape):
    x = _input(dtype, shape)
    assert fast_path_available(x)
    y_fast = MaxPoolReLU()(x)
    y_ref = F.relu(F.max_pool2d(x, 2))
    assert y_fast.shape == y_ref.shape and y_fast.dtype == dtype
    assert y_fast.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(y_fast.detach().view(BITS[dtype]), y_ref.detach().view(BITS[dtype]))  # bits, -0 included
    g = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    (gx_fast,) = torch.autograd.grad(y_fast, x, g)
    (gx_ref,) = torch.autograd.grad(y_ref, x, g)
    assert torch.equal(gx_fast, gx_ref)
    assert gx_fast.is_contiguous(memory_format=torch.channels_last)


def test_falls_back_where_the_fast_path_does_not_apply():
    x = torch.randn(2, 3, 8, 8)  # NCHW: not channels_last (3 channels)
    assert not fast_path_available(x)
    assert torch.equal(MaxPoolReLU()(x), F.relu(F.max_pool2d(x, 2)))
    assert not fast_path_available(torch.randn(2, 3, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last))
    prev = pooling.set_fast_pooling(False)
    try:
        assert not fast_path_available(_input(torch.float32, (1, 4, 4, 4)))
    finally:
        pooling.set_fast_pooling(prev)
    traced = torch.jit.trace(MaxPoolReLU(), torch.randn(1, 4, 6, 6).contiguous(memory_format=torch.channels_last))
    assert "max_pool2d" in str(traced.graph) and "relu" in str(traced.graph)  # PyTorch's operators, not numba


def test_training_steps_bitwise_identical_to_native_pooling():
    """Three bf16 AdamW steps of seed_cnn give the same weights with and without the fast path."""
    x = torch.rand(8, 1, 64, 64, generator=torch.Generator().manual_seed(0)).contiguous(memory_format=torch.channels_last)
    y = torch.tensor([0.0, 1.0] * 4)

    def run(fast: bool) -> dict:
        prev = pooling.set_fast_pooling(fast)
        try:
            torch.manual_seed(0)
            model = create_model("seed_cnn", num_classes=1, image_size=64, dropout=0.0).to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
            for _ in range(3):
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = F.binary_cross_entropy_with_logits(model(x)[:, 0].float(), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
            return model.state_dict()
        finally:
            pooling.set_fast_pooling(prev)

    fast, native = run(True), run(False)
    assert all(torch.equal(fast[k], native[k]) for k in native)
    torch.manual_seed(0)
    init = create_model("seed_cnn", num_classes=1, image_size=64, dropout=0.0).state_dict()
    assert not torch.equal(fast["backbone.conv1.weight"], init["backbone.conv1.weight"])  # the steps did train


def test_concurrent_calls_from_threads_are_correct():
    """The service runs models from several request threads at once."""
    from concurrent.futures import ThreadPoolExecutor

    xs = [_input(torch.bfloat16, (2, 16, 20, 20), seed=s).detach() for s in range(8)]
    with ThreadPoolExecutor(4) as pool:
        outs = list(pool.map(lambda x: MaxPoolReLU()(x), xs))
    assert all(torch.equal(o, F.relu(F.max_pool2d(x, 2))) for o, x in zip(outs, xs))


@pytest.mark.parametrize("dtype,as_int", [(torch.bfloat16, "int16"), (torch.float32, "int32")])
def test_warm_up_compiles_the_kernels_for_that_dtype(dtype, as_int):
    pooling.warm_up(dtype)
    _, k = pooling._kernels()
    for kernel in (k.pool_relu_forward, k.pool_relu_backward):
        assert any(as_int in str(sig) for sig in kernel.signatures), kernel.signatures
