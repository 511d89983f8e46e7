"""Whatever the bundled default model is (MODEL_CARD.md): predict, explain, ONNX export and the service use it
with no --checkpoint, and agree with each other on real films."""
import csv

import numpy as np
import pytest

from pneumoscope.cli import main
from pneumoscope.inference.default_model import default_checkpoint
from pneumoscope.inference.loader import load


@pytest.fixture(scope="module")
def films(chest_xray):
    return sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[:2] + sorted(
        (chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[:2]


def test_predict_and_explain_cli_without_checkpoint(films, tmp_path):
    out = tmp_path / "p.csv"
    assert main(["predict", *map(str, films), "-o", str(out)]) == 0
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(r["label"] in ("NORMAL", "PNEUMONIA") and not r.get("error") for r in rows)
    assert main(["explain", str(films[-1]), "--out", str(tmp_path / "maps")]) == 0
    assert len(list((tmp_path / "maps").glob("*_gradcam.png"))) == 1


def test_onnx_export_of_the_default_matches_pytorch(films, tmp_path):
    from pneumoscope.inference.onnx import export_onnx

    torch_pred = load(None, device="cpu")
    onnx_pred = load(export_onnx(default_checkpoint(), tmp_path / "default.onnx"))
    assert onnx_pred.preprocess == torch_pred.preprocess and onnx_pred.threshold == pytest.approx(torch_pred.threshold)
    a = [r.calibrated_probability for r in torch_pred.predict(films)]
    b = [r.calibrated_probability for r in onnx_pred.predict(films)]
    np.testing.assert_allclose(b, a, atol=1e-4)


def test_service_answers_with_the_default(films, tmp_path):
    from fastapi.testclient import TestClient

    from pneumoscope.serve.app import create_app

    pred = load(None, device="cpu")
    with TestClient(create_app(pred, tmp_path / "studies.db")) as c:
        r = c.post("/predict", params={"heatmap": True},
                   files=[("file", (films[-1].name, films[-1].read_bytes(), "image/jpeg"))])
    assert r.status_code == 200
    res = r.json()["results"][0]
    expected = pred.predict([films[-1]])[0]
    assert res["label"] == expected.label
    assert res["calibrated_probability"] == pytest.approx(expected.calibrated_probability, abs=1e-5)
