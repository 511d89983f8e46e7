"""Intensity standardisation (data/intensity.py): the function, the Preprocess field, and train == Predictor == ONNX."""
import dataclasses

import numpy as np
import pytest

from pneumoscope.config import resolve
from pneumoscope.data.intake import load_uint8
from pneumoscope.data.intensity import standardise
from pneumoscope.errors import ConfigError
from pneumoscope.models.names import parse_trainable
from pneumoscope.models.preprocess import Preprocess
from pneumoscope.models.registry import create_model
from pneumoscope.models.weights import apply_trainable
from tests.conftest import TINY


def real_images(chest_xray, n_each=3, size=64):
    paths = (sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:n_each]
             + sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:n_each])
    return [str(p) for p in paths], np.stack([load_uint8(p, size) for p in paths])


@pytest.mark.parametrize("method", ["equalize", "clahe"])
def test_standardise_spreads_a_low_contrast_histogram(chest_xray, method):
    _, imgs = real_images(chest_xray)
    low = (100 + imgs.astype(np.float32) / 255 * 40).astype(np.uint8)  # squeezed into 100..140
    out = standardise(low, method)
    assert out.shape == low.shape and out.dtype == np.uint8
    assert (np.ptp(out, axis=(1, 2)) > 2 * np.ptp(low, axis=(1, 2))).all()
    assert out.std() > 2 * low.std()
    np.testing.assert_array_equal(out, standardise(low, method))  # deterministic
    np.testing.assert_array_equal(standardise(low[:, None], method)[:, 0], out)  # (N, 1, H, W) same numbers
    np.testing.assert_array_equal(standardise(low[2:3], method)[0], out[2])  # per image: batch-independent


def test_standardise_none_blank_and_errors():
    x = np.full((2, 16, 16), 7, np.uint8)
    assert standardise(x, "none") is x
    np.testing.assert_array_equal(standardise(x, "clahe"), x)  # blank image: unchanged, no division by zero
    with pytest.raises(ValueError):
        standardise(x, "bogus")
    with pytest.raises(ValueError):
        standardise(x.astype(np.float32), "clahe")


def test_preprocess_round_trips_with_and_without_intensity():
    p = Preprocess(64, 1, (0.5,), (0.25,))
    assert p.intensity == "none" and Preprocess.from_dict(p.to_dict()) == p
    assert "intensity" not in p.to_dict()  # default: the dict is exactly the pre-intensity one
    q = dataclasses.replace(p, intensity="clahe")
    assert q.to_dict()["intensity"] == "clahe" and Preprocess.from_dict(q.to_dict()) == q
    old = {"input_size": 64, "channels": 1, "mean": [0.5], "std": [0.25]}  # a checkpoint from before the field
    assert Preprocess.from_dict(old).intensity == "none"
    with pytest.raises(ConfigError):
        Preprocess(64, 1, (0.5,), (0.25,), intensity="bogus")
    m = create_model("seed_cnn", image_size=64, intensity="equalize")
    assert m.preprocess.intensity == "equalize" and "intensity" not in m.arch


def test_config_keys_validated(tmp_path):
    assert resolve({"data": str(tmp_path), "intensity": "clahe"}).intensity == "clahe"
    with pytest.raises(ConfigError, match="intensity"):
        resolve({"data": str(tmp_path), "intensity": "hist"})
    with pytest.raises(ConfigError, match="trainable"):
        resolve({"data": str(tmp_path), "trainable": "last:0"})
    assert parse_trainable("all") is None and parse_trainable("head") == 0 and parse_trainable("last:3") == 3


def test_apply_trainable_freezes_all_but_the_last_stages():
    m = create_model("efficientnet_lite0", image_size=64)
    frozen = apply_trainable(m, "last:2")  # the last MBConv block + the conv head train
    assert len(frozen) == 16  # stem + 15 of the 16 blocks
    assert not any(p.requires_grad for p in m.backbone._blocks[14].parameters())
    assert all(p.requires_grad for p in m.backbone._blocks[15].parameters())
    assert all(p.requires_grad for p in m.backbone._conv_head.parameters())
    assert all(p.requires_grad for p in m.head.parameters())
    assert apply_trainable(create_model("seed_cnn", image_size=64), "all") == []


@pytest.fixture(scope="module")
def clahe_checkpoint(chest_xray, tmp_path_factory):
    from pneumoscope.training.loop import train

    out = tmp_path_factory.mktemp("clahe")
    train(dict(TINY, data=str(chest_xray), out=str(out), epochs=1, intensity="clahe"))
    return out / "best.pt"


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore:The tensor attributes:UserWarning")
def test_clahe_checkpoint_predictor_equals_onnx(clahe_checkpoint, chest_xray, tmp_path):
    from pneumoscope.inference.loader import load
    from pneumoscope.inference.onnx import OnnxBackend, export_onnx, load_onnx_predictor
    from pneumoscope.models.checkpoint import load_checkpoint

    ckpt = load_checkpoint(clahe_checkpoint)
    assert ckpt["preprocess"]["intensity"] == "clahe" and ckpt["config"]["intensity"] == "clahe"
    torch_pred = load(clahe_checkpoint, device="cpu", backend="torch")  # the PyTorch path, against the ONNX file
    assert torch_pred.preprocess.intensity == "clahe"
    onnx_path = export_onnx(clahe_checkpoint, tmp_path / "m.onnx")
    assert OnnxBackend(onnx_path).preprocess.intensity == "clahe"  # stored in the ONNX metadata
    paths, _ = real_images(chest_xray)
    want = torch_pred.predict(paths)
    got = load_onnx_predictor(onnx_path).predict(paths)
    np.testing.assert_allclose([g.calibrated_probability for g in got], [w.calibrated_probability for w in want],
                               rtol=0, atol=1e-5)
    assert [g.label for g in got] == [w.label for w in want]
    # the standardisation is really applied: the same weights without it give other logits
    batch = np.stack([torch_pred.prepare(p)[0] for p in paths])
    plain = dataclasses.replace(torch_pred, preprocess=dataclasses.replace(torch_pred.preprocess, intensity="none"))
    assert np.abs(plain.logits(batch) - torch_pred.logits(batch)).max() > 1e-4
    np.testing.assert_allclose(plain.logits(standardise(batch, "clahe")), torch_pred.logits(batch), atol=1e-5)
