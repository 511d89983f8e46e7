"""The FastAPI service through TestClient: every endpoint, every error code, duplicates, reviews, reports, PHI."""
from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from pneumoscope.serve.app import MAX_FILES, create_app
from pneumoscope.serve.study_report import REPORT_SCHEMA
from pneumoscope.studydb.schema import revisions
from tests.serve.test_study_report import validate

KEY = "test-key-0123456789"
H = {"X-API-Key": KEY}
NIH = "chest_dx_nih_no_finding.dcm"


def upload(*items) -> list:
    """(path | (name, bytes, type)) -> httpx files= list for the repeated `file` field."""
    out = []
    for it in items:
        if isinstance(it, Path):
            ctype = "application/dicom" if it.suffix == ".dcm" else "image/jpeg"
            it = (it.name, it.read_bytes(), ctype)
        out.append(("file", it))
    return out


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as im:
        return im.size


@pytest.fixture
def labelled(predictor, tmp_path):
    """A client whose model labels every film it assesses PNEUMONIA (threshold 0) or NORMAL (threshold above 1):
    for the heatmap rule (inference.assess.HEATMAP_RULE), whatever the tiny model would say."""
    import dataclasses

    def make(label: str):
        return TestClient(create_app(dataclasses.replace(predictor, threshold=0.0 if label == "PNEUMONIA" else 1.01),
                                     tmp_path / f"{label}.db", api_key=KEY))
    return make


@pytest.fixture
def client(make_app):
    with TestClient(make_app(api_key=KEY)) as c:
        yield c


# ---------------------------------------------------------------------------------------------- auth & page
def test_health_page_and_static_need_no_key(client):
    h = client.get("/health")
    assert h.status_code == 200
    body = h.json()
    assert body["model"]["name"] == "seed_cnn" and body["model"]["checksum"].startswith("sha256:")
    assert body["model"]["input_size"] == 64 and body["api_key_required"] is True
    assert body["database"]["schema_version"] == len(revisions()) == 3  # 0001 initial, 0002 filename, 0003 label_from
    page = client.get("/")
    assert page.status_code == 200 and 'id="file-input"' in page.text and 'id="opacity"' in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "X-API-Key" in js.text and "innerHTML" not in js.text
    assert client.get("/static/style.css").status_code == 200
    assert h.headers["x-content-type-options"] == "nosniff" and h.headers["cache-control"] == "no-store"


PROTECTED = [("GET", "/studies"), ("GET", "/studies/x"), ("GET", "/studies/x/report"), ("GET", "/studies/x/image.png"),
             ("GET", "/studies/x/heatmap.png"), ("POST", "/studies/x/review"), ("POST", "/predict")]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_every_endpoint_needs_the_key(client, method, path):
    assert client.request(method, path).status_code == 401
    wrong = client.request(method, path, headers={"X-API-Key": KEY + "x"})
    assert wrong.status_code == 401 and wrong.json()["detail"] == "missing or wrong X-API-Key header"
    assert client.request(method, path, headers={"X-API-Key": ""}).status_code == 401
    assert client.request(method, path, headers=H).status_code in (200, 404, 422)  # past the key


def test_no_key_configured_means_open(make_app):
    with TestClient(make_app()) as c:
        assert c.get("/studies").status_code == 200
        assert c.get("/health").json()["api_key_required"] is False


def test_openapi_documents_the_endpoints_and_the_key(client):
    spec = client.get("/openapi.json").json()
    for path in ("/health", "/predict", "/studies", "/studies/{study_id}", "/studies/{study_id}/report",
                 "/studies/{study_id}/image.png", "/studies/{study_id}/heatmap.png", "/studies/{study_id}/review"):
        assert path in spec["paths"], path
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": "required when the server was started with an API key"}


