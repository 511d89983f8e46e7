"""Cross-validated ensembles (issue 23): patient folds, the ``cross_validate`` recipe, ``build_cv`` and its
out-of-fold figures, and their row in ``pneumoscope select``; on tiny real runs."""
import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from pneumoscope.data.folders import fold_by_patient, scan
from pneumoscope.errors import CheckpointError, ConfigError
from pneumoscope.evaluation.evaluate import evaluation_samples
from pneumoscope.inference.loader import load
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.studies.default_model import cv_recipe, train_cv
from pneumoscope.studies.ensemble import build_cv, member_runtime, oof_logits
from pneumoscope.trust.explain import heatmaps

MEMBER = dict(model="seed_cnn", image_size=48, limit=160, epochs=1, batch_size=16, threads=2, progress=False)


def test_patient_folds_are_disjoint_cover_every_film_and_keep_the_class_shares(chest_xray):
    samples = scan(chest_xray).split("train")
    folds = [fold_by_patient(samples, 4, i, seed=0) for i in (1, 2, 3, 4)]
    vals = [{str(s.path) for s in va} for _, va in folds]
    assert sum(map(len, vals)) == len(samples) == len(set().union(*vals))  # each film validates exactly once
    share = np.mean([s.label for s in samples])
    for tr, va in folds:
        assert not {s.patient_id for s in tr} & {s.patient_id for s in va}
        assert len(tr) + len(va) == len(samples) and abs(np.mean([s.label for s in va]) - share) < 0.03
    assert fold_by_patient(samples, 4, 2, seed=0) == folds[1] and fold_by_patient(samples, 4, 2, seed=1) != folds[1]


@pytest.fixture(scope="module")
def cv_runs(chest_xray, tmp_path_factory):
    root = tmp_path_factory.mktemp("cv")
    (root / "member.yaml").write_text(yaml.safe_dump(MEMBER))
    (root / "cv.yaml").write_text("cross_validate: member.yaml\nfolds: 2\nseed: 4\n")
    return root, train_cv(root / "cv.yaml", chest_xray, root / "runs")


def test_cv_recipe_trains_each_fold_once(cv_runs, chest_xray):
    root, runs = cv_runs
    assert [r.parent.name for r in runs] == ["member-fold1", "member-fold2"]
    cfgs = [load_checkpoint(r)["config"] for r in runs]
    assert [c["fold"] for c in cfgs] == ["1/2", "2/2"] and {c["seed"] for c in cfgs} == {4}  # the recipe's override
    folds = [evaluation_samples(load_checkpoint(r), chest_xray)[0] for r in runs]
    assert not {s.patient_id for s in folds[0]} & {s.patient_id for s in folds[1]}
    stamp = runs[0].stat().st_mtime_ns
    assert train_cv(root / "cv.yaml", chest_xray, root / "runs") == runs and runs[0].stat().st_mtime_ns == stamp


@pytest.mark.parametrize("text,match", [
    ("cross_validate: member.yaml\n", "folds"),
    ("cross_validate: member.yaml\nfolds: 1\n", "folds"),
    ("cross_validate: missing.yaml\nfolds: 2\n", "missing.yaml"),
    ("cross_validate: member.yaml\nfolds: 2\nfold: 1/2\n", "per member"),
    ("cross_validate: member.yaml\nfolds: 2\nepochs: -1\n", "epochs"),
])
def test_bad_cv_recipes_are_refused(cv_runs, tmp_path, text, match):
    (tmp_path / "member.yaml").write_text(yaml.safe_dump(MEMBER))
    (tmp_path / "cv.yaml").write_text(text)
    with pytest.raises(ConfigError, match=match):
        cv_recipe(tmp_path / "cv.yaml")


def test_build_cv_fits_on_out_of_fold_predictions(cv_runs, chest_xray, tmp_path):
    _, runs = cv_runs
    m = build_cv(runs, chest_xray, tmp_path / "cv.pt")
    ck = load_checkpoint(tmp_path / "cv.pt")
    assert ck["cv"]["folds"] == 2 and [x["fold"] for x in ck["ensemble_members"]] == ["1/2", "2/2"]
    # by hand: each member's own calibrated probability on its own fold, through `predict`
    y, p = [], []
    for r in runs:
        samples = evaluation_samples(load_checkpoint(r), chest_xray)[0]
        p += [x.calibrated_probability for x in load(r, device="cpu").predict([s.path for s in samples])]
        y += [int(s.label > 0) for s in samples]
    assert m["n_val"] == len(y) and m["val_auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-3)
    lo, hi = m["val_auc_ci"]
    assert lo <= m["val_auc"] <= hi and 0 < ck["threshold"] < 1 and ck["temperature"] > 0
    with pytest.raises(CheckpointError, match="no held-out"):  # every film trained some member
        evaluation_samples(ck, chest_xray)
    films = sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:3]
    assert all(0 <= r.calibrated_probability <= 1 for r in load(tmp_path / "cv.pt", device="cpu").predict(films))


def test_build_cv_refuses_runs_that_are_not_the_k_folds(cv_runs, tiny_checkpoint, chest_xray, tmp_path):
    _, runs = cv_runs
    with pytest.raises(CheckpointError, match="fold 1/2 ... 2/2"):
        build_cv([runs[0], runs[0]], chest_xray, tmp_path / "a.pt")
    with pytest.raises(CheckpointError, match="fold"):
        build_cv([runs[0], tiny_checkpoint], chest_xray, tmp_path / "b.pt")


def test_select_scores_a_cv_ensemble_out_of_fold_and_a_site_zero_shot(cv_runs, chest_xray, shared_data, tmp_path):
    from pneumoscope.studies.select import markdown_table, score_checkpoint

    _, runs = cv_runs
    m = build_cv(runs, chest_xray, tmp_path / "cv.pt")
    site = tmp_path / "site"
    for cls in ("NORMAL", "PNEUMONIA"):
        (site / cls).mkdir(parents=True)
        for f in sorted((shared_data / "site_nih" / cls).glob("*.png"))[:4]:
            (site / cls / f.name).symlink_to(f)
    row = score_checkpoint(tmp_path / "cv.pt", chest_xray, None, gradcam_n=0, site_dir=site)
    assert row["n_val"] == m["n_val"] and row["val_auc"] == pytest.approx(m["val_auc"], abs=1e-6)
    assert "out-of-fold" in row["validation"] and row["n_site"] == 8 and 0 <= row["site_auc"] <= 1
    assert "site AUC, zero-shot" in markdown_table([row])


def test_out_of_fold_logits_agree_between_onnx_runtime_and_pytorch(cv_runs, chest_xray, tmp_path):
    _, runs = cv_runs
    build_cv(runs, chest_xray, tmp_path / "cv.pt")
    predictor = load(tmp_path / "cv.pt", device="cpu")
    ens = predictor.model
    assert member_runtime(ens, 0) is not None and member_runtime(ens, 1) is not None  # members exported and checked
    rng = np.random.default_rng(0)
    u8 = rng.integers(0, 256, (12, 48, 48), dtype=np.uint8)
    fold = np.arange(12) % 2
    fast, slow = oof_logits(ens, u8, fold), oof_logits(ens, u8, fold, backend="torch")
    assert fast.shape == (12, 1) and np.abs(fast - slow).max() <= 1e-4
    assert not np.allclose(oof_logits(ens, u8, 1 - fold), fast)  # the member of each fold, not one for all
    # the sessions live beside the ensemble, not in it: Grad-CAM (select's lung-box column) deep-copies the model
    assert heatmaps(predictor, u8[:2]).shape == (2, 48, 48)
