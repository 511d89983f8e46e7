"""pneumoscope adapt: folds by patient, a threshold from out-of-fold predictions only, refusals of unusable site
folders, and one end-to-end run on small real subsets (site_nih films, chest_xray images) whose model goes through
predict, ONNX and the service."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pneumoscope.errors import DatasetLayoutError
from pneumoscope.evaluation.calibration import fit_calibration_and_threshold
from pneumoscope.studies.adapt.site import choose_k, load_site, patient_folds
from pneumoscope.studies.adapt.validate import CVResult, choose_winner, cross_fitted


def _link(dst: Path, files: list[Path]) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        (dst / f.name).symlink_to(f)
    return dst


def _site_subset(shared_data: Path, root: Path, n_patients: int) -> Path:
    """A site folder of the first ``n_patients`` patients of each class of site_nih (all their films)."""
    for c in ("NORMAL", "PNEUMONIA"):
        files = sorted((shared_data / "site_nih" / c).glob("*.png"))
        pats = sorted({f.name[:8] for f in files})[:n_patients]
        _link(root / c, [f for f in files if f.name[:8] in pats])
    return root


def test_folds_keep_patients_whole_and_stratified():
    rng = np.random.default_rng(0)
    patients = np.repeat([f"p{i}" for i in range(60)], rng.integers(1, 5, 60))
    y = (np.array([int(p[1:]) for p in patients]) % 2).astype(int)
    y[patients == "p3"] = [0, 1, 0, 1][: int((patients == "p3").sum())]  # one patient with films in both classes
    fold = patient_folds(y, patients, 5, seed=0)
    assert set(fold) == set(range(5))
    for p in set(patients):
        assert len(set(fold[patients == p])) == 1, p
    for k in range(5):
        assert 0.2 < y[fold == k].mean() < 0.8


def test_choose_k_from_patients_of_the_smaller_class():
    y = np.array([0] * 20 + [1] * 200)
    assert choose_k(y, np.array([f"n{i}" for i in range(20)] + [f"p{i}" for i in range(200)])) == 3
    assert choose_k(y, np.arange(220).astype(str)) == 3
    y = np.array([0] * 100 + [1] * 100)
    assert choose_k(y, np.arange(200).astype(str)) == 5


def _synthetic_oof(n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, out-of-fold logits that separate them imperfectly, and 5 folds."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    return y, y * 1.5 + rng.normal(size=n), np.arange(n) % 5


def test_a_folds_label_never_sets_its_own_threshold():
    """Cross-fitted labels of fold k depend only on the OTHER folds: flipping fold k's labels changes nothing there."""
    y, oof, fold = _synthetic_oof(200, seed=1)
    _, label = cross_fitted(y, oof, fold)
    y2 = y.copy()
    y2[fold == 2] = 1 - y2[fold == 2]
    _, label2 = cross_fitted(y2, oof, fold)
    assert np.array_equal(label[fold == 2], label2[fold == 2])
    assert not np.array_equal(label[fold != 2], label2[fold != 2])  # the other folds did see the flipped labels


def test_cross_fitted_threshold_follows_the_stated_method():
    """sensitivity:T / specificity:T hold (nearly: each fold's threshold is set on the other folds) on unseen folds."""
    y, oof, fold = _synthetic_oof(400, seed=2)
    _, youden = cross_fitted(y, oof, fold)
    _, sens = cross_fitted(y, oof, fold, "sensitivity:0.98")
    _, spec = cross_fitted(y, oof, fold, "specificity:0.98")
    recall = lambda label, c: float(np.mean(label[y == c] == c))  # noqa: E731
    assert recall(sens, 1) >= 0.95 and recall(sens, 1) > recall(youden, 1) and recall(sens, 0) < recall(youden, 0)
    assert recall(spec, 0) >= 0.95 and recall(spec, 0) > recall(youden, 0) and recall(spec, 1) < recall(youden, 1)


def test_a_bad_threshold_method_fails_before_any_film_is_read(tmp_path):
    from pneumoscope.errors import ConfigError
    from pneumoscope.studies.adapt.run import adapt

    with pytest.raises(ConfigError, match="specificity:<target"):
        adapt(tmp_path / "no-such-site", tmp_path / "out", threshold="specificity")


def test_winner_rule_prefers_fewer_numbers_within_a_hundredth():
    def r(key, auc, n):
        return CVResult(key, key, n, np.zeros(1), np.zeros(1), np.zeros(1), {"auc": auc})

    assert choose_winner([r("a", 0.80, 2), r("b", 0.905, 3617), r("c", 0.90, 2_000_000)]).key == "b"
    assert choose_winner([r("b1", 0.896, 1281), r("b4", 0.903, 3617)]).key == "b1"
    assert choose_winner([r("b1", 0.89, 1281), r("b4", 0.903, 3617)]).key == "b4"


def test_refuses_one_class_and_too_few_films(shared_data, tmp_path):
    one = tmp_path / "one"
    _link(one / "NORMAL", sorted((shared_data / "site_nih" / "NORMAL").glob("*.png"))[:30])
    with pytest.raises(DatasetLayoutError, match="PNEUMONIA"):
        load_site(one, 64)
    few = _site_subset(shared_data, tmp_path / "few", 4)
    with pytest.raises(DatasetLayoutError, match=r"at least 20 films of at least 10 patients"):
        load_site(few, 64)