# ---------------------------------------------------------------------------------------------- predict
def test_predict_jpeg_and_dicom_in_one_request(client, predictor, jpegs, dicom_dir, labelled):
    jpeg, dcm = jpegs[1], dicom_dir / NIH
    r = client.post("/predict", headers=H, files=upload(jpeg, dcm))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"]["checksum"] == predictor.info["checksum"]
    a, b = body["results"]
    expected = predictor.predict([jpeg, dcm])  # the CLI's path: the same decoding as training
    for got, exp in zip((a, b), expected):
        assert got["probability"] == pytest.approx(exp.probability, abs=1e-6)
        assert got["calibrated_probability"] == pytest.approx(exp.calibrated_probability, abs=1e-6)
        assert got["label"] == exp.label and got["threshold"] == predictor.threshold
        assert 0.0 <= got["probability"] <= 1.0
    assert (a["format"], b["format"], b["modality"]) == ("JPEG", "DICOM", "DX")
    assert a["filename"] == jpeg.name and not a["duplicate"]
    assert len(a["study_id"]) == 32  # generated for a JPEG
    assert b["study_id"].startswith("1.3.6.1.4.1.11129.5.5.")  # the StudyInstanceUID
    assert any("body part not recorded" in w for w in b["warnings"])
    for got in (a, b):  # a map only for a film labelled PNEUMONIA
        assert (got["heatmap_png_base64"] is not None) == (got["label"] == "PNEUMONIA"), got["label"]
    assert "Covid0000" not in r.text and "PatientID" not in r.text  # no raw DICOM meta echoed
    assert b["image_url"] == f"/studies/{b['study_id']}/image.png"
    with labelled("PNEUMONIA") as c:  # the overlay's size follows the viewer copy
        a, b = c.post("/predict", headers=H, files=upload(jpeg, dcm)).json()["results"]
    assert png_size(base64.b64decode(a["heatmap_png_base64"])) == (224, 224)  # the shared JPEGs are 224 px
    assert png_size(base64.b64decode(b["heatmap_png_base64"])) == (512, 512)  # 1024 px DICOM, overlay <= 512


def test_no_heatmap_for_a_film_labelled_normal_and_the_404_says_why(labelled, jpegs):
    with labelled("NORMAL") as c:
        r = c.post("/predict", headers=H, files=upload(jpegs[0])).json()["results"][0]
        assert r["label"] == "NORMAL" and r["heatmap_png_base64"] is None
        h = c.get(f"/studies/{r['study_id']}/heatmap.png", headers=H)
        assert h.status_code == 404 and "labelled NORMAL" in h.json()["detail"]
        assert "shown only for a film labelled PNEUMONIA" in h.json()["detail"]
        assert c.get(f"/studies/{r['study_id']}/report", headers=H).json()["heatmap"] is None


def test_files_of_one_request_share_one_model_call(make_app, predictor, jpegs, monkeypatch):
    app = make_app(api_key=KEY)
    calls = []
    real = predictor.predict
    monkeypatch.setattr(predictor, "predict", lambda items, **kw: calls.append(len(items)) or real(items, **kw))
    with TestClient(app) as c:
        r = c.post("/predict?heatmap=false", headers=H, files=upload(*jpegs[:5]))
    assert r.status_code == 200 and len(r.json()["results"]) == 5
    assert calls == [5]


def test_duplicate_upload_is_one_study_but_every_request_is_recorded(client, make_app, jpegs):
    r1 = client.post("/predict", headers=H, files=upload(jpegs[0])).json()["results"][0]
    r2 = client.post("/predict?heatmap=false", headers=H, files=upload(jpegs[0])).json()["results"][0]
    assert r1["study_id"] == r2["study_id"] and r2["duplicate"] and not r1["duplicate"]
    assert r2["prediction_id"] == r1["prediction_id"] + 1
    assert any("received before" in w for w in r2["warnings"])
    assert r1["probability"] == r2["probability"]
    counts = client.app.state.db.counts()
    assert (counts["studies"], counts["predictions"]) == (1, 2)
    listed = client.get("/studies", headers=H).json()["studies"]
    assert len(listed) == 1 and listed[0]["n_predictions"] == 2


def test_heatmap_optional_then_computed_on_demand(labelled, jpegs):
    with labelled("PNEUMONIA") as client:
        _heatmap_on_demand(client, jpegs)


def _heatmap_on_demand(client, jpegs):
    r = client.post("/predict?heatmap=false", headers=H, files=upload(jpegs[2])).json()["results"][0]
    assert r["heatmap_png_base64"] is None
    sid = r["study_id"]
    assert client.get(f"/studies/{sid}", headers=H).json()["prediction"]["has_heatmap"] == 0
    h = client.get(f"/studies/{sid}/heatmap.png", headers=H)
    assert h.status_code == 200 and h.headers["content-type"] == "image/png"
    assert png_size(h.content) == (224, 224)
    assert client.get(f"/studies/{sid}", headers=H).json()["prediction"]["has_heatmap"] == 1  # stored now
    assert client.get(f"/studies/{sid}/heatmap.png", headers=H).content == h.content


