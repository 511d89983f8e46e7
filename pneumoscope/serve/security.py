"""Who may call, and how much they may send: the API key (constant-time compare), request body limits checked
before and while the body is read, and the security headers of every answer."""
from __future__ import annotations

import hmac

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from starlette.datastructures import Headers, MutableHeaders

PUBLIC_PATHS = ("/", "/health", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json", "/favicon.ico")
PAGE_CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
            "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
REPORT_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"

api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="required when the server was started with an API key")


def key_ok(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


class Guard:
    """ASGI middleware, before any body is read: the API key (401), the Content-Length (413), then the bytes
    actually received (413, for chunked or lying clients); adds no-cache / nosniff headers to every answer."""

    def __init__(self, app, api_key: str | None, max_body: int) -> None:
        self.app, self.api_key, self.max_body = app, api_key, max_body

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        path = scope["path"]
        public = path in PUBLIC_PATHS or path.startswith("/static/")
        if self.api_key and not public and not key_ok(headers.get("x-api-key"), self.api_key):
            await JSONResponse({"detail": "missing or wrong X-API-Key header"}, 401)(scope, receive, send)
            return
        length = headers.get("content-length")
        if length is not None and not length.isdigit():
            await JSONResponse({"detail": "invalid Content-Length header"}, 400)(scope, receive, send)
            return
        if length is not None and int(length) > self.max_body:
            await JSONResponse({"detail": f"request body of {length} bytes exceeds the limit of {self.max_body} "
                                          "bytes; send fewer or smaller files"}, 413)(scope, receive, send)
            return
        received = 0

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    raise HTTPException(413, f"request body exceeds the limit of {self.max_body} bytes")
            return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                h = MutableHeaders(scope=message)
                h.setdefault("X-Content-Type-Options", "nosniff")
                h.setdefault("Referrer-Policy", "no-referrer")
                h.setdefault("Cache-Control", "no-store")
            await send(message)

        await self.app(scope, counted_receive, send_with_headers)
