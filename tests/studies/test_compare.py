"""`compare`: several models on one split and seed, TTA and ensemble rows, one table (small real subset)."""
import json

import numpy as np
import torch

from pneumoscope.config import TrainConfig
from pneumoscope.models.registry import create_model
from pneumoscope.studies.compare import TTA_VIEWS, compare, tta_logits


def test_compare_two_models_with_tta_and_ensemble(chest_xray, tmp_path):
    base = TrainConfig(data=str(chest_xray), image_size=48, epochs=1, limit=120, batch_size=16, lr=3e-3,
                       threads=2, progress=False)
    rows = compare(base, ["seed_cnn", "cnn_rnn"], tmp_path, tta=True, ensemble=True)
    names = [r["model"] for r in rows]
    assert names == ["seed_cnn", "seed_cnn + TTA", "cnn_rnn", "cnn_rnn + TTA", "ensemble(seed_cnn+cnn_rnn)"]
    for r in rows[:4]:
        assert r["image_size"] == 48  # --image-size applies to every model
        assert 0 <= r["val_auc"] <= 1 and 0 <= r["specificity"] <= 1 and r["params"] > 0
    assert rows[0]["params"] != rows[2]["params"]
    assert rows[-1]["params"] == rows[0]["params"] + rows[2]["params"]
    md = (tmp_path / "compare.md").read_text()
    assert md.count("\n| ") == 1 + len(rows) and "| seed_cnn | 48 |" in md
    assert json.loads((tmp_path / "compare.json").read_text()) == json.loads(json.dumps(rows))
    for spec in ("seed_cnn", "cnn_rnn"):
        assert (tmp_path / spec / "best.pt").is_file()


def test_tta_identity_view_matches_plain_forward(monkeypatch):
    import pneumoscope.studies.compare as C
    from pneumoscope.inference.runtime import normalize

    torch.manual_seed(0)
    model = create_model("seed_cnn", image_size=48).eval()
    pre = model.preprocess
    x = torch.randint(0, 256, (5, 1, 48, 48), dtype=torch.uint8)
    with torch.no_grad():
        plain = model(normalize(x.float() / 255, pre)).numpy()
    avg = tta_logits(model, x, pre, torch.device("cpu"))
    assert avg.shape == plain.shape and not np.allclose(avg, plain, atol=1e-4)  # the other views change the logits
    monkeypatch.setattr(C, "TTA_VIEWS", ((1.0, 0.0, 0.0),))
    np.testing.assert_allclose(tta_logits(model, x, pre, torch.device("cpu")), plain, atol=1e-5)
    assert TTA_VIEWS[0] == (1.0, 0.0, 0.0)
