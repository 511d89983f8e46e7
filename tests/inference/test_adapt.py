"""Adapting to a new site without labels (inference/adapt.py): EM prior re-estimation, AdaBN, opt-in reporting."""
import json

import numpy as np
import pytest
import torch

from pneumoscope.cli import main
from pneumoscope.data.images import load_uint8
from pneumoscope.errors import ConfigError
from pneumoscope.inference.adapt import adabn, adapt_batch, em_prior
from pneumoscope.inference.loader import load
from pneumoscope.models.registry import create_model


def _posteriors(n: int, prior: float, source_prior: float, rng) -> tuple[np.ndarray, np.ndarray]:
    """Labels drawn at ``prior``; exact P(y=1|x) of a classifier calibrated at ``source_prior`` (x | y ~ N(+-1, 1))."""
    y = (rng.random(n) < prior).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    lr = np.exp(2 * x)  # N(1,1) / N(-1,1) density ratio
    return y, source_prior * lr / (source_prior * lr + 1 - source_prior)


@pytest.mark.parametrize("target", [0.2, 0.5, 0.85])
def test_em_recovers_a_known_prior_on_a_label_shifted_sample(target):
    rng = np.random.default_rng(0)
    y, p = _posteriors(20000, target, 0.74, rng)  # calibrated at the training split's 74 % pneumonia
    q, prior, iterations = em_prior(p, 0.74)
    assert prior == pytest.approx(target, abs=0.015) and iterations < 1000
    assert abs(q.mean() - target) < abs(p.mean() - target) + 1e-9  # posteriors moved towards the true prior
    _, same, _ = em_prior(_posteriors(20000, 0.74, 0.74, rng)[1], 0.74)
    assert same == pytest.approx(0.74, abs=0.015)  # no shift: no change
    with pytest.raises(ConfigError, match="strictly between"):
        em_prior(p, 1.0)


def test_adabn_changes_batchnorm_statistics_only_when_asked(chest_xray):
    torch.manual_seed(0)
    model = create_model("cnn_rnn", image_size=32).eval()  # has BatchNorm
    before = {k: v.clone() for k, v in model.state_dict().items()}
    imgs = np.stack([load_uint8(p, 32) for p in sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:12]])
    adapted = adabn(model, imgs, model.preprocess, torch.device("cpu"))
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k
    changed = {k for k, v in adapted.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in changed)
    assert not adapted.training


def test_adaptation_is_opt_in_and_reported(tiny_checkpoint, chest_xray, tmp_path):
    paths = [str(p) for p in sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:20]]
    pred = load(tiny_checkpoint, device="cpu")
    plain = pred.predict(paths)
    assert all("adapted_probability" not in r for r in plain)  # off by default
    assert pred.predict(paths) == plain  # nothing was changed by a plain call
    ad = pred.predict(paths, adapt="prior")
    assert [r["calibrated_probability"] for r in ad] == [r["calibrated_probability"] for r in plain]
    assert all(r["adaptation"] == "prior" and "adapted to this batch" in r["warnings"][-1] for r in ad)
    p, info = adapt_batch(pred, np.stack([load_uint8(q, 64) for q in paths]), "bn")
    assert info["bn_layers"] == 0 and "no BatchNorm" in info["note"]  # seed_cnn: bn changes nothing, and says so
    out = tmp_path / "rep"
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(chest_xray), "--split",
                 "validation", "--out", str(out), "--adapt-to-batch", "prior"]) == 0
    r = json.loads((out / "report.json").read_text())
    assert r["adapted"]["mode"] == "prior" and 0 < r["adapted"]["estimated_prior"] < 1
    assert r["adapted"]["source_prior"] == pytest.approx(pred.info["val_prior"])
    assert "Adapted to this batch" in (out / "report.md").read_text()
    plain_out = tmp_path / "plain"
    assert main(["evaluate", "--checkpoint", str(tiny_checkpoint), "--data", str(chest_xray), "--split",
                 "validation", "--out", str(plain_out)]) == 0
    q = json.loads((plain_out / "report.json").read_text())
    assert "adapted" not in q and q["auc"] == r["auc"] and q["accuracy"] == r["accuracy"]  # top level: plain model
