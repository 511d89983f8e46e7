"""Grad-CAM on a tiny trained model and on every registry model; overlays; the randomisation sanity check."""
import copy
import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from pneumoscope.cli import build_parser
from pneumoscope.inference.loader import load
from pneumoscope.inference.predictor import Predictor
from pneumoscope.models.names import list_models
from pneumoscope.models.registry import create_model
from pneumoscope.trust.explain import (
    explain,
    heatmap,
    heatmaps,
    overlay_png,
    pneumonia_logit,
)


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint):
    return load(tiny_checkpoint, device="cpu")


@pytest.fixture(scope="module")
def images(predictor, chest_xray):
    """6 NORMAL then 6 PNEUMONIA images at the model input size."""
    files = (sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:6]
             + sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:6])
    return np.stack([predictor.prepare(f)[0] for f in files])


def _hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())


@pytest.mark.slow
def test_heatmaps_on_real_images(predictor, images):
    before = predictor.logits(images)
    H = heatmaps(predictor, images)
    assert H.shape == (12, 64, 64) and H.dtype == np.float32
    assert H.min() >= 0.0 and H.max() <= 1.0
    std = H.reshape(12, -1).std(1)
    assert (std > 0.05).sum() >= 3, std  # informative maps, each scaled to a maximum of 1
    assert np.allclose(H[std > 0].reshape((std > 0).sum(), -1).max(1), 1.0)
    # NORMAL and PNEUMONIA images get different maps
    p = 6 + int(np.argmax(std[6:]))
    assert np.abs(H[0] - H[p]).mean() > 0.05
    # the single-image call gives the same map; an image at another size is resized first
    assert np.allclose(heatmap(predictor, images[p]), H[p], atol=1e-5)
    big = np.asarray(Image.fromarray(images[p]).resize((200, 200)))
    assert heatmap(predictor, big).shape == (64, 64)
    # the predictor's model is left as it was: eval mode, no hooks, channels_last, same outputs
    assert not predictor.model.training and _hooks(predictor.model) == 0
    assert predictor.model.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.array_equal(predictor.logits(images), before)


@pytest.mark.slow
def test_randomised_model_changes_the_maps(predictor, images):
    """Adebayo et al. 2018: a map that survives re-initialising the weights explains the input, not the model.

    Rank (Spearman) correlation between the maps of the trained and a re-initialised model, over the images whose
    trained map is informative: a map driven by the learned weights has a mean near 0; an edge detector near 1.
    """
    H = heatmaps(predictor, images)
    rand = copy.copy(predictor)
    rand.model = copy.deepcopy(predictor.model)
    torch.manual_seed(0)
    for m in rand.model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    R = heatmaps(rand, images)
    idx = [i for i in range(len(H)) if H[i].std() > 0.05]
    rho = [0.0 if R[i].std() == 0 else float(spearmanr(H[i].ravel(), R[i].ravel())[0]) for i in idx]
    assert len(idx) >= 3
    assert np.mean(rho) < 0.5, rho
    assert np.mean([np.abs(H[i] - R[i]).mean() for i in idx]) > 0.1


@pytest.mark.parametrize("name", list_models())
def test_every_registry_model_gives_a_map(name, chest_xray):
    torch.manual_seed(0)
    model = create_model(name, image_size=64).eval().to(memory_format=torch.channels_last)
    pred = Predictor(model=model, preprocess=model.preprocess, label_names=("NORMAL", "PNEUMONIA"), threshold=0.5,
                     temperature=None)
    img = pred.prepare(sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[0])[0]
    h = heatmap(pred, img)
    assert h.shape == (64, 64) and h.dtype == np.float32 and np.isfinite(h).all()
    assert 0.0 <= h.min() and h.max() <= 1.0
    assert not model.training and _hooks(model) == 0


def test_ternary_model_explains_the_pneumonia_log_odds(chest_xray):
    torch.manual_seed(0)
    model = create_model("seed_cnn", num_classes=3, image_size=64).eval()
    x = torch.randn(4, 1, 64, 64)
    with torch.no_grad():
        z = model(x)
        lo = pneumonia_logit(model)(x)
    assert lo.shape == (4, 1)
    assert torch.allclose(torch.sigmoid(lo[:, 0]), 1 - torch.softmax(z, 1)[:, 0], atol=1e-6)
    pred = Predictor(model=model, preprocess=model.preprocess, label_names=("NORMAL", "BACTERIAL", "VIRAL"),
                     threshold=0.5, temperature=None)
    img = pred.prepare(sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[0])[0]
    assert heatmap(pred, img).shape == (64, 64)
    assert heatmap(pred, img, class_idx=2).shape == (64, 64)


