"""Tests for the model registry (pneumoscope/models.py). CPU, small image sizes."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from pneumoscope.errors import CheckpointError, ConfigError
from pneumoscope.models.efficientnet import efficientnet_lite0_imagenet
from pneumoscope.models.names import list_models
from pneumoscope.models.pooling import MaxPoolReLU
from pneumoscope.models.preprocess import (
    EFFNET_LITE_RGB_MEAN,
    EFFNET_LITE_RGB_STD,
    Preprocess,
)
from pneumoscope.models.registry import create_model, load_weights, rebuild
from pneumoscope.models.weights import (
    fold_rgb_stem,
    param_groups,
    set_backbone_trainable,
)

# Small sizes keep the file fast (seed_cnn's minimum is 46 px, densenet121's 32 px).
SMALL = {"seed_cnn": 64, "cnn_rnn": 64, "efficientnet_lite0": 64, "efficientnet_lite1": 64, "efficientnet_lite2": 64,
         "densenet121": 32, "resnet18": 64}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny batches gain nothing from 2 OpenMP threads, and on a busy machine the thread barriers make
    them many times slower; restored afterwards for the other test files."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _first_conv(model: nn.Module) -> nn.Conv2d:
    return next(m for m in model.modules() if isinstance(m, nn.Conv2d))


def _out_linear(model: nn.Module) -> nn.Linear:
    return [m for m in model.head.modules() if isinstance(m, nn.Linear)][-1]


def _batch(model: nn.Module, n: int = 2, seed: int = 0) -> torch.Tensor:
    s = model.preprocess.input_size
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, s, s, generator=g)


def test_registry_lists_all_models():
    assert list_models() == ["cnn_rnn", "densenet121", "efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2",
                             "resnet18", "seed_cnn"]
    assert set(SMALL) == set(list_models())


@pytest.mark.parametrize("name", list_models())
@pytest.mark.parametrize("num_classes", [1, 3])
def test_forward_backward(name, num_classes):
    torch.manual_seed(0)
    model = create_model(name, num_classes=num_classes, image_size=SMALL[name])
    model.train()
    y = model(_batch(model))
    assert y.shape == (2, num_classes)
    assert y.dtype == torch.float32 and torch.isfinite(y).all()
    y.square().sum().backward()
    first, last = _first_conv(model), _out_linear(model)
    assert first.in_channels == 1
    assert last.out_features == num_classes
    assert first.weight.grad is not None and first.weight.grad.abs().sum() > 0
    assert last.weight.grad is not None and last.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", list_models())
def test_attributes_and_rebuild_round_trip(name):
    torch.manual_seed(1)
    model = create_model(name, num_classes=3, image_size=SMALL[name]).eval()
    arch = json.loads(json.dumps(model.arch))  # JSON-serialisable
    assert arch == model.arch
    assert arch["name"] == name and arch["num_classes"] == 3 and arch["image_size"] == SMALL[name]
    p = model.preprocess
    assert isinstance(p, Preprocess) and p.channels == 1 and p.input_size == SMALL[name]
    assert Preprocess.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert isinstance(model.backbone, nn.Module) and isinstance(model.head, nn.Module)
    assert model.gradcam_layer in dict(model.named_modules())

    torch.manual_seed(2)
    other = rebuild(arch).eval()
    x = _batch(model)
    with torch.no_grad():
        assert not torch.allclose(other(x), model(x))  # different random init before loading
        other.load_state_dict(model.state_dict())
        assert torch.equal(other(x), model(x))
    assert other.arch == model.arch and other.preprocess == model.preprocess


@pytest.mark.parametrize("name", list_models())
def test_gradcam_layer_works_with_monai(name):
    from monai.visualize import GradCAM

    torch.manual_seed(0)
    model = create_model(name, image_size=64)  # >= 2x2 target maps for every model
    cam = GradCAM(nn_module=model, target_layers=model.gradcam_layer)
    x = _batch(model)
    heat = cam(x)
    assert heat.shape == x.shape
    assert torch.isfinite(heat).all() and heat.min() >= 0 and heat.max() <= 1


def test_preprocess_defaults():
    assert create_model("seed_cnn").preprocess == Preprocess(150, 1, (0.5,), (0.25,))
    for name in ("efficientnet_lite0", "densenet121", "resnet18"):
        assert create_model(name).preprocess.to_dict() == {"input_size": 224, "channels": 1,
                                                          "mean": [0.449], "std": [0.226]}
    assert create_model("cnn_rnn").preprocess.input_size == 224
    with pytest.raises(ConfigError, match="one value per channel"):
        Preprocess(224, 1, (0.4, 0.5), (0.2,))


# ---- seed_cnn --------------------------------------------------------------------------------------


def test_seed_cnn_structure_and_flatten_size():
    model = create_model("seed_cnn")
    kinds = [type(m) for m in model.modules()]
    assert kinds.count(nn.Conv2d) == 4 and kinds.count(MaxPoolReLU) == 4 and kinds.count(nn.Linear) == 3
    names = [n for n, _ in model.backbone.named_children()]
    assert names[:3] == ["conv1", "pool1", "conv2"]  # each conv followed by 2x2 max-pooling (+ ReLU)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [32, 64, 128, 128]
    assert all(c.kernel_size == (3, 3) and c.padding == (0, 0) for c in convs)  # Keras 'valid'
    # 150 -conv-> 148 -pool-> 74 -> 72 -> 36 -> 34 -> 17 -> 15 -> 7: 128 * 7 * 7
    assert model.flatten_size == 6272
    lin = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in lin] == [(6272, 128), (128, 64), (64, 1)]
    assert model.backbone(torch.zeros(1, 1, 150, 150)).shape == (1, 6272)
    assert model.head.drop.p == 0.5


def test_seed_cnn_channels_last_bf16_autocast():
    torch.manual_seed(0)
    model = create_model("seed_cnn", image_size=64).eval()
    x = _batch(model, 4)
    with torch.no_grad():
        ref = model(x)
        model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = model(x.to(memory_format=torch.channels_last))
    assert y.shape == (4, 1) and torch.isfinite(y).all()
    assert torch.allclose(y.float(), ref, atol=0.05, rtol=0.05)


# ---- cnn_rnn ---------------------------------------------------------------------------------------


def test_cnn_rnn_gru_receives_gradients():
    torch.manual_seed(0)
    model = create_model("cnn_rnn", image_size=64)
    assert isinstance(model.head.gru, nn.GRU) and model.head.gru.bidirectional and model.head.gru.hidden_size == 128
    model(_batch(model)).sum().backward()
    for name, p in model.head.gru.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_cnn_rnn_learns_top_vs_bottom():
    """Bright lower half (label 1) vs bright upper half (label 0): the row order carries the label."""
    torch.manual_seed(0)
    model = create_model("cnn_rnn", image_size=32, dropout=0.0)
    n, s = 16, 32
    x = torch.rand(n, 1, s, s) * 0.2
    y = torch.tensor([i % 2 for i in range(n)], dtype=torch.float32)
    for i in range(n):
        rows = slice(s // 2, s) if y[i] else slice(0, s // 2)
        x[i, :, rows] += 0.8
    x = (x - 0.5) / 0.25
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss_fn = nn.BCEWithLogitsLoss()
    losses = []
    for _ in range(10):
        opt.zero_grad()
        loss = loss_fn(model(x)[:, 0], y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


# ---- efficientnet_lite0 ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet_imagenet():
    return efficientnet_lite0_imagenet()


def _chelsea_rgb(size: int = 224) -> torch.Tensor:
    from PIL import Image
    from skimage import data

    img = Image.fromarray(data.chelsea()).resize((size, size), Image.BILINEAR)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def test_efficientnet_imagenet_weights_classify_a_cat(effnet_imagenet):
    p = effnet_imagenet.preprocess
    assert p.channels == 3 and p.input_size == 224
    assert effnet_imagenet._conv_stem.weight.shape == (32, 3, 3, 3) and effnet_imagenet._fc.out_features == 1000
    x = (_chelsea_rgb() - torch.tensor(p.mean)[:, None, None]) / torch.tensor(p.std)[:, None, None]
    with torch.no_grad():
        prob = effnet_imagenet(x).softmax(1)[0]
    top1 = int(prob.argmax())
    assert 281 <= top1 <= 285, top1  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert prob[281:286].sum() > 0.8


@pytest.mark.parametrize("name", ["efficientnet_lite1", "efficientnet_lite2"])
def test_larger_lites_load_their_own_imagenet_weights_and_see_the_cat(name):
    """The grey model with the 1000-class head: the packaged weights of Lite1/Lite2 (not Lite0's) are loaded, folded
    to one channel, and still name the cat of a grey photo."""
    model = create_model(name, pretrained=True, num_classes=1000).eval()
    assert len(model.backbone._blocks) == 21 and model.arch["name"] == name
    z = (_chelsea_rgb().mean(1, keepdim=True) - 0.449) / 0.226
    with torch.no_grad():
        prob = model(z).softmax(1)[0]
    assert 281 <= int(prob.argmax()) <= 285 and prob[281:286].sum() > 0.5
    assert not torch.equal(create_model(name).backbone._conv_head.weight, model.backbone._conv_head.weight)


def test_efficientnet_grey_stem_is_folded_pretrained(effnet_imagenet):
    model = create_model("efficientnet_lite0", pretrained=True).eval()
    w3 = effnet_imagenet._conv_stem.weight.detach()
    expected = (w3 * (0.226 / torch.tensor(EFFNET_LITE_RGB_STD))[None, :, None, None]).sum(1, keepdim=True)
    w1 = model.backbone._conv_stem.weight.detach()
    assert w1.shape == (32, 1, 3, 3)
    assert torch.allclose(w1, expected, atol=1e-6)
    random_init = create_model("efficientnet_lite0").backbone._conv_stem.weight
    assert not torch.allclose(w1, random_init)
    # deeper layers are the ImageNet ones too; the new head is not
    assert torch.equal(model.backbone._conv_head.weight, effnet_imagenet._conv_head.weight)
    assert model.head.fc.weight.shape == (1, 1280)


def test_efficientnet_fold_equals_rgb_model_on_grey_input(effnet_imagenet):
    """Grey z through the folded stem == grey replicated to RGB with the RGB normalisation (away from the
    zero-padded bottom/right border), and the full 1000-class model gives nearly the same logits."""
    grey = create_model("efficientnet_lite0", pretrained=True, num_classes=1000).eval()
    g = _chelsea_rgb().mean(1, keepdim=True)  # grey image in [0, 1]
    z = (g - 0.449) / 0.226
    x_rgb = (g.expand(-1, 3, -1, -1) - torch.tensor(EFFNET_LITE_RGB_MEAN)[:, None, None]) / torch.tensor(
        EFFNET_LITE_RGB_STD)[:, None, None]
    with torch.no_grad():
        a = grey.backbone._bn0(grey.backbone._conv_stem(z))
        b = effnet_imagenet._bn0(effnet_imagenet._conv_stem(x_rgb))
        assert torch.allclose(a[..., :-1, :-1], b[..., :-1, :-1], atol=1e-4)
        la, lb = grey(z)[0], effnet_imagenet(x_rgb)[0]
    assert la.argmax() == lb.argmax()
    assert torch.corrcoef(torch.stack([la, lb]))[0, 1] > 0.99


def test_fold_rgb_stem_plain_sum():
    w = torch.randn(4, 3, 3, 3)
    w1, offset = fold_rgb_stem(w)
    assert torch.allclose(w1, w.sum(1, keepdim=True)) and torch.equal(offset, torch.zeros(4))
    with pytest.raises(CheckpointError, match="2 input channels"):
        fold_rgb_stem(torch.randn(4, 2, 3, 3))


# ---- weights=PATH ----------------------------------------------------------------------------------


def test_resnet18_weights_path_round_trip(tmp_path):
    torch.manual_seed(0)
    src = create_model("resnet18", num_classes=3, image_size=64).eval()
    path = tmp_path / "r18.pt"
    torch.save(src.state_dict(), path)
    torch.manual_seed(1)
    dst = create_model("resnet18", num_classes=3, image_size=64, weights=str(path)).eval()
    x = _batch(src)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))
    # wrapped {"state_dict": ...} and DataParallel "module." prefixes load too
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}, "epoch": 3}, path)
    with torch.no_grad():
        assert torch.equal(create_model("resnet18", num_classes=3, image_size=64, weights=path).eval()(x), src(x))
    # another num_classes: everything but the output layer loads
    dst1 = create_model("resnet18", num_classes=1, image_size=64, weights=path)
    assert torch.equal(dst1.backbone.layer4[1].conv2.weight, src.backbone.layer4[1].conv2.weight)
    assert dst1.head.fc.weight.shape == (1, 512)


def test_resnet18_weights_errors_list_keys_and_shapes(tmp_path):
    sd = create_model("resnet18", image_size=64).state_dict()
    bad = dict(sd)
    del bad["backbone.layer2.0.bn1.running_var"]
    bad["backbone.layer3.0.conv1.weight"] = torch.zeros(7, 128, 3, 3)
    bad["backbone.extra.weight"] = torch.zeros(1)
    path = tmp_path / "bad.pth"
    torch.save(bad, path)
    with pytest.raises(CheckpointError) as e:
        create_model("resnet18", image_size=64, weights=path)
    msg = str(e.value)
    assert str(path) in msg
    assert "missing keys: backbone.layer2.0.bn1.running_var" in msg
    assert "unexpected keys: backbone.extra.weight" in msg
    assert "backbone.layer3.0.conv1.weight: file (7, 128, 3, 3) vs model (256, 128, 3, 3)" in msg

    missing = tmp_path / "nope" / "weights.pt"
    with pytest.raises(CheckpointError, match=str(missing)):
        create_model("resnet18", weights=missing)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="garbage.pt"):
        create_model("resnet18", weights=garbage)


def test_resnet18_raw_monai_rgb_weights_are_folded_by_sum(tmp_path):
    """A 3-channel MONAI ResNet-18 state_dict (original keys, fc.*) loads: the stem is summed, which is
    exact for a grey image replicated to RGB."""
    from monai.networks.nets import resnet18

    torch.manual_seed(0)
    raw = resnet18(spatial_dims=2, n_input_channels=3, num_classes=2, conv1_t_stride=2,
                   bias_downsample=False).eval()
    path = tmp_path / "raw.pth"
    torch.save({"model": raw.state_dict()}, path)
    model = create_model("resnet18", num_classes=2, image_size=64, weights=path).eval()
    assert torch.allclose(model.backbone.conv1.weight, raw.conv1.weight.sum(1, keepdim=True))
    x = _batch(model)
    with torch.no_grad():
        assert torch.allclose(model(x), raw(x.expand(-1, 3, -1, -1)), atol=1e-4)


def test_densenet121_torchvision_layout_loads(tmp_path):
    """torchvision key names (denselayerN.norm1, classifier.*) are mapped to MONAI's layout."""
    torch.manual_seed(0)
    src = create_model("densenet121", num_classes=2, image_size=32).eval()
    tv = {}
    for k, v in src.state_dict().items():
        k = k.removeprefix("backbone.").replace(".layers.", ".")
        tv[k.replace("head.fc.", "classifier.")] = v
    assert "features.denseblock1.denselayer1.norm1.weight" in tv and "classifier.weight" in tv
    path = tmp_path / "tv.pth"
    torch.save(tv, path)
    dst = load_weights(create_model("densenet121", num_classes=2, image_size=32), path).eval()
    x = _batch(src)
    with torch.no_grad():
        assert torch.equal(dst(x), src(x))


# ---- config errors and fine-tuning helpers -----------------------------------------------------------


def test_config_errors():
    with pytest.raises(ConfigError, match="known models: cnn_rnn, densenet121"):
        create_model("vgg16")
    with pytest.raises(ConfigError, match="minimum is 46"):
        create_model("seed_cnn", image_size=0)
    with pytest.raises(ConfigError, match="minimum is 46"):
        create_model("seed_cnn", image_size=45)
    create_model("seed_cnn", image_size=46)(torch.zeros(1, 1, 46, 46))  # the minimum works
    with pytest.raises(ConfigError, match="minimum is 16"):
        create_model("cnn_rnn", image_size=8)
    with pytest.raises(ConfigError, match="minimum is 32"):
        create_model("resnet18", image_size=0)
    with pytest.raises(ConfigError, match="num_classes"):
        create_model("resnet18", num_classes=0)
    with pytest.raises(ConfigError, match="unknown argument"):
        create_model("resnet18", depth=50)
    with pytest.raises(ConfigError, match="no packaged pretrained weights"):
        create_model("densenet121", pretrained=True)
    with pytest.raises(ConfigError, match="dropout"):
        create_model("seed_cnn", dropout=1.5)


def test_param_groups_and_frozen_backbone():
    model = create_model("seed_cnn", image_size=64)
    groups = param_groups(model, lr=1e-3, backbone_lr_mult=0.1)
    assert [g["name"] for g in groups] == ["backbone", "head"]
    assert groups[0]["lr"] == pytest.approx(1e-4) and groups[1]["lr"] == pytest.approx(1e-3)
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in groups for p in g["params"]) == n_all
    assert len(groups[0]["params"]) == 8 and len(groups[1]["params"]) == 6  # 4 convs, 3 linears (w, b)

    set_backbone_trainable(model, False)
    assert not any(p.requires_grad for p in model.backbone.parameters())
    assert all(p.requires_grad for p in model.head.parameters())
    opt = torch.optim.SGD(groups, lr=1e-3)
    before = model.backbone.conv1.weight.clone()
    model(_batch(model)).sum().backward()
    opt.step()
    assert torch.equal(model.backbone.conv1.weight, before) and model.backbone.conv1.weight.grad is None
    set_backbone_trainable(model, True)
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ConfigError):
        param_groups(model, lr=0, backbone_lr_mult=0.1)


