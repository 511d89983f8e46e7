"""models/ensemble.py: the mean of the members' calibrated probabilities, rebuilt from its arch, loud on bad members."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pneumoscope.errors import ConfigError
from pneumoscope.models.ensemble import Ensemble
from pneumoscope.models.registry import create_model, rebuild


def _members():
    torch.manual_seed(0)
    a, b = create_model("seed_cnn", image_size=64), create_model("seed_cnn", image_size=48)
    return [a.eval(), b.eval()]


def test_forward_is_logit_of_mean_calibrated_probability():
    a, b = _members()
    ens = Ensemble([a, b], [0.7, 1.3], [0.2, -0.1]).eval()
    assert ens.preprocess.input_size == 64 and ens.preprocess.mean == (0.0,) and ens.preprocess.std == (1.0,)
    x = torch.rand(3, 1, 64, 64)
    with torch.no_grad():
        pa = torch.sigmoid(a((x - a.preprocess.mean[0]) / a.preprocess.std[0]) / 0.7 + 0.2)
        xb = F.interpolate(x, size=(48, 48), mode="bilinear", antialias=True, align_corners=False)
        pb = torch.sigmoid(b((xb - b.preprocess.mean[0]) / b.preprocess.std[0]) / 1.3 - 0.1)
        torch.testing.assert_close(torch.sigmoid(ens(x)), (pa + pb) / 2, rtol=1e-5, atol=1e-6)
    assert ens.gradcam_layers == ["members.0." + a.gradcam_layer, "members.1." + b.gradcam_layer]


def test_rebuild_from_arch_reproduces_outputs():
    a, b = _members()
    ens = Ensemble([a, b], [0.7, 1.3], [0.2, -0.1]).eval()
    again = rebuild(ens.arch)
    again.load_state_dict(ens.state_dict())
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(x), ens(x))


def test_bad_members_are_refused():
    a, b = _members()
    with pytest.raises(ConfigError, match="temperature"):
        Ensemble([a, b], [1, None], [0, 0])
    with pytest.raises(ConfigError, match=">= 2"):
        Ensemble([a], [1], [0])
    b.preprocess = dataclasses.replace(b.preprocess, intensity="clahe")
    with pytest.raises(ConfigError, match="intensity"):
        Ensemble([a, b], [1, 1], [0, 0])
