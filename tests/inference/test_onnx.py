"""ONNX export: ONNX Runtime logits equal PyTorch's (fp32) on real images; metadata round-trips; CLI; errors."""
import json

import numpy as np
import pytest
import torch

from pneumoscope.cli import build_parser
from pneumoscope.data.digest import file_digest
from pneumoscope.data.intake import load_uint8
from pneumoscope.errors import CheckpointError
from pneumoscope.inference.loader import load
from pneumoscope.inference.onnx import (
    INPUT_NAME,
    OnnxBackend,
    calibration_images,
    export_model,
    load_onnx_predictor,
)
from pneumoscope.inference.runtime import pneumonia_score
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.models.registry import create_model
from pneumoscope.training.loop import train

# torch.export's own deprecation noise (GRU flat weights, _check_is_size): not ours to fix
pytestmark = [pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:The tensor attributes:UserWarning")]

ATOL = 1e-4  # fp32 logits; the observed difference is ~1e-7 (different conv/GEMM kernels, same arithmetic)


def real_images(chest_xray, n_each=4):
    return ([str(p) for p in sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:n_each]]
            + [str(p) for p in sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:n_each]])


@pytest.fixture(scope="module")
def exported(chest_xray, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("export")
    train(dict(data=str(chest_xray), model="seed_cnn", image_size=64, limit=120, epochs=1, batch_size=16, threads=2,
               progress=False, out=str(tmp)))
    calib = tmp_path_factory.mktemp("calib")  # a small calibration folder: 8 real images of each class
    for cls in ("NORMAL", "PNEUMONIA"):
        (calib / cls).mkdir()
        for p in sorted((chest_xray / "train" / cls).glob("*.jpeg"))[10:18]:
            (calib / cls / p.name).symlink_to(p)
    args = build_parser().parse_args(["export", "--checkpoint", str(tmp / "best.pt"), "--onnx", str(tmp / "model.onnx"),
                              "--int8-calibration", str(calib)])
    assert args.func(args) == 0
    return tmp / "best.pt", tmp / "model.onnx"


def test_onnx_logits_equal_pytorch_on_real_images(exported, chest_xray):
    ckpt, onnx_path = exported
    torch_pred = load(ckpt, device="cpu")
    backend = OnnxBackend(onnx_path)
    batch = np.stack([torch_pred.prepare(p)[0] for p in real_images(chest_xray)])
    assert batch.shape == (8, 64, 64) and batch.dtype == np.uint8
    want = torch_pred.logits(batch)
    got = backend.logits(batch)
    assert got.shape == want.shape == (8, 1) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert np.ptp(want) > 1e-3  # different images give different logits: the comparison means something
    # dynamic batch axis: one image, and (B, 1, S, S) input, give the same numbers
    np.testing.assert_allclose(backend.logits(batch[:1]), want[:1], rtol=0, atol=ATOL)
    np.testing.assert_allclose(backend.logits(batch[:5, None]), want[:5], rtol=0, atol=ATOL)
    # a batch larger than max_batch runs in chunks, same numbers in the same order
    np.testing.assert_allclose(OnnxBackend(onnx_path, max_batch=3).logits(batch), want, rtol=0, atol=ATOL)


def test_metadata_round_trips(exported):
    ckpt_path, onnx_path = exported
    ckpt = load_checkpoint(ckpt_path)
    b = OnnxBackend(onnx_path)
    assert b.preprocess.to_dict() == ckpt["preprocess"]
    assert b.label_names == ("NORMAL", "PNEUMONIA")
    assert b.threshold == pytest.approx(ckpt["threshold"]) and 0 < b.threshold < 1
    assert b.temperature == pytest.approx(ckpt["temperature"]) and b.temperature > 0
    assert b.metadata["arch"] == json.loads(json.dumps(ckpt["arch"]))
    assert b.metadata["source_sha256"] == file_digest(ckpt_path)
    inp = b.session.get_inputs()[0]
    assert inp.name == INPUT_NAME and inp.type == "tensor(uint8)" and inp.shape[1:] == [1, 64, 64]
    assert isinstance(inp.shape[0], str)  # symbolic batch dimension


def test_int8_model_keeps_metadata_and_probabilities(exported, chest_xray):
    ckpt, onnx_path = exported
    fp32, int8 = OnnxBackend(onnx_path), OnnxBackend(onnx_path.with_suffix(".int8.onnx"))
    assert int8.metadata["quantization"]["calibration_images"] == 16
    assert int8.preprocess == fp32.preprocess and int8.threshold == fp32.threshold
    assert int8.temperature == fp32.temperature and int8.metadata["source_sha256"] == file_digest(ckpt)
    assert int8.calibration_bias == fp32.calibration_bias == pytest.approx(load_checkpoint(ckpt)["calibration_bias"])
    batch = np.stack([load_uint8(p, 64) for p in real_images(chest_xray)])
    p32 = pneumonia_score(fp32.logits(batch), fp32.temperature)
    p8 = pneumonia_score(int8.logits(batch), int8.temperature)
    assert np.abs(p8 - p32).max() < 0.05  # int8 rounding; on the fully trained seed_cnn: max 0.025 over 600 images


def test_calibration_images_are_real_and_sized(chest_xray):
    x = calibration_images(chest_xray / "train", 48, n=6)
    assert x.shape == (6, 48, 48) and x.dtype == np.uint8 and x.std() > 10
    with pytest.raises(CheckpointError, match="no image files"):
        calibration_images(chest_xray.parent / "dicom" / "nonexistent", 48)


def test_onnx_predictor_matches_torch_predictor(exported, chest_xray):
    ckpt, onnx_path = exported
    paths = real_images(chest_xray, 3)
    want = load(ckpt, device="cpu").predict(paths)
    got = load_onnx_predictor(onnx_path).predict(paths)
    for w, g in zip(want, got):
        assert g.path == w.path and g.label == w.label and g.threshold == w.threshold
        assert g.probability == pytest.approx(w.probability, abs=1e-5)
        assert g.calibrated_probability == pytest.approx(w.calibrated_probability, abs=1e-5)


@pytest.mark.parametrize("name,size", [("cnn_rnn", 48), ("efficientnet_lite0", 64)])
def test_other_architectures_export(name, size, chest_xray, tmp_path):
    """Random init; BatchNorm statistics set on real images first so the logits differ between images."""
    torch.manual_seed(0)
    model = create_model(name, num_classes=1, image_size=size)
    pre = model.preprocess
    u8 = np.stack([load_uint8(p, size) for p in real_images(chest_xray)])
    x = (torch.from_numpy(u8)[:, None].float() / 255 - pre.mean[0]) / pre.std[0]
    for m in model.modules():  # BatchNorm running statistics = those of these images (cumulative average)
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    model.eval()
    with torch.no_grad():
        want = model(x).numpy()
    path = export_model(model, pre, tmp_path / f"{name}.onnx")
    got = OnnxBackend(path).logits(u8)
    np.testing.assert_allclose(got, want, rtol=0, atol=ATOL)
    assert np.ptp(want) > 1e-4


def test_bad_files_raise_checkpoint_error(tmp_path, exported):
    with pytest.raises(CheckpointError, match="not found"):
        OnnxBackend(tmp_path / "missing.onnx")
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx file")
    with pytest.raises(CheckpointError, match="not a loadable ONNX model"):
        OnnxBackend(bad)
    with pytest.raises(ValueError, match="expected"):
        OnnxBackend(exported[1]).logits(np.zeros((2, 32, 32), np.uint8))


def test_load_predicts_with_onnx_runtime_that_agrees_with_pytorch(tiny_checkpoint, chest_xray, tmp_path, monkeypatch):
    """The default CPU backend (issue 27): exported once per checkpoint into the cache, then reused; logits within
    1e-4 of PyTorch on real films; one image alone and the same image inside a batch agree within 1e-5."""
    import time

    import numpy as np

    from pneumoscope.data.intake import load_uint8
    from pneumoscope.inference import features as F
    from pneumoscope.inference.loader import load

    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path / "cache"))
    fast = load(tiny_checkpoint, device="cpu")
    assert fast.info["backend"] == "onnxruntime" and fast.backend is not None
    assert len(list((tmp_path / "cache" / "onnx").glob("*.onnx"))) == 1
    t0 = time.perf_counter()
    again = load(tiny_checkpoint, device="cpu")  # from the cache: no second export
    assert again.backend.path == fast.backend.path and time.perf_counter() - t0 < 5
    slow = load(tiny_checkpoint, device="cpu", backend="torch")
    assert slow.backend is None and slow.info["backend"] == "pytorch"
    files = sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:9]
    u8 = np.stack([load_uint8(f, fast.preprocess.input_size) for f in files])
    np.testing.assert_allclose(fast.logits(u8), slow.logits(u8), atol=1e-4)
    batched = [r.probability for r in fast.predict(files)]
    alone = [fast.predict([f])[0].probability for f in files]
    np.testing.assert_allclose(batched, alone, atol=1e-5)
    with pytest.raises(Exception, match="backend='gpu' is invalid"):
        load(tiny_checkpoint, backend="gpu")
    # the out-of-distribution features: ONNX Runtime and PyTorch agree
    big = np.stack([load_uint8(f, 224) for f in files])
    ort = F.features(big)
    net = F.extractor()
    torch_feats = net.core(net.prepare(torch.from_numpy(big))).numpy()
    np.testing.assert_allclose(ort, torch_feats, atol=1e-4, rtol=1e-4)


