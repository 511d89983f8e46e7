"""Test-time views that travel with a model (inference/tta.py): the view itself on generated images, and one trained
tiny model whose training validation, ``Predictor`` (both backends, batched or alone) and exported ONNX file all
average the same views."""
import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pneumoscope.config import parse_tta
from pneumoscope.errors import ConfigError
from pneumoscope.inference.tta import WithViews, centre_crop, with_views


def test_centre_crop_zooms_in_keeps_the_size_and_commutes_with_normalisation():
    img = torch.zeros(2, 1, 100, 100)
    img[..., 10:90, 10:90] = 200.0  # a 10 px black frame around a bright film
    out = centre_crop(img)
    assert out.shape == img.shape
    assert (img == 0).float().mean() == pytest.approx(0.36) and 0.15 < (out < 1).float().mean() < 0.25  # 5 px cut
    assert out[..., 45:55, 45:55].min() == pytest.approx(200.0)
    z = (img / 255 - 0.449) / 0.226  # a view of the normalised input = the normalised view of the image
    assert torch.allclose(centre_crop(z), (out / 255 - 0.449) / 0.226, atol=1e-5)


def test_with_views_averages_one_batch_and_names_are_checked():
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
    x = torch.randn(3, 1, 32, 32)
    assert with_views(net, "") is net and with_views(net, ()) is net
    m = with_views(net, "crop90")
    assert isinstance(m, WithViews) and m.views == ("crop90",)
    with torch.no_grad():
        assert torch.allclose(m(x), (net(x) + net(centre_crop(x))) / 2, atol=1e-6)
    assert parse_tta("crop90") == ("crop90",) and parse_tta(["crop90"]) == ("crop90",)
    with pytest.raises(ConfigError, match="tta='flip'.*crop90"):
        parse_tta("flip")


@pytest.fixture(scope="module")
def tta_run(chest_xray, tmp_path_factory):
    from pneumoscope.training.loop import train

    out = tmp_path_factory.mktemp("tta")
    m = train(dict(model="seed_cnn", image_size=64, limit=120, batch_size=16, epochs=1, threads=2, progress=False,
                   seed=5, tta="crop90", precision="fp32", data=str(chest_xray), out=str(out)))
    return out / "best.pt", m


def test_a_tta_model_predicts_as_it_was_validated(tta_run, chest_xray, tmp_path, monkeypatch):
    from pneumoscope.config import resolve
    from pneumoscope.data.splits import split_samples
    from pneumoscope.inference.loader import load
    from pneumoscope.inference.onnx import export_onnx

    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path / "cache"))
    best, m = tta_run
    fast, slow = load(best, device="cpu"), load(best, device="cpu", backend="torch")
    assert fast.tta == slow.tta == ("crop90",) and fast.backend is not None
    _, val, _, _ = split_samples(resolve(dict(model="seed_cnn", image_size=64, limit=120, seed=5, data=str(chest_xray))))
    paths = [s.path for s in val]
    u8 = np.stack([fast.prepare(p)[0] for p in paths])
    np.testing.assert_allclose(fast.logits(u8), slow.logits(u8), atol=1e-4)  # the views are inside the ONNX graph
    plain = dataclasses.replace(slow, tta=()).logits(u8)
    assert np.abs(slow.logits(u8) - plain).max() > 1e-3  # and they change the answer
    p = [r.probability for r in fast.predict(paths)]
    assert roc_auc_score([int(s.label > 0) for s in val], p) == pytest.approx(m["val_auc"], abs=1e-6)
    alone = [fast.predict([q])[0].probability for q in paths[:5]]
    np.testing.assert_allclose(alone, p[:5], atol=1e-5)
    onnx = load(export_onnx(best, tmp_path / "m.onnx"))  # the exported file computes the views itself
    assert onnx.tta == ("crop90",)
    np.testing.assert_allclose(onnx.logits(u8), fast.logits(u8), atol=1e-4)


def test_tta_with_an_intensity_method_is_refused(chest_xray, tmp_path):
    from pneumoscope.training.loop import train

    with pytest.raises(ConfigError, match="tta"):
        train(dict(model="seed_cnn", image_size=64, limit=40, epochs=1, tta="crop90", intensity="clahe",
                   data=str(chest_xray), out=str(tmp_path)))
