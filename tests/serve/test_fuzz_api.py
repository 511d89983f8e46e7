"""Property-based API testing with Schemathesis against the service's own OpenAPI schema, with and without an API
key: every route, no 5xx, every response (status, body, content type) as the schema documents it, schema-violating
requests refused (unknown query parameters and body keys included), and the study database intact afterwards with
exactly the rows the accepted requests created.

Bounded and deterministic in the suite (``derandomize``; ``FUZZ_EXAMPLES`` per route). The release run is longer:
``PNEUMOSCOPE_FUZZ_EXAMPLES=1000 python -m pytest tests/serve/test_fuzz_api.py`` (README)."""
from __future__ import annotations

import os
from collections import Counter

import pytest
from hypothesis import HealthCheck, settings

from pneumoscope.serve.app import create_app

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

FUZZ_EXAMPLES = int(os.environ.get("PNEUMOSCOPE_FUZZ_EXAMPLES", "25"))
KEY = "fuzz-key"
ACCEPTED: dict[str, Counter] = {"keyed": Counter(), "open": Counter()}


def _app(tmp_path_factory, name: str, api_key: str | None):
    from pneumoscope.inference.loader import load
    from pneumoscope.training.loop import train
    from tests.conftest import SHARED_DATA, TINY

    out = tmp_path_factory.getbasetemp() / "tiny_seed_cnn_64"  # the session's tiny model (tests/conftest.py)
    if not (out / "best.pt").exists():
        train(dict(TINY, data=str(SHARED_DATA / "chest_xray"), out=str(out)))
    db = tmp_path_factory.mktemp(f"fuzz-{name}") / "studies.db"
    return create_app(load(out / "best.pt", device="cpu"), db, api_key=api_key, max_upload_bytes=2 * 2**20)


@pytest.fixture(scope="module")
def apps(tmp_path_factory):
    return {"keyed": _app(tmp_path_factory, "keyed", KEY), "open": _app(tmp_path_factory, "open", None)}


FUZZ = settings(max_examples=FUZZ_EXAMPLES, derandomize=True, deadline=None, suppress_health_check=list(HealthCheck),
                database=None)


def check(case, mode: str) -> None:
    headers = {"X-API-Key": KEY} if mode == "keyed" else {}
    # a random byte string is a schema-valid "file" but not an X-ray: POST /predict may refuse it (415 / 422 with
    # the reason); that real images are accepted is tested in test_app.py
    excluded = [positive_data_acceptance] if case.operation.path == "/predict" else []
    response = case.call_and_validate(headers=headers, excluded_checks=excluded)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        assert isinstance(body["detail"], str) and len(body["detail"]) > 10, body  # says what to send
    if case.operation.path == "/predict" and response.status_code == 200:
        ACCEPTED[mode]["predictions"] += len(response.json()["results"])
    if case.operation.path.endswith("/review") and response.status_code == 201:
        ACCEPTED[mode]["reviews"] += 1


OPERATIONS = ["GET /health", "POST /predict", "GET /studies", "GET /worklist", "GET /studies/{study_id}",
              "GET /studies/{study_id}/image.png", "GET /studies/{study_id}/heatmap.png",
              "GET /studies/{study_id}/report", "POST /studies/{study_id}/review"]


@pytest.mark.parametrize("mode", ["keyed", "open"])
@pytest.mark.parametrize("operation", OPERATIONS)
def test_every_route_answers_as_documented(apps, mode, operation):
    from hypothesis import given

    schema = schemathesis.openapi.from_asgi("/openapi.json", apps[mode])
    ops = {f"{op.method.upper()} {op.path}": op for op in (r.ok() for r in schema.get_all_operations())}
    assert set(ops) == set(OPERATIONS), sorted(ops)  # a new route must join the fuzz

    @given(case=ops[operation].as_strategy())
    @FUZZ
    def fuzz(case) -> None:
        check(case, mode)

    fuzz()


@pytest.mark.parametrize("mode", ["keyed", "open"])
def test_database_is_intact_and_holds_exactly_the_accepted_rows(apps, mode):
    db = apps[mode].state.db
    counts = db.counts()
    assert counts["predictions"] == ACCEPTED[mode]["predictions"]
    assert counts["reviews"] == ACCEPTED[mode]["reviews"]
    if db.dialect == "sqlite":
        from sqlalchemy import text

        try:
            assert db.conn.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        finally:
            db.conn.rollback()