def test_threads_reach_both_onnx_runtime_sessions(tiny_checkpoint, chest_xray, tmp_path, monkeypatch):
    """``load(threads=N)`` (``serve --threads``) sets the intra-op threads of the model's session and of the OOD
    features' session; the answers do not depend on it."""
    import numpy as np

    from pneumoscope.data.intake import load_uint8
    from pneumoscope.inference import features as F
    from pneumoscope.inference.loader import load

    monkeypatch.setenv("PNEUMOSCOPE_CACHE", str(tmp_path / "cache"))
    one, default = load(tiny_checkpoint, device="cpu", threads=1), load(tiny_checkpoint, device="cpu")
    assert one.threads == 1 and one.backend.session.get_session_options().intra_op_num_threads == 1
    assert default.backend.session.get_session_options().intra_op_num_threads == 0  # ONNX Runtime's own choice
    assert F.runtime_session(1).get_session_options().intra_op_num_threads == 1
    files = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:4]
    u8 = np.stack([load_uint8(f, one.preprocess.input_size) for f in files])
    np.testing.assert_allclose(one.logits(u8), default.logits(u8), atol=1e-5)
    big = np.stack([load_uint8(f, 224) for f in files])
    np.testing.assert_allclose(F.features(big, threads=1), F.features(big), atol=1e-5)
