"""The bad-input corpus through the HTTP service (FastAPI TestClient, #18): the HTTP status, a message naming the
file and what to send, the database unchanged by every refused upload, the other requests still answered."""
from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from pneumoscope.serve.app import MAX_FILES, create_app

HINT = "send the image as multipart/form-data field 'file'"


@pytest.fixture
def client(bundled_predictor, tmp_path):
    with TestClient(create_app(bundled_predictor, tmp_path / "studies.db")) as c:
        yield c


def counts(client) -> dict:
    return client.app.state.db.counts()


def post(client, *files, heatmap: bool = False):
    return client.post("/predict", params={"heatmap": heatmap},
                       files=[("file", (name, data, ctype)) for name, data, ctype in files])


def test_every_corpus_file_uploaded_alone(client, items):
    outcomes = []
    for it in items:
        before = counts(client)
        r = post(client, (it.name, it.data, "application/octet-stream"))
        after = counts(client)
        if it.ok:
            res = r.json()["results"][0] if r.status_code == 200 else {}
            assessed = res.get("label") in ("NORMAL", "PNEUMONIA") or (res.get("label") == "not assessed"
                                                                         and res.get("not_assessed_reason"))
            ok = (r.status_code == 200 and assessed and res["label_from"] ==
                  "calibrated_probability" and after["predictions"] == before["predictions"] + 1
                  and all(ord(ch) < 128 for ch in res["filename"]))
        else:
            detail = r.json().get("detail", "")
            stem = it.name.rsplit(".", 1)[0]
            ok = r.status_code == it.status and it.msg in detail and stem in detail and after == before
        outcomes.append((it.name, ok, r.status_code, r.text[:300]))
    failed = [o for o in outcomes if not o[1]]
    assert not failed, failed


def test_bodies_that_are_not_the_expected_form_say_what_to_send(client, items):
    jpeg = items[0].data
    before = counts(client)
    cases = [
        (dict(content=jpeg, headers={"content-type": "image/jpeg"}), 422, "not a multipart form (Content-Type: image/jpeg)"),
        (dict(), 422, "not a multipart form (Content-Type: none)"),
        (dict(files={"image": ("a.jpeg", jpeg, "image/jpeg")}), 422, "no multipart field 'file'"),
        (dict(data={"file": "not a file"}), 422, "not a multipart form (Content-Type: application/x-www-form-urlencoded)"),
        (dict(data={"file": "text"}, files={"other": ("x.txt", b"x")}), 422, "the field 'file' holds text, not a file"),
        (dict(files={"file": ("", jpeg, "image/jpeg")}), 422, "the field 'file' holds text, not a file"),
        (dict(files={"file": ("a" * 5000 + ".jpeg", jpeg, "image/jpeg")}), 400, "file name of thousands of characters"),
        (dict(content=b"--xyz\r\nbroken", headers={"content-type": "multipart/form-data; boundary=xyz"}), 422, HINT),
    ]
    for kw, status, msg in cases:
        r = client.post("/predict", **kw)
        assert r.status_code == status and msg in r.json()["detail"] and HINT in r.json()["detail"], (kw.keys(), r.text)
    assert counts(client) == before
    # the other routes: one readable sentence per invalid field in "detail", the machine-readable list in "errors"
    r = client.post(f"/studies/{'x' * 8}/review", json={"decision": "maybe"})
    assert r.status_code == 422 and isinstance(r.json()["errors"], list) and len(r.json()["errors"]) == 2
    assert "body field 'reviewer': Field required" in r.json()["detail"]
    assert "body field 'decision'" in r.json()["detail"] and "'maybe'" in r.json()["detail"]


def test_misspelt_keys_unknown_parameters_and_huge_offsets_are_refused_with_the_fix(client):
    """Found by Schemathesis and by hand (issue 25): each was accepted silently, or a 500."""
    before = counts(client)
    r = client.post(f"/studies/{'x' * 8}/review", json={"reviewer": "Dr A", "decision": "agree", "coment": "typo"})
    assert r.status_code == 422 and "body field 'coment': Extra inputs are not permitted" in r.json()["detail"]
    r = client.get("/studies", params={"limt": 5})
    assert r.status_code == 422 and "unknown query parameter(s) 'limt'" in r.json()["detail"]
    assert "takes: limit, offset" in r.json()["detail"]
    r = client.get("/studies", params={"offset": 2**70})
    assert r.status_code == 422 and "query parameter 'offset'" in r.json()["detail"]
    r = client.post(f"/studies/{'x' * 8}/review", json={"reviewer": " \r", "decision": "agree"})
    assert r.status_code == 422 and "body field 'reviewer'" in r.json()["detail"]
    assert counts(client) == before


def test_one_bad_file_refuses_the_request_and_stores_nothing(client, items):
    good = items[0]
    zero = next(i for i in items if i.name == "zero.jpeg")
    before = counts(client)
    r = post(client, (good.name, good.data, "image/jpeg"), (zero.name, zero.data, "image/jpeg"))
    assert r.status_code == 422 and "zero.jpeg: empty file" in r.json()["detail"]
    assert counts(client) == before
    r = post(client, *[(f"{i}.jpeg", good.data, "image/jpeg") for i in range(MAX_FILES + 1)])
    assert r.status_code == 413 and f"at most {MAX_FILES}" in r.json()["detail"] and counts(client) == before
    assert post(client, (good.name, good.data, "image/jpeg")).status_code == 200  # the service still answers


def test_traversal_and_unicode_names_are_never_paths(client, items, tmp_path):
    jpeg = items[0].data
    for name in ("../../etc/passwd.jpeg", "..\\..\\windows\\x.jpeg", "/abs/olute.jpeg", "Röntgen_胸部_😀.jpeg",
                 "x\r\nSet-Cookie: a=b.jpeg", "\0.jpeg", "CON.jpeg"):
        r = post(client, (name, jpeg, "image/jpeg"))
        assert r.status_code == 200, (name, r.text)
        f = r.json()["results"][0]["filename"]
        assert "/" not in f and "\\" not in f and ".." not in f.strip(".") or f == "upload", f
        assert all(32 <= ord(c) < 127 for c in f), f
    assert not (tmp_path / "etc").exists()


def test_concurrent_duplicate_uploads_make_one_study(client, items):
    jpeg = items[0].data
    before = counts(client)
    answers: list = []

    def send():
        answers.append(post(client, ("same.jpeg", jpeg, "image/jpeg")))

    threads = [threading.Thread(target=send) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [a.status_code for a in answers] == [200] * 6
    ids = {a.json()["results"][0]["study_id"] for a in answers}
    after = counts(client)
    assert len(ids) == 1 and after["studies"] == before["studies"] + 1
    assert after["predictions"] == before["predictions"] + 6
    assert sum(a.json()["results"][0]["duplicate"] for a in answers) == 5


def test_report_and_viewer_name_the_probability_the_label_uses(client, items):
    r = post(client, (items[0].name, items[0].data, "image/jpeg"))
    sid = r.json()["results"][0]["study_id"]
    rep = client.get(f"/studies/{sid}/report").json()
    assert rep["result"]["label_from"] == "calibrated_probability"
    assert "Calibrated probability (the label uses this)" in client.get(f"/studies/{sid}/report?format=html").text
    assert "Calibrated probability (the label uses this)" in client.get("/").text
