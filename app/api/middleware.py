"""Pure ASGI middleware (no BaseHTTPMiddleware: it breaks disconnect detection and streaming).

- :class:`BodyLimit` answers 413 from ``Content-Length`` before reading a byte, and stops a
  chunked upload as soon as it passes the limit.
- :class:`RequestMetrics` counts requests by route template and status and times them.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.metrics import Metrics


class BodyTooLarge(HTTPException):
    """Raised from ``receive``; an HTTPException so FastAPI's body parsing passes it through."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"request body exceeds {limit} bytes")


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    declared = -1
                if declared > self.max_bytes or declared < 0:
                    await send_error(
                        send,
                        413 if declared > 0 else 400,
                        "body_too_large" if declared > 0 else "bad_request",
                        f"request body exceeds {self.max_bytes} bytes"
                        if declared > 0
                        else "invalid Content-Length",
                    )
                    return
        seen = 0
        limit = self.max_bytes

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, limited, send)


def error_body(message: str, type_: str, code: str) -> dict[str, dict[str, str]]:
    """The JSON error shape of DESIGN.md §3 (routes and middleware both answer with it)."""
    return {"error": {"message": message, "type": type_, "code": code}}


async def send_error(
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    type_: str = "invalid_request_error",
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """An error in the JSON shape of DESIGN.md §3, from middleware (before any route runs)."""
    body = orjson.dumps(error_body(message, type_, code))
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *(extra_headers or []),
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = {"code": 500}

        async def watching(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watching)
        finally:
            route = _route_label(scope)
            self.metrics.requests_total.labels(route, str(status["code"])).inc()
            self.metrics.request_duration_seconds.labels(route).observe(time.perf_counter() - start)


def _route_label(scope: Scope) -> str:
    """The route template (bounded cardinality), never the raw path."""
    route: Any = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"
