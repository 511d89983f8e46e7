"""The one intake (data/intake.py): an image is decoded exactly once on every path, and every path gets the same
pixels, flags and probabilities."""
from __future__ import annotations

import pydicom
import pytest
from fastapi.testclient import TestClient

from pneumoscope.data import intake
from pneumoscope.data.intake import from_bytes, from_dataset, from_path

NIH = "chest_dx_nih_no_finding.dcm"


@pytest.fixture
def decodes(monkeypatch):
    """The number of decodes since the fixture was made."""
    monkeypatch.setitem(intake.DECODES, "n", 0)
    return intake.DECODES


def test_one_image_is_decoded_once_by_predict_the_service_and_the_dicom_node(tiny_checkpoint, dicom_dir, chest_xray,
                                                                             tmp_path, decodes):
    from pneumoscope.dicom.listen import Pipeline
    from pneumoscope.inference.loader import load
    from pneumoscope.serve.app import create_app

    pred = load(tiny_checkpoint, device="cpu")
    for f in (dicom_dir / NIH, sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[0]):
        decodes["n"] = 0
        by_predict = pred.predict([f])[0]
        assert decodes["n"] == 1, f"predict decoded {f.name} {decodes['n']} times"

        with TestClient(create_app(pred, tmp_path / f"{f.stem}.db")) as client:
            decodes["n"] = 0
            r = client.post("/predict?heatmap=false", files={"file": (f.name, f.read_bytes())})
            assert r.status_code == 200 and decodes["n"] == 1, (r.text, decodes["n"])
        by_service = r.json()["results"][0]
        assert by_service["probability"] == pytest.approx(by_predict.probability, abs=1e-6)
        assert by_service["label"] == by_predict.label

    pipeline = Pipeline(str(tmp_path / "dicom.db"), pred, heatmaps=False)
    try:
        ds = pydicom.dcmread(dicom_dir / NIH)
        decodes["n"] = 0
        out = pipeline.process(ds, ds.SOPInstanceUID, "TEST")
        assert decodes["n"] == 1 and len(out) == 1  # the parsed dataset is not encoded and parsed again
        stored = pipeline.db.latest_prediction(pipeline.db.list_studies()[0]["id"])
    finally:
        pipeline.close()
    assert stored["probability"] == pytest.approx(pred.predict([dicom_dir / NIH])[0].probability, abs=1e-6)


def test_every_source_gives_the_same_intake(dicom_dir, chest_xray):
    dcm = dicom_dir / NIH
    a, b, c = from_path(dcm, 96), from_bytes(dcm.read_bytes(), dcm.name, 96), from_dataset(pydicom.dcmread(dcm),
                                                                                             dcm.name, 96)
    for x in (b, c):
        assert (x.model_u8 == a.model_u8).all() and x.quality == a.quality and x.meta["original_size"] == (1024, 1024)
    assert a.view_u8.shape == (1024, 1024) and a.format == "DICOM"
    jpeg = sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    j = from_path(jpeg, 64)
    assert j.format == "JPEG" and j.model_u8.shape == (64, 64) and j.meta["original_size"] == (224, 224)
