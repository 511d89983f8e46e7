"""studies/select.py: the table's keys, the lung-box share, the ranking rule, and probes never touching threshold/calibration."""
import numpy as np
import pytest

from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.studies.select import (
    LUNG_BOX,
    add_paired_differences,
    lung_box_mass,
    markdown_table,
    rank,
    recipe_files,
    score_checkpoint,
    train_recipes,
)

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


def test_recipe_files_all_and_missing(tmp_path):
    names = [f.name for f in recipe_files("all")]
    assert names == sorted(names) and {"r0_seed_shift_aug.yaml", "r1_seed_clahe.yaml"} <= set(names) and len(names) > 3
    from pneumoscope.errors import ConfigError

    with pytest.raises(ConfigError, match="nope.yaml"):
        recipe_files(f"{recipe_files('all')[0]},{tmp_path / 'nope.yaml'}")


def test_train_recipes_trains_once(chest_xray, tmp_path):
    recipe = tmp_path / "tiny_recipe.yaml"
    recipe.write_text("model: seed_cnn\nimage_size: 48\nlimit: 120\nepochs: 1\nbatch_size: 16\nprogress: false\n")
    runs = tmp_path / "runs"
    [best] = train_recipes([recipe], chest_xray, runs)
    assert best == runs / "tiny_recipe" / "best.pt" and load_checkpoint(best)["config"]["image_size"] == 48
    stamp = best.stat().st_mtime_ns
    assert train_recipes([recipe], chest_xray, runs) == [best] and best.stat().st_mtime_ns == stamp  # finished: kept


def test_ensemble_recipe_parsing(tmp_path):
    from pneumoscope.errors import ConfigError
    from pneumoscope.studies.default_model import ensemble_members

    (tmp_path / "a.yaml").write_text("model: seed_cnn\n")
    (tmp_path / "b.yaml").write_text("model: seed_cnn\n")
    assert ensemble_members(tmp_path / "a.yaml") is None  # a plain training config
    (tmp_path / "e.yaml").write_text("ensemble: [a.yaml, b.yaml]\n")
    assert ensemble_members(tmp_path / "e.yaml") == [tmp_path / "a.yaml", tmp_path / "b.yaml"]
    (tmp_path / "bad.yaml").write_text("ensemble: [a.yaml, missing.yaml]\n")
    with pytest.raises(ConfigError, match="missing.yaml"):
        ensemble_members(tmp_path / "bad.yaml")
    (tmp_path / "mixed.yaml").write_text("ensemble: [a.yaml, b.yaml]\nepochs: 3\n")
    with pytest.raises(ConfigError, match="only 'ensemble"):
        ensemble_members(tmp_path / "mixed.yaml")


def test_default_model_recipe_is_a_row_of_the_table():
    """resources/default_model.yaml trains exactly what one recipe of the selection table trains."""
    from pneumoscope.config import load_config
    from pneumoscope.inference.default_model import DEFAULT_CONFIG
    from pneumoscope.studies.default_model import cv_recipe, ensemble_members

    default = load_config(DEFAULT_CONFIG).to_dict()
    singles = [f for f in recipe_files("all") if ensemble_members(f) is None and cv_recipe(f) is None]
    assert len(singles) < len(recipe_files("all")) - 1  # the ensemble levers (plain and cross-validated) are recipes too
    same = [f.name for f in singles if load_config(f).to_dict() == default]
    assert len(same) == 1, same


def test_rows_on_the_same_films_get_a_paired_auc_difference():
    rng = np.random.default_rng(0)
    paths = [f"/d/{'NORMAL' if k % 2 else 'PNEUMONIA'}/person{k // 2}_bacteria_{k}.jpeg" for k in range(200)]
    y = np.array([0 if k % 2 else 1 for k in range(200)])
    p_a = np.clip(0.5 + 0.3 * (y - 0.5) + 0.2 * rng.normal(size=200), 0, 1)
    order = rng.permutation(200)  # the second row lists the same films in another order
    p_b = np.clip(p_a + 0.1 * (y - 0.5), 0, 1)
    rows = [{"name": "a", "_probs": {"val_paths": paths, "y_val": y, "p_val": p_a}},
            {"name": "b", "_probs": {"val_paths": [paths[k] for k in order], "y_val": y[order], "p_val": p_b[order]}},
            {"name": "c", "_probs": {"val_paths": paths[:100], "y_val": y[:100], "p_val": p_a[:100]}}]
    add_paired_differences(rows)
    d = rows[1]["paired"]
    assert "paired" not in rows[0] and "paired" not in rows[2]  # c is scored on other films: no pairing
    assert d["against"] == "a" and d["n"] == 200 and d["difference"] > 0 and d["ci"][0] <= d["difference"] <= d["ci"][1]
    assert "Paired on the same 200 films: AUC of b minus a" in markdown_table([{**r, "name": r["name"]} for r in rows])
