"""Adapting to a new site without labels (inference/adapt.py): EM prior re-estimation, opt-in reporting, refusal
of batches too small to estimate a prior from."""
import json

import numpy as np
import pytest

from pneumoscope.cli import main
from pneumoscope.data.intake import load_uint8
from pneumoscope.errors import ConfigError
from pneumoscope.inference.adapt import MIN_BATCH, adapt_batch, em_prior
from pneumoscope.inference.loader import load


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


def test_adaptation_is_opt_in_and_reported(tiny_checkpoint, chest_xray, tmp_path):
    paths = [str(p) for p in sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:MIN_BATCH]]
    pred = load(tiny_checkpoint, device="cpu")
    plain = pred.predict(paths)
    assert all(r.adapted_probability is None for r in plain)  # off by default
    assert pred.predict(paths) == plain  # nothing was changed by a plain call
    ad = pred.predict(paths, adapt="prior")
    assert [r.calibrated_probability for r in ad] == [r.calibrated_probability for r in plain]
    assert all(r.adaptation == "prior" and "adapted to this batch" in r.warnings[-1] for r in ad)
    p, info = adapt_batch(pred, np.stack([load_uint8(q, 64) for q in paths]), "prior")
    assert info["n"] == MIN_BATCH and np.allclose(p, [r.adapted_probability for r in ad])
    with pytest.raises(ConfigError, match="choose one of prior"):
        adapt_batch(pred, np.stack([load_uint8(q, 64) for q in paths]), "bn")  # AdaBN was removed (docs/adapt.md)
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


def test_small_batches_are_refused_before_any_work(tiny_checkpoint, chest_xray, tmp_path, caplog):
    """One film with --adapt-to-batch once became PNEUMONIA 0.99999: now a usage error naming the minimum."""
    one = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:1]
    out = tmp_path / "p.csv"
    assert main(["predict", "--checkpoint", str(tiny_checkpoint), str(one[0]), "-o", str(out),
                 "--adapt-to-batch", "prior"]) == 2
    assert f"at least {MIN_BATCH} readable images" in caplog.text and not out.exists()
    pred = load(tiny_checkpoint, device="cpu")
    with pytest.raises(ConfigError, match=f"at least {MIN_BATCH}"):
        pred.predict([str(p) for p in one] * 3, adapt="prior")
    with pytest.raises(ConfigError, match=f"at least {MIN_BATCH}"):
        adapt_batch(pred, np.zeros((MIN_BATCH - 1, 64, 64), np.uint8), "prior")