# ---------------------------------------------------------------------------------------------- studies & reviews
def test_study_image_review_and_report(client, dicom_dir):
    r = client.post("/predict", headers=H, files=upload(dicom_dir / NIH)).json()["results"][0]
    sid = r["study_id"]
    s = client.get(f"/studies/{sid}", headers=H).json()
    assert s["study"]["modality"] == "DX" and s["study"]["width"] == 1024 and s["study"]["patient_id"] == "Covid0000"
    assert s["prediction"]["probability"] == r["probability"] and s["reviews"] == []
    img = client.get(f"/studies/{sid}/image.png", headers=H)
    assert img.headers["content-type"] == "image/png" and png_size(img.content) == (1024, 1024)
    with Image.open(io.BytesIO(img.content)) as im:
        assert im.mode == "L" and 0 < np.asarray(im).mean() < 255

    evil = "<img src=x onerror=alert(1)>"
    rv = client.post(f"/studies/{sid}/review", headers=H, json={"reviewer": "  Dr B  ", "decision": "agree",
                                                                 "comment": evil})
    assert rv.status_code == 201
    assert (rv.json()["reviewer"], rv.json()["decision"], rv.json()["prediction_id"]) == ("Dr B", "agree", r["prediction_id"])
    for bad in ({"reviewer": "Dr B", "decision": "maybe"}, {"reviewer": "   ", "decision": "agree"}, {"decision": "agree"}):
        assert client.post(f"/studies/{sid}/review", headers=H, json=bad).status_code == 422
    assert client.post("/studies/nope/review", headers=H, json={"reviewer": "a", "decision": "agree"}).status_code == 404
    listed = client.get("/studies", headers=H).json()["studies"][0]
    assert (listed["id"], listed["review_decision"], listed["review_reviewer"]) == (sid, "agree", "Dr B")

    rep = client.get(f"/studies/{sid}/report", headers=H).json()
    assert validate(rep, REPORT_SCHEMA) == []
    assert rep["study"]["id"] == sid and rep["patient"] == {"id": "Covid0000", "pseudonymized": False}
    assert rep["result"]["probability"] == r["probability"] and rep["threshold"]["method"] == "youden"
    if r["label"] == "PNEUMONIA":  # the report carries the map the answer carried (none for another label)
        assert base64.b64decode(rep["heatmap"]["png_base64"]) == base64.b64decode(r["heatmap_png_base64"])
    else:
        assert rep["heatmap"] is None and r["heatmap_png_base64"] is None
    assert rep["reviews"][0]["comment"] == evil
    page = client.get(f"/studies/{sid}/report?format=html", headers=H)
    assert page.headers["content-type"].startswith("text/html")
    assert evil not in page.text and "&lt;img src=x onerror=alert(1)&gt;" in page.text
    assert page.headers["content-security-policy"].startswith("default-src 'none'")
    assert client.get(f"/studies/{sid}/report?format=pdf", headers=H).status_code == 422
    for path in ("/studies/nope", "/studies/nope/image.png", "/studies/nope/heatmap.png", "/studies/nope/report"):
        assert client.get(path, headers=H).status_code == 404


# ---------------------------------------------------------------------------------------------- bad input
def test_413_by_content_length_by_counted_bytes_and_by_file_count(make_app, jpegs):
    with TestClient(make_app(api_key=KEY, max_upload_bytes=50_000)) as c:
        big = ("big.jpeg", b"\xff\xd8\xff" + b"\0" * 60_000, "image/jpeg")
        r = c.post("/predict", headers=H, files=upload(big))
        assert r.status_code == 413 and "exceeds the limit of 50000 bytes" in r.json()["detail"]

        def chunks():  # no Content-Length: chunked, counted while reading
            yield b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.jpeg\"\r\n\r\n"
            for _ in range(10):
                yield b"\0" * 10_000

        r = c.post("/predict", headers={**H, "Content-Type": "multipart/form-data; boundary=b"}, content=chunks())
        assert r.status_code == 413 and "exceeds the limit" in r.json()["detail"]
        assert c.app.state.db.counts()["predictions"] == 0
    with TestClient(make_app(api_key=KEY)) as c:
        r = c.post("/predict", headers=H, files=upload(*([jpegs[0]] * (MAX_FILES + 1))))
        assert r.status_code == 413 and f"at most {MAX_FILES}" in r.json()["detail"]


