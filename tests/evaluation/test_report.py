"""Evaluation report folder and plots: files exist, are valid PNGs, report.json holds the right numbers."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from pneumoscope.evaluation import calibration as C
from pneumoscope.evaluation import metrics as M
from pneumoscope.evaluation import report as R

NAMES = ["NORMAL", "PNEUMONIA"]


def _check_png(path, min_size=(100, 100)):
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.size[0] >= min_size[0] and im.size[1] >= min_size[1]
        a = np.asarray(im.convert("L"))
        assert a.std() > 5  # something is drawn, not a blank canvas


@pytest.fixture(scope="module")
def binary_case():
    rng = np.random.default_rng(0)
    n = 600
    z = rng.normal(0, 1.5, n) + 1.0 * (rng.random(n) < 0.6)
    y = (rng.random(n) < 1 / (1 + np.exp(-z))).astype(int)
    logits = 3 * z  # over-confident
    return y, logits


def test_write_evaluation_binary(tmp_path, binary_case):
    y, logits = binary_case
    T = C.fit_temperature(logits, y)
    p = C.apply_temperature(logits, T)
    val_ops = [{"target": 0.9, "threshold": 0.3}, {"target": 0.95, "threshold": 0.2}]
    groups = ["siteA" if i % 3 else "siteB" for i in range(y.size)]
    rep = R.write_evaluation(tmp_path / "eval", y, p, 0.5, label_names=NAMES, logits=logits, temperature=T,
                             val_operating_points=val_ops, groups=groups, extra={"checkpoint": "best.pt"}, n_boot=200)
    out = tmp_path / "eval"
    for name in ("roc.png", "pr.png", "confusion.png", "reliability.png"):
        _check_png(out / name)
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == rep
    for key in ("n", "n_pos", "n_neg", "accuracy", "sensitivity", "specificity", "precision", "f1", "auc",
                "threshold", "confusion", "ci", "calibration", "operating_points", "subgroups", "extra"):
        assert key in rep, key
    m = M.binary_metrics(y, p, 0.5)
    assert rep["accuracy"] == pytest.approx(m["accuracy"]) and rep["auc"] == pytest.approx(m["auc"])
    assert rep["confusion"] == m["confusion"]
    for k in ("accuracy", "sensitivity", "specificity", "auc"):
        assert rep["ci"][k][0] <= rep[k] <= rep["ci"][k][1]
    cal = rep["calibration"]
    assert set(cal) == {"ece", "brier", "ece_calibrated", "brier_calibrated", "temperature", "bias"}
    assert cal["bias"] == 0.0  # no calibration_bias given
    assert cal["temperature"] == pytest.approx(T)
    assert cal["ece_calibrated"] < cal["ece"] and cal["brier_calibrated"] < cal["brier"]
    # operating points: validation thresholds, sensitivity/specificity measured on THIS data
    assert [o["target"] for o in rep["operating_points"]] == [0.9, 0.95]
    for o, v in zip(rep["operating_points"], val_ops):
        here = M.binary_metrics(y, p, v["threshold"])
        assert o["threshold"] == v["threshold"]
        assert o["sensitivity"] == pytest.approx(here["sensitivity"])
        assert o["specificity"] == pytest.approx(here["specificity"])
    assert set(rep["subgroups"]) == {"siteA", "siteB"}
    assert rep["subgroups"]["siteA"]["n"] + rep["subgroups"]["siteB"]["n"] == y.size
    assert rep["extra"] == {"checkpoint": "best.pt"}
    md = (out / "report.md").read_text()
    for text in ("# Evaluation report", "| sensitivity |", "## Confusion matrix", "## Calibration",
                 "## Operating points", "## Subgroups", "best.pt"):
        assert text in md


def test_write_evaluation_binary_minimal(tmp_path, binary_case):
    y, logits = binary_case
    p = C.apply_temperature(logits, 1.0)
    rep = R.write_evaluation(tmp_path, y, p, 0.5, label_names=NAMES, n_boot=100)
    assert rep["operating_points"] == []
    assert "calibration" not in rep and "subgroups" not in rep and "extra" not in rep
    assert not (tmp_path / "reliability.png").exists()
    for name in ("roc.png", "pr.png", "confusion.png", "report.md", "report.json"):
        assert (tmp_path / name).is_file()


def test_write_evaluation_multiclass(tmp_path):
    rng = np.random.default_rng(1)
    z = rng.normal(0, 1.5, (300, 3))
    P = C.apply_temperature(z, 1.0)
    y = (rng.random((300, 1)) > P.cumsum(axis=1)).sum(axis=1)
    names = ["NORMAL", "BACTERIAL", "VIRAL"]
    rep = R.write_evaluation(tmp_path, y, C.apply_temperature(2 * z, 2.0), label_names=names, logits=2 * z,
                             temperature=2.0)
    assert rep == json.loads((tmp_path / "report.json").read_text())
    assert rep["label_names"] == names
    assert np.asarray(rep["confusion"]).shape == (3, 3) and np.sum(rep["confusion"]) == 300
    assert rep["accuracy"] == pytest.approx(np.mean(P.argmax(1) == y))
    assert rep["calibration"]["ece_calibrated"] < rep["calibration"]["ece"]
    for name in ("roc.png", "confusion.png", "reliability.png"):
        _check_png(tmp_path / name)
    assert not (tmp_path / "pr.png").exists()
    md = (tmp_path / "report.md").read_text()
    assert "| VIRAL |" in md and "macro_auc" in md


def test_plot_confusion_accepts_dict_and_checks_shape(tmp_path):
    R.plot_confusion({"tp": 5, "fp": 1, "tn": 7, "fn": 2}, NAMES, tmp_path / "c.png")
    _check_png(tmp_path / "c.png")
    with pytest.raises(ValueError, match="label names"):
        R.plot_confusion([[1, 2], [3, 4]], ["A", "B", "C"], tmp_path / "bad.png")


def test_plot_history(tmp_path):
    history = [{"epoch": e, "loss": 1 / e, "accuracy": 0.6 + 0.05 * e, "val_loss": 1.2 / e,
                "val_accuracy": 0.55 + 0.05 * e, "val_auc": 0.7 + 0.04 * e} for e in range(1, 6)]
    path = R.plot_history(history, tmp_path / "sub" / "history.png")
    _check_png(path, min_size=(800, 300))


def test_plot_reliability_and_curves(tmp_path, binary_case):
    y, logits = binary_case
    R.plot_reliability(y, C.apply_temperature(logits, 1.0), None, tmp_path / "rel.png")
    R.plot_roc(y, C.apply_temperature(logits, 1.0), tmp_path / "roc.png")
    R.plot_pr(y, C.apply_temperature(logits, 1.0), tmp_path / "pr.png")
    for name in ("rel.png", "roc.png", "pr.png"):
        _check_png(tmp_path / name)
