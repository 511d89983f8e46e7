"""studies/default_model.py: ``build --weights-from``, the default model's test-time views added to trained weights
without training (calibration, threshold and metrics refitted on its own validation split, then packed)."""
import numpy as np
import pytest
import torch
import yaml
from sklearn.metrics import roc_auc_score

from pneumoscope.errors import ConfigError
from pneumoscope.evaluation.evaluate import evaluation_samples
from pneumoscope.inference.loader import load
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.studies.default_model import build
from tests.conftest import TINY


def test_build_with_weights_from_adds_views_and_refits_on_validation(tiny_checkpoint, chest_xray, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "tta": "crop90", "threshold": "sensitivity:0.95"}))
    m = build(chest_xray, out=tmp_path / "run", config=recipe, dest=tmp_path / "packed.pt", weights_from=tiny_checkpoint)
    src, new = load_checkpoint(tiny_checkpoint), load_checkpoint(tmp_path / "packed.pt")
    for k, v in src["state_dict"].items():  # the same weights (packed as fp16), nothing trained
        assert torch.allclose(new["state_dict"][k].float(), v.float(), atol=1e-3 * (1 + v.abs().max().item()))
    assert new["config"]["tta"] == "crop90" and new["refit"]["views"] == ["crop90"] and new["ood_reference"]
    assert new["threshold_info"] != src.get("threshold_info")  # the config's rule (a sensitivity target), refitted
    p = load(tmp_path / "packed.pt", device="cpu")
    assert p.tta == ("crop90",)
    samples = evaluation_samples(new, chest_xray)[0]
    y = [int(s.label > 0) for s in samples]
    results = p.predict([s.path for s in samples])
    assert roc_auc_score(y, [r.probability for r in results]) == pytest.approx(m["val_auc"], abs=2e-3)  # fp16-packed
    sens = np.mean([r.calibrated_probability >= p.threshold for r, t in zip(results, y) if t])
    assert sens >= 0.93  # the refitted threshold meets its sensitivity target on the same films (fp16 rounding aside)
    with pytest.raises(ConfigError, match="single-model"):
        (tmp_path / "ens.yaml").write_text("ensemble: [recipe.yaml, recipe.yaml]\n")
        build(chest_xray, out=tmp_path / "e", config=tmp_path / "ens.yaml", dest=tmp_path / "x.pt",
              weights_from=tiny_checkpoint)


def test_weights_from_refuses_views_on_an_intensity_standardised_model(tiny_checkpoint, chest_xray, tmp_path):
    from pneumoscope.models.checkpoint import save_checkpoint

    ck = load_checkpoint(tiny_checkpoint)
    save_checkpoint({**ck, "preprocess": {**ck["preprocess"], "intensity": "clahe"}}, tmp_path / "clahe.pt")
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({**TINY, "tta": "crop90"}))
    with pytest.raises(ConfigError, match="intensity none"):
        build(chest_xray, out=tmp_path / "run", config=recipe, dest=tmp_path / "p.pt", weights_from=tmp_path / "clahe.pt")
