"""studies/select.py: the table's keys, the lung-box share, the ranking rule, and probes never touching threshold/calibration."""
import numpy as np
import pytest

from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.studies.select import LUNG_BOX, lung_box_mass, markdown_table, rank, score_checkpoint

KEYS = {"val_auc", "val_auc_ci", "shift_auc", "shift_auc_ci", "actualmed_auc", "actualmed_auc_ci",
        "actualmed_sensitivity", "actualmed_specificity", "hannover_sensitivity", "hannover_sensitivity_ci",
        "val_sensitivity", "val_specificity", "ece", "lung_box_mass", "score", "threshold", "temperature"}


def test_lung_box_mass():
    assert lung_box_mass(np.ones((1, 100, 100)))[0] == pytest.approx((LUNG_BOX[1] - LUNG_BOX[0]) * (LUNG_BOX[3] - LUNG_BOX[2]))
    m = np.zeros((2, 100, 100))
    m[0, 40:60, 40:60] = 1  # centre
    m[1, 0:10, 45:55] = 1  # neck / top edge
    np.testing.assert_allclose(lung_box_mass(m), [1.0, 0.0])
    assert np.isnan(lung_box_mass(np.zeros((1, 8, 8)))[0])


def test_rank_tie_break_by_hannover():
    rows = [{"name": "a", "score": 0.950, "hannover_sensitivity": 0.5},
            {"name": "b", "score": 0.947, "hannover_sensitivity": 0.9},
            {"name": "c", "score": 0.90, "hannover_sensitivity": 1.0}]
    assert [r["name"] for r in rank(rows) if r["winner"]] == ["b"]
    assert "**b** (winner)" in markdown_table(rows)


@pytest.fixture(scope="module")
def small_external(shared_data, tmp_path_factory):
    """A different probe folder: 3 + 3 actualmed images and 4 hannover images."""
    root = tmp_path_factory.mktemp("ext")
    src = shared_data / "external"
    for sub, n in (("actualmed/NORMAL", 3), ("actualmed/PNEUMONIA", 3), ("hannover/PNEUMONIA", 4)):
        (root / sub).mkdir(parents=True)
        for p in sorted((src / sub).glob("*.png"))[:n]:
            (root / sub / p.name).symlink_to(p)
    return root


def test_score_checkpoint_keys_and_probes_do_not_change_threshold(tiny_checkpoint, chest_xray, shared_data, small_external):
    ck = load_checkpoint(tiny_checkpoint)
    full = score_checkpoint(tiny_checkpoint, chest_xray, shared_data / "external", gradcam_n=8)
    assert KEYS <= set(full)
    assert full["n_actualmed"] == 44 and full["n_hannover"] == 243 and full["n_val"] > 700
    assert full["score"] == pytest.approx(min(full["val_auc"], full["shift_auc"], full["actualmed_auc"]))
    small = score_checkpoint(tiny_checkpoint, chest_xray, small_external, gradcam_n=0)
    assert small["n_actualmed"] == 6 and small["n_hannover"] == 4
    for k in ("threshold", "temperature", "calibration_bias", "val_auc", "val_sensitivity", "val_specificity", "ece",
              "shift_auc"):
        assert small[k] == full[k], k  # the probes are only measured: nothing is fitted on them
    assert full["threshold"] == pytest.approx(ck["threshold"]) and full["temperature"] == pytest.approx(ck["temperature"])
