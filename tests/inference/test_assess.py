"""Out-of-distribution score, the "not assessed" label and the batch shift test, with the bundled default model
on real images (issue: an input the model cannot assess gets no diagnosis)."""
import json
import subprocess
import sys

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from skimage import data as skdata

from pneumoscope.config import resolve
from pneumoscope.data.cache import decode_all
from pneumoscope.data.folders import expand_paths, scan, split_by_patient
from pneumoscope.data.splits import split_samples
from pneumoscope.inference.assess import NOT_ASSESSED, assess
from pneumoscope.inference.loader import load
from pneumoscope.models.checkpoint import load_checkpoint
from pneumoscope.serve.app import create_app
from pneumoscope.trust.data_compare import shift_test


@pytest.fixture(scope="module")
def default():
    return load(None, device="cpu")


def test_assess_rules():
    assert assess([]).assessed and assess(["small original (100x100 px, ...)"], 0.5).assessed
    blank = assess(["blank or constant image (intensity std 0.000): nothing to read"], 0.2)
    assert not blank.assessed and blank.reason.startswith("blank")
    photo = assess(["colour image (mean channel difference 0.1): ..."])
    assert not photo.assessed and photo.reason.startswith("colour")
    far = assess([], 3.0)
    assert far.out_of_distribution and not far.assessed and "review manually" in far.reason
    assert far.warnings == [far.reason] and far.ood_score == 3.0


def test_held_out_training_images_flagged_at_the_stated_rate_and_hannover_flagged(default, chest_xray, shared_data):
    ref = default.ood_reference
    assert ref.features.startswith("imagenet") and ref.quantile == pytest.approx(0.99)
    ck = load_checkpoint(default.info["checkpoint"])
    _, val, _, _ = split_samples(resolve(dict(ck["config"]), data=str(chest_xray), limit=0, progress=False))
    d = decode_all([s.path for s in val], default.preprocess.input_size, progress=False)  # patients never fitted on
    held = float((default.ood_scores(d.images[d.ok]) > 1).mean())
    assert held <= 0.03, held  # stated false-flag rate 1 % (+- 2 points)
    h = decode_all(expand_paths([shared_data / "external" / "hannover"]), default.preprocess.input_size, progress=False)
    assert float((default.ood_scores(h.images[h.ok]) > 1).mean()) >= 0.90


def _odd_inputs(chest_xray, dicom_dir, tmp_path):
    Image.fromarray(skdata.chelsea()).save(tmp_path / "cat.jpeg")
    Image.fromarray(np.zeros((300, 300), np.uint8)).save(tmp_path / "blank.png")
    chest = np.asarray(Image.open(sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[0]).convert("L"))
    Image.fromarray(255 - chest).save(tmp_path / "inverted.png")
    return [tmp_path / "cat.jpeg", dicom_dir / "dental_cr_jpeg_lossless_modality_lut.dcm", tmp_path / "blank.png",
            tmp_path / "inverted.png"]


def test_odd_inputs_are_not_assessed_through_cli_and_service_with_the_same_warnings(chest_xray, dicom_dir, tmp_path,
                                                                                    default):
    files = _odd_inputs(chest_xray, dicom_dir, tmp_path)
    out = tmp_path / "p.json"
    subprocess.run([sys.executable, "-m", "pneumoscope", "predict", *map(str, files), "-o", str(out)], check=True,
                   capture_output=True)
    cli = json.loads(out.read_text())
    for r in cli:
        assert r["label"] == NOT_ASSESSED and r["not_assessed_reason"] and 0 <= r["probability"] <= 1, r
    with TestClient(create_app(default, tmp_path / "s.db")) as client:
        for f, r in zip(files, cli):
            got = client.post("/predict", files={"file": (f.name, f.read_bytes())}).json()["results"][0]
            assert got["label"] == NOT_ASSESSED and got["warnings"] == r["warnings"], (f, got["warnings"], r["warnings"])
            assert got["heatmap_png_base64"] is None  # no heatmap explaining a meaningless output
            report = client.get(got["report_url"]).json()
            assert report["result"]["label"] == NOT_ASSESSED and set(r["warnings"]) <= set(report["warnings"])


def test_real_chest_film_is_assessed(default, chest_xray):
    f = sorted((chest_xray / "train" / "PNEUMONIA").glob("*.jpeg"))[5]
    r = default.predict([f])[0]
    assert r.label in ("NORMAL", "PNEUMONIA") and r.out_of_distribution is False and r.ood_score < 1


def test_batch_shift_test_detects_another_site_and_not_split_halves(chest_xray, shared_data):
    ds = scan(chest_xray / "train")
    tr = decode_all([s.path for s in ds.samples[::40]][:50], 128, progress=False).images
    h = decode_all(expand_paths([shared_data / "external" / "hannover"])[:50], 128, progress=False).images
    assert shift_test(tr, h)["p_value"] < 0.01
    detected = []
    for seed in range(5):  # two random patient-disjoint halves of the training split: no shift
        a, b = split_by_patient(ds.samples, 0.5, seed)
        rng = np.random.default_rng(seed)
        pick = [decode_all([s.path for s in rng.choice(np.array(x, dtype=object), 50, replace=False)], 128,
                           progress=False).images for x in (a, b)]
        detected.append(shift_test(*pick, seed=seed)["shift_detected"])
    assert sum(detected) <= 1, detected


def test_service_warns_when_recent_uploads_drift_from_the_training_data(default, chest_xray, shared_data, tmp_path):
    def upload(client, paths):
        return client.post("/predict?heatmap=false", files=[("file", (p.name, p.read_bytes())) for p in paths]).json()

    train = sorted((chest_xray / "train" / "NORMAL").glob("*.jpeg"))[100:124]
    adults = expand_paths([shared_data / "external" / "hannover"])[:24]
    with TestClient(create_app(default, tmp_path / "a.db")) as client:
        assert upload(client, train[:12])["site_warning"] is None
        assert upload(client, train[12:])["site_warning"] is None  # 24 training films: no drift
    with TestClient(create_app(default, tmp_path / "b.db")) as client:
        assert upload(client, adults[:12])["site_warning"] is None  # fewer than 20 uploads: too few to judge
        warning = upload(client, adults[12:])["site_warning"]
        assert warning.startswith("site-level shift") and client.get("/health").json()["site_warning"] == warning
