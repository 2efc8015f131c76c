"""Plain ASGI middleware (not BaseHTTPMiddleware, which buffers and breaks streamed responses)."""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from slimlm.serve.errors import error_response
from slimlm.serve.metrics import ServerMetrics

OPEN_PATHS = frozenset({"/health"})


class APIKeyMiddleware:
    """Every route but /health needs ``Authorization: Bearer KEY``."""

    def __init__(self, app: ASGIApp, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        if hmac.compare_digest(given, self.expected):
            return await self.app(scope, receive, send)
        response = error_response(401, "invalid or missing API key: send the header 'Authorization: Bearer <key>'")
        await response(scope, receive, send)


class StatusMetricsMiddleware:
    """Counts responses by route and status; unknown paths share one label so fuzzers cannot grow the series."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, routes: frozenset[str]):
        self.app = app
        self.metrics = metrics
        self.routes = routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in self.routes else "other"
        status = 500  # what the client gets if the app raises before starting a response

        async def send_and_count(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_count)
        finally:
            self.metrics.http_response(route, status)
