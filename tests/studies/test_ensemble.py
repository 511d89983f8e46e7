"""studies/ensemble.py: an ensemble checkpoint of two tiny real runs works wherever a single model does."""
import numpy as np
import pytest

from pneumoscope.errors import CheckpointError
from pneumoscope.inference.loader import load
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.studies.ensemble import build
from pneumoscope.trust.explain import heatmaps
from tests.conftest import TINY


@pytest.fixture(scope="module")
def second_member(chest_xray, tmp_path_factory):
    """Another tiny run on the same validation split (same data, val_fraction, seed), at 48 px."""
    from pneumoscope.training.loop import train

    out = tmp_path_factory.mktemp("tiny48")
    train(dict(TINY, image_size=48, epochs=3, data=str(chest_xray), out=str(out)))
    return out / "best.pt"


@pytest.fixture(scope="module")
def ensemble_ckpt(tiny_checkpoint, second_member, chest_xray, tmp_path_factory):
    out = tmp_path_factory.mktemp("ens") / "ensemble.pt"
    return build([tiny_checkpoint, second_member], chest_xray, out), out


def test_build_fits_threshold_and_calibration_on_validation(ensemble_ckpt, tiny_checkpoint):
    metrics, path = ensemble_ckpt
    ck = load_checkpoint(path)
    assert ck["arch"]["name"] == "ensemble" and len(ck["ensemble_members"]) == 2
    assert 0 < ck["threshold"] < 1 and ck["temperature"] > 0 and ck["threshold"] == metrics["threshold"]
    assert metrics["n_val"] > 700 and 0.5 < metrics["val_auc"] <= 1
    assert ck["config"] == {**load_checkpoint(tiny_checkpoint)["config"], "tta": ""}  # its split is re-made from it


def test_members_test_time_views_are_not_used_by_the_ensemble(tiny_checkpoint, second_member, chest_xray, tmp_path):
    """The ensemble is calibrated on its members' plain logits, so it must not predict with a member's views."""
    from pneumoscope.models.checkpoint import save_checkpoint

    ck = load_checkpoint(tiny_checkpoint)
    save_checkpoint({**ck, "config": {**ck["config"], "tta": "crop90"}}, tmp_path / "with_views.pt")
    build([tmp_path / "with_views.pt", second_member], chest_xray, tmp_path / "ens.pt")
    assert load_checkpoint(tmp_path / "ens.pt")["config"]["tta"] == "" and load(tmp_path / "ens.pt").tta == ()


def test_predict_explain_and_onnx_work_with_an_ensemble(ensemble_ckpt, chest_xray, tmp_path):
    from pneumoscope.inference.onnx import export_onnx

    _, path = ensemble_ckpt
    pred = load(path, device="cpu")
    files = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:2] + sorted(
        (chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:2]
    res = pred.predict(files)
    assert all(r.error is None and 0 <= r.calibrated_probability <= 1 for r in res)
    u8 = np.stack([pred.prepare(f)[0] for f in files])
    maps = heatmaps(pred, u8)
    assert maps.shape == (4, 64, 64) and float(maps.max()) == pytest.approx(1.0)
    onnx = load(export_onnx(path, tmp_path / "ens.onnx"))
    np.testing.assert_allclose([r.calibrated_probability for r in onnx.predict(files)],
                               [r.calibrated_probability for r in res], atol=1e-4)


def test_members_on_different_splits_are_refused(tiny_checkpoint, chest_xray, tmp_path):
    from pneumoscope.training.loop import train

    other = tmp_path / "seed1"
    train(dict(TINY, image_size=48, epochs=1, seed=1, data=str(chest_xray), out=str(other)))
    with pytest.raises(CheckpointError, match="another split"):
        build([tiny_checkpoint, other / "best.pt"], chest_xray, tmp_path / "e.pt")


def test_ensemble_heatmaps_equal_grad_cam_of_the_ensemble_output(ensemble_ckpt, chest_xray):
    """An ensemble is explained member by member (each member's own logit, one backward pass each); the maps must
    equal MONAI's Grad-CAM of the ensemble's own output at each member's layer, averaged, on real films."""
    import copy

    import torch
    from monai.visualize import GradCAM

    from pneumoscope.inference.runtime import normalize
    from pneumoscope.trust.explain import _unit_max, pneumonia_logit

    _, path = ensemble_ckpt
    pred = load(path, device="cpu")
    files = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:3] + sorted(
        (chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:3]
    u8 = np.stack([pred.prepare(f)[0] for f in files])
    model = copy.deepcopy(pred.model).float().to(memory_format=torch.contiguous_format).eval()
    net = pneumonia_logit(model).eval()
    x = normalize(torch.from_numpy(u8.copy()).unsqueeze(1).float().div_(255), pred.preprocess).requires_grad_(True)
    with torch.enable_grad():
        whole = [GradCAM(nn_module=net, target_layers="model." + name, postprocessing=_unit_max)(x=x, class_idx=0)
                 for name in model.gradcam_layers]
    expected = _unit_max(torch.stack(whole).mean(0).detach())[:, 0].numpy()
    got = heatmaps(pred, u8)
    assert expected.max() > 0 and len(model.gradcam_layers) == 2
    np.testing.assert_allclose(got, expected, atol=1e-4)