def test_layer_decay_gives_each_backbone_stage_a_geometric_learning_rate():
    """layer_decay < 1: one group per backbone stage (EfficientNet: stem, each block, conv head), the last stage at
    lr * backbone_lr_mult, each earlier one layer_decay times its successor; every parameter in exactly one group."""
    from pneumoscope.models.weights import backbone_stages

    model = create_model("efficientnet_lite0", pretrained=False)
    groups = param_groups(model, lr=1e-3, backbone_lr_mult=0.5, layer_decay=0.8)
    n = len(backbone_stages(model))
    assert [g["name"] for g in groups] == [f"backbone.{i}" for i in range(n)] + ["head"]
    assert groups[-1]["lr"] == pytest.approx(1e-3) and groups[-2]["lr"] == pytest.approx(5e-4)
    for earlier, later in zip(groups[:-2], groups[1:-1]):
        assert earlier["lr"] == pytest.approx(0.8 * later["lr"])
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    assert [g["name"] for g in param_groups(model, 1e-3, 0.5, layer_decay=1.0)] == ["backbone", "head"]
    for bad in (0.0, 1.5):
        with pytest.raises(ConfigError, match="layer_decay"):
            param_groups(model, 1e-3, 0.5, layer_decay=bad)


def test_efficientnet_batchnorm_statistics_follow_training():
    """With the package's momentum (0.01) eval-mode BN statistics lag far behind a few training steps; 0.1 does not."""
    torch.manual_seed(0)
    x = 0.3 + 0.05 * torch.randn(8, 1, 64, 64)  # far from the init statistics (mean 0, var 1)
    lag = {}
    for mom in (0.01, 0.1):
        m = create_model("efficientnet_lite0", image_size=64, bn_momentum=mom)
        assert {b.momentum for b in m.modules() if isinstance(b, torch.nn.BatchNorm2d)} == {mom}
        m.train()
        with torch.no_grad():
            for _ in range(20):
                m(x)
        bn0 = m.backbone._bn0
        with torch.no_grad():
            feats = m.backbone._conv_stem(x)
        lag[mom] = (bn0.running_mean - feats.mean(dim=(0, 2, 3))).abs().mean().item()
    assert lag[0.1] < 0.25 * lag[0.01]
    assert create_model("efficientnet_lite0", image_size=64).backbone._bn0.momentum == 0.1  # the default


def test_default_input_sizes_are_known_without_torch():
    """config.DEFAULT_INPUT_SIZE (read by `pneumoscope train` before torch is imported) is the registry's."""
    from pneumoscope.models.names import DEFAULT_INPUT_SIZE, list_models
    from pneumoscope.models.registry import _REGISTRY

    assert sorted(DEFAULT_INPUT_SIZE) == list_models()
    assert {k: s.default_size for k, s in _REGISTRY.items()} == DEFAULT_INPUT_SIZE
    assert create_model("seed_cnn").preprocess.input_size == DEFAULT_INPUT_SIZE["seed_cnn"]
