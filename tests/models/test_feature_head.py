"""FeatureHead: a frozen trunk's features and a logistic head copied from scikit-learn, rebuilt from its arch."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from pneumoscope.data.cache import decode_all
from pneumoscope.errors import ConfigError
from pneumoscope.models.efficientnet import forward_from, forward_until
from pneumoscope.models.feature_head import FeatureHead
from pneumoscope.models.registry import create_model, rebuild
from pneumoscope.studies.adapt.views import run_batches, trunk_features


@pytest.fixture(scope="module")
def films(chest_xray):
    paths = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:12] + \
        sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:12]
    return decode_all(paths, 96, progress=False).images, np.array([0] * 12 + [1] * 12)


@pytest.mark.parametrize("kind", ["pooled", "block_stats"])
def test_head_logit_equals_sklearn_decision_function_and_survives_rebuild(films, kind):
    u8, y = films
    trunk = create_model("efficientnet_lite0", pretrained=True, image_size=96).eval()
    X = trunk_features(trunk, u8, kind)
    assert X.shape == (24, 1280 if kind == "pooled" else 3616)
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=2000)).fit(X, y)
    s, lr = pipe.named_steps["standardscaler"], pipe.named_steps["logisticregression"]
    model = FeatureHead(trunk, kind, X.shape[1]).set_head(s.mean_, s.scale_, lr.coef_[0], lr.intercept_[0]).eval()
    logits = run_batches(model, u8, model.preprocess)[:, 0]
    np.testing.assert_allclose(logits, pipe.decision_function(X), atol=1e-4)
    again = rebuild(model.arch)
    again.load_state_dict(model.state_dict())
    np.testing.assert_allclose(run_batches(again.eval(), u8, again.preprocess)[:, 0], logits, atol=1e-5)
    assert again.preprocess == model.preprocess and again.gradcam_layers == model.gradcam_layers


def test_split_forward_equals_the_backbone():
    net = create_model("efficientnet_lite0", pretrained=True).eval()
    x = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(forward_from(net.backbone, forward_until(net.backbone, x, 12), 12), net.backbone(x))


def test_bad_feature_heads_are_refused():
    with pytest.raises(ConfigError, match="must be one of"):
        FeatureHead(create_model("efficientnet_lite0"), "gram", 10)
    with pytest.raises(ConfigError, match="need an EfficientNet trunk"):
        FeatureHead(create_model("seed_cnn"), "block_stats", 10)
