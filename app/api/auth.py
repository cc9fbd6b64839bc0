"""API-key auth for ``/v1/*``, checked before the request body is read.

As ASGI middleware rather than a route dependency: an unauthenticated client then costs a
header comparison, not an 8 MiB JSON parse, and learns nothing about validation.
``/healthz``, ``/readyz`` and ``/metrics`` stay open for probes and scrapers.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from app.api.middleware import send_error
from app.errors import AuthError

PROTECTED_PREFIX = "/v1/"


def check_api_key(header: str | None, keys: list[bytes]) -> None:
    """Accept ``Bearer <key>`` for any configured key; every key is compared in constant time."""
    scheme, _, token = (header or "").strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    given = token.strip().encode()
    ok = False
    for key in keys:  # no early exit: timing does not reveal which key matched
        ok |= hmac.compare_digest(given, key)
    if not ok:
        raise AuthError("invalid API key")


class ApiKeyAuth:
    def __init__(self, app: ASGIApp, keys: list[bytes]) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith(PROTECTED_PREFIX):
            header = next(
                (v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"),
                None,
            )
            try:
                check_api_key(header, self.keys)
            except AuthError as exc:
                await send_error(
                    send, 401, exc.code, exc.message, type_="authentication_error",
                    extra_headers=[(b"www-authenticate", b"Bearer")],
                )
                return
        await self.app(scope, receive, send)
