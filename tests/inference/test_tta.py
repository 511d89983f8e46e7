"""Test-time views that travel with a model (inference/tta.py): the view itself on generated images, and one trained
tiny model whose training validation, ``Predictor`` (both backends, batched or alone) and exported ONNX file all
average the same views."""
import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from pneumoscope.config import parse_tta
from pneumoscope.errors import ConfigError
from pneumoscope.inference.tta import averaged, centre_crop


def test_centre_crop_zooms_in_and_keeps_size_and_type():
    img = np.zeros((2, 100, 100), np.uint8)
    img[:, 10:90, 10:90] = 200  # a 10 px black frame around a bright film
    out = centre_crop(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    assert (img == 0).mean() == 0.36 and 0.15 < (out == 0).mean() < 0.25  # the 10 px frame: 5 px cut, 5.6 px left
    assert out[:, 45:55, 45:55].min() == 200
    as_tensor = centre_crop(torch.from_numpy(img).unsqueeze(1))  # training's (N, 1, S, S) tensors
    assert isinstance(as_tensor, torch.Tensor) and np.array_equal(as_tensor[:, 0].numpy(), out)


def test_averaged_is_the_mean_over_the_views_and_views_are_checked():
    def fake_logits(u8):
        return np.asarray(u8, np.float32).mean(axis=(1, 2))[:, None]

    img = np.random.default_rng(0).integers(0, 256, (3, 40, 40), dtype=np.uint8)
    assert np.array_equal(averaged(fake_logits, img, ()), fake_logits(img))
    both = averaged(fake_logits, img, ("crop90",))
    np.testing.assert_allclose(both, (fake_logits(img) + fake_logits(centre_crop(img))) / 2, rtol=1e-6)
    assert parse_tta("crop90") == ("crop90",) and parse_tta("") == () and parse_tta(["crop90"]) == ("crop90",)
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
    np.testing.assert_allclose(fast.logits(u8), slow.logits(u8), atol=1e-4)
    plain = fast.backend.logits(u8)
    np.testing.assert_allclose(fast.logits(u8), (plain + fast.backend.logits(centre_crop(u8))) / 2, atol=1e-5)
    assert np.abs(fast.logits(u8) - plain).max() > 1e-3  # the view changes the answer
    p = [r.probability for r in fast.predict(paths)]
    assert roc_auc_score([int(s.label > 0) for s in val], p) == pytest.approx(m["val_auc"], abs=1e-6)
    alone = [fast.predict([q])[0].probability for q in paths[:5]]
    np.testing.assert_allclose(alone, p[:5], atol=1e-5)
    onnx = load(export_onnx(best, tmp_path / "m.onnx"))  # the exported file carries its views
    assert onnx.tta == ("crop90",)
    np.testing.assert_allclose(onnx.logits(u8), fast.logits(u8), atol=1e-4)


def test_tta_with_an_intensity_method_is_refused(chest_xray, tmp_path):
    from pneumoscope.training.loop import train

    with pytest.raises(ConfigError, match="tta"):
        train(dict(model="seed_cnn", image_size=64, limit=40, epochs=1, tta="crop90", intensity="clahe",
                   data=str(chest_xray), out=str(tmp_path)))
