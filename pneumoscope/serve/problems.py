"""One shape for every error answer of the service, and its place in the OpenAPI schema.

Every 4xx body is ``Problem``: ``detail`` (one sentence naming what was wrong and what to send instead) and, for
a request that does not match the schema (422), ``errors``: the machine-readable list of what failed. Each route
documents the statuses it can answer (``responses(...)``), so clients and Schemathesis find no undocumented code.
"""
from __future__ import annotations

from fastapi import HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel


class Problem(BaseModel):
    detail: str
    errors: list[dict] | None = None


WHY = {
    400: "malformed request (Content-Length, multipart boundary)",
    401: "missing or wrong X-API-Key header (when the server was started with an API key)",
    404: "no such study, or nothing of the kind for it",
    413: "request body or number of files over the limit",
    415: "not a JPEG, PNG or DICOM file",
    422: "the request does not match this schema, or the image cannot be used (the detail says which and why)",
}


def responses(*codes: int) -> dict:
    """The ``responses=`` of a route: ``Problem`` for each status in ``codes``."""
    return {c: {"model": Problem, "description": WHY[c]} for c in codes}


def _where(loc: tuple) -> str:
    kind = {"query": "query parameter", "path": "path parameter", "body": "body field", "header": "header"}
    if not loc:
        return "request"
    head, rest = str(loc[0]), [str(x) for x in loc[1:]]
    return f"{kind.get(head, head)} {'.'.join(rest) or head!r}" if rest else kind.get(head, head)


def validation_problem(exc: RequestValidationError, hint: str = "") -> JSONResponse:
    """422 with one readable sentence per failed field (its location, what is wrong, the value sent) and the list."""
    errors = jsonable_encoder(exc.errors(), custom_encoder={BaseException: str})
    parts = []
    for e in errors:
        got = e.get("input")
        sent = "" if got is None or isinstance(got, (dict, list)) else f" (sent {str(got)[:80]!r})"
        parts.append(f"{_where(tuple(e.get('loc', ())))}: {e.get('msg', 'invalid')}{sent}")
    detail = "; ".join(parts) or "the request does not match the API schema"
    return JSONResponse({"detail": f"{detail}{hint}; see /docs for what to send", "errors": errors}, 422)


def known_query_only(request: Request) -> None:
    """A route dependency: 422 for a query parameter the route does not take (``?limt=5`` is a typo, not a default)."""
    route = request.scope.get("route")
    allowed = {q.alias for q in route.dependant.query_params} if route is not None else set()
    unknown = sorted(set(request.query_params) - allowed)
    if unknown:
        takes = ", ".join(sorted(allowed)) or "no query parameters"
        raise HTTPException(422, f"unknown query parameter(s) {', '.join(map(repr, unknown))}; {request.url.path} "
                                 f"takes: {takes}")