@pytest.fixture(scope="module")
def adapted(shared_data, chest_xray, tmp_path_factory):
    """One adapt run: 20 patients per class of site_nih, the base's replay and forgetting on a 120-image subset; the
    operating point for a stated sensitivity instead of Youden's."""
    from pneumoscope.studies.adapt.run import adapt

    root = tmp_path_factory.mktemp("adapt")
    site = _site_subset(shared_data, root / "site", 20)
    base = root / "base"
    for c in ("NORMAL", "PNEUMONIA"):
        _link(base / c, sorted((chest_xray / "train" / c).glob("*.jpeg"))[:60])
    report = adapt(site, root / "out", base_data=base, replay_films=40, threshold="sensitivity:0.9")
    return report, root / "out", site


@pytest.mark.slow
def test_adapt_writes_every_strategy_a_verdict_and_an_ordinary_checkpoint(adapted):
    report, out, site = adapted
    md = (out / "report.md").read_text()
    assert [r.key for r in report["strategies"]] == ["a", "b1", "b2", "b3", "b4", "c", "d", "e"]
    for key in ("a", "b1", "b2", "b3", "b4", "c", "d", "e", "style", "histogram"):
        assert f"| {key} |" in md
    assert "## Verdict: " in md and "never sees anatomy" in md
    j = json.loads((out / "report.json").read_text())
    assert j["verdict"]["ready"] in (True, False) and j["verdict"]["rule"]
    assert [c["train_films"] for c in j["learning_curve"]][-1] > 0
    assert j["forgetting"]["n"] > 0 and 0 <= j["forgetting"]["auc_adapted"] <= 1
    for png in ("roc.png", "calibration.png", "learning_curve.png"):
        assert (out / png).stat().st_size > 1000
    ckpt = torch.load(out / "model.pt", weights_only=True)
    a = ckpt["adaptation"]
    assert a["base_sha256"] and a["site_digest"].startswith("sha256:") and a["films"] == j["site"]["films"]


@pytest.mark.slow
def test_threshold_and_calibration_come_from_out_of_fold_predictions(adapted):
    report, out, _ = adapted
    with open(out / "oof.csv") as f:
        rows = list(csv.DictReader(f))
    y = np.array([int(r["label"]) for r in rows])
    oof = np.array([float(r[f"logit_{report['winner']}"]) for r in rows])
    assert report["model"]["threshold_info"]["method"] == "sensitivity:0.9"
    expected = fit_calibration_and_threshold(oof[:, None], y, "sensitivity:0.9")
    ckpt = torch.load(out / "model.pt", weights_only=True)
    for key in ("threshold", "temperature", "calibration_bias"):
        assert ckpt[key] == pytest.approx(expected[key], abs=1e-9), key
    assert ckpt["threshold_info"]["method"] == "sensitivity:0.9" and ckpt["threshold_info"]["sensitivity"] >= 0.9
    assert "site's own labelled films" in ckpt["threshold_info"]["chosen_on"]  # what the structured report states
    assert "threshold chosen (sensitivity:0.9)" in (out / "report.md").read_text()
    folds = {}
    for r in rows:  # the csv's folds keep patients whole too
        folds.setdefault(r["patient_id"], set()).add(r["fold"])
    assert all(len(v) == 1 for v in folds.values())


@pytest.mark.slow
def test_adapted_model_predicts_exports_and_serves_alike(adapted, tmp_path):
    from fastapi.testclient import TestClient

    from pneumoscope.inference.loader import load
    from pneumoscope.inference.onnx import export_onnx
    from pneumoscope.serve.app import create_app

    _, out, site = adapted
    files = sorted(site.rglob("*.png"))[:4]
    pt = load(out / "model.pt", device="cpu")
    rows = pt.predict(files)
    assert all(r.label in ("NORMAL", "PNEUMONIA") for r in rows)  # the site's films are assessed
    onnx = load(export_onnx(out / "model.pt", tmp_path / "model.onnx"))
    u8 = np.stack([pt.prepare(f)[0] for f in files])
    np.testing.assert_allclose(onnx.logits(u8), pt.logits(u8), atol=1e-4)
    app = create_app(checkpoint=str(out / "model.pt"), db_path=tmp_path / "s.db", device="cpu")
    with TestClient(app) as client:
        r = client.post("/predict", files={"file": (files[0].name, files[0].read_bytes(), "image/png")})
    assert r.status_code == 200, r.text
    got = r.json()["results"][0]
    assert got["calibrated_probability"] == pytest.approx(rows[0].calibrated_probability, abs=1e-5)


@pytest.mark.slow
def test_reference_flags_junk_and_not_the_sites_films(adapted, tmp_path):
    from PIL import Image

    from pneumoscope.inference.loader import load

    _, out, site = adapted
    pred = load(out / "model.pt", device="cpu")
    films = sorted(site.rglob("*.png"))
    ok = [r for r in pred.predict(films) if r.label != "not assessed"]
    assert len(ok) >= 0.95 * len(films)
    rng = np.random.default_rng(0)
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((512, 512), 128, np.uint8)).save(blank)
    photo = tmp_path / "photo.png"  # a colour photograph-like image: smooth colour gradients and noise
    grad = np.linspace(0, 255, 512)[None, :, None] * np.array([1.0, 0.6, 0.2])
    Image.fromarray(np.clip(grad + rng.normal(0, 20, (512, 512, 3)), 0, 255).astype(np.uint8)).save(photo)
    noise = tmp_path / "noise.png"
    Image.fromarray(rng.integers(0, 256, (512, 512), dtype=np.uint8)).save(noise)
    for r in pred.predict([blank, photo, noise]):
        assert r.label == "not assessed", r