def test_overlay_png_has_the_image_size():
    img = np.tile(np.linspace(0, 255, 150, dtype=np.uint8), (100, 1))  # 100 x 150, not square
    heat = np.zeros((64, 64), np.float32)
    heat[:, 32:] = 1.0
    png = Image.open(io.BytesIO(overlay_png(img, heat, alpha=0.4)))
    assert png.format == "PNG" and png.mode == "RGB" and png.size == (150, 100)
    a = np.asarray(png).astype(int)
    # jet: 0 -> dark blue, 1 -> dark red; 40 % colour over 60 % grey
    assert a[50, 5, 2] > a[50, 5, 0] and a[50, 145, 0] > a[50, 145, 2]
    assert abs(a[50, 0, 1] - round(0.6 * img[50, 0])) <= 2  # jet(0) has no green
    with pytest.raises(ValueError):
        overlay_png(img.astype(np.float32), heat)


@pytest.mark.slow
def test_explain_writes_one_captioned_overlay_per_film_labelled_pneumonia(tiny_checkpoint, chest_xray, tmp_path):
    from pneumoscope.inference.loader import load

    files = sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:4] + \
        sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:4]
    labels = [r.label for r in load(tiny_checkpoint, device="cpu").predict(files)]
    shown = [f for f, label in zip(files, labels) if label == "PNEUMONIA"]
    assert shown and len(shown) < len(files)  # both kinds in the sample
    written = explain(tiny_checkpoint, files, tmp_path / "out", device="cpu")
    assert [p.name for p in written] == [f"{f.stem}_gradcam.png" for f in shown]  # none for NORMAL (HEATMAP_RULE)
    for p, f in zip(written, shown):
        with Image.open(p) as im, Image.open(f) as orig:
            assert im.width == orig.width and im.height > orig.height and im.mode == "RGB"  # + the caption band
            band = np.asarray(im)[orig.height:]
            assert band.max() > 200 and (band[..., 0].astype(int) - band[..., 2]).max() > 100  # text, red legend end
    # the sub-command
    args = build_parser().parse_args(["explain", "--checkpoint", str(tiny_checkpoint), str(shown[0]), "--out",
                              str(tmp_path / "cli"), "--device", "cpu"])
    assert args.func(args) == 0
    assert (tmp_path / "cli" / f"{shown[0].stem}_gradcam.png").stat().st_size > 0


def test_closed_form_grad_cam_equals_monai_on_the_default_model(chest_xray, tmp_path, monkeypatch):
    """The service's fast path (trust.explain.closed_form): the same maps as MONAI's GradCAM, without a backward
    pass; a model of another shape (seed_cnn) keeps MONAI's."""
    from pneumoscope.data.intake import load_uint8
    from pneumoscope.inference.loader import load
    from pneumoscope.trust import explain as E

    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path))
    pred = load(None, device="cpu")
    u8 = np.stack([load_uint8(f, 224) for f in sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:6]])
    fast = E.closed_form(pred)
    assert fast is not None
    got = heatmaps(pred, u8)
    monkeypatch.setattr(E, "closed_form", lambda p: None)
    want = heatmaps(pred, u8)
    # ONNX Runtime's activations differ from PyTorch's by ~1e-4; an activation that close to 0 or 6 flips its ReLU6
    # gate (1 of 376,320 on these films with the Lite2 default), moving that map by < 1e-3 of its range
    per_map = np.abs(got - want).reshape(len(u8), -1).max(1)
    assert np.median(per_map) <= 1e-5 and per_map.max() <= 2e-3, per_map
    assert got.max() == 1.0 and got.shape == (6, 224, 224)


def test_closed_form_is_only_for_models_of_its_shape(tiny_checkpoint):
    from pneumoscope.inference.loader import load
    from pneumoscope.trust.explain import closed_form

    assert closed_form(load(tiny_checkpoint, device="cpu")) is None  # seed_cnn: MONAI's GradCAM