def _bomb_png() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, format="PNG")  # 64 Mpx of zeros in ~60 kB
    return buf.getvalue()


def _gif() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (8, 8)).save(buf, format="GIF")
    return buf.getvalue()


def test_415_and_422_with_clear_messages(client, jpegs, dicom_dir):
    cases = [
        (("notes.txt", b"hello, not an image", "text/plain"), 415, "not a JPEG, PNG or DICOM"),
        (("x.gif", _gif(), "image/gif"), 415, "not a JPEG, PNG or DICOM"),
        (("empty.jpeg", b"", "image/jpeg"), 422, "empty file"),
        (("cut.jpeg", jpegs[0].read_bytes()[:600], "image/jpeg"), 422, "cut.jpeg: corrupt"),
        (("bad.dcm", b"\0" * 128 + b"DICM" + b"\x02\x00" * 200, "application/dicom"), 422, "DICOM"),
        (("scout.dcm", (dicom_dir / "abdomen_ot_scout.dcm").read_bytes(), "application/dicom"), 422,
         "modality OT is not a radiograph"),
        (("bomb.png", _bomb_png(), "image/png"), 422, "decompression bomb"),
    ]
    for item, status, message in cases:
        r = client.post("/predict", headers=H, files=upload(item))
        assert r.status_code == status, (item[0], r.text)
        assert message in r.json()["detail"], (item[0], r.json())
    # one bad file fails the whole request: nothing is stored
    r = client.post("/predict", headers=H, files=upload(jpegs[0], cases[0][0]))
    assert r.status_code == 415
    assert client.app.state.db.counts() == {"patients": 0, "studies": 0, "predictions": 0, "reviews": 0}
    assert client.get("/health").status_code == 200  # still serving


def test_dicom_without_preamble_needs_a_dcm_name_or_type(client, dicom_dir):
    data = (dicom_dir / "chest_cr_monochrome1_10bit_no_meta.dcm").read_bytes()
    assert client.post("/predict", headers=H, files=upload(("scan", data, "application/octet-stream"))).status_code == 415
    r = client.post("/predict", headers=H, files=upload(("scan", data, "application/dicom")))
    assert r.status_code == 200 and r.json()["results"][0]["format"] == "DICOM"


def test_client_file_name_is_never_a_path(client, jpegs, tmp_path):
    before = sorted(p.name for p in tmp_path.iterdir())
    data = jpegs[0].read_bytes()
    names = {"../../etc/<evil>.jpeg": "_evil_.jpeg", "..\\..\\win\\x;rm -rf.jpeg": "x_rm -rf.jpeg", "..": ".."}
    r = client.post("/predict", headers=H, files=[("file", (n, data, "image/jpeg")) for n in names])
    assert r.status_code == 200
    assert [x["filename"] for x in r.json()["results"]] == list(names.values())
    after = sorted(p.name for p in tmp_path.iterdir())
    assert set(after) - set(before) <= {"studies.db-wal", "studies.db-shm"}


def test_pseudonymised_ids_never_store_the_raw_ones(make_app, dicom_dir, tmp_path):
    with TestClient(make_app(api_key=KEY, pseudonymize_salt="s" * 32)) as c:
        r = c.post("/predict", headers=H, files=upload(dicom_dir / NIH)).json()["results"][0]
        sid = r["study_id"]
        assert len(sid) == 64 and not sid.startswith("1.3.6")
        s = c.get(f"/studies/{sid}", headers=H).json()["study"]
        assert s["patient_id"].startswith("hmac-sha256:") and len(s["patient_id"]) == 12 + 64
        assert c.get(f"/studies/{sid}/report", headers=H).json()["patient"]["pseudonymized"] is True
    with TestClient(make_app(api_key=KEY, pseudonymize_salt="s" * 32)) as c:  # same salt, same pseudonym
        again = c.post("/predict", headers=H, files=upload(dicom_dir / NIH)).json()["results"][0]
        assert again["study_id"] == sid and again["duplicate"]
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("studies.db*"))
    assert b"Covid0000" not in raw and b"1.3.6.1.4.1.11129.5.5" not in raw
