"""Typed dependencies: the running service, and API-key auth for ``/v1``."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from app.errors import AuthError, NotReadyError
from app.service import Service


def get_service(request: Request) -> Service:
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReadyError("the model is still loading")
    return service


ServiceDep = Annotated[Service, Depends(get_service)]


def require_api_key(request: Request) -> None:
    """Bearer auth when keys are configured; every key is compared in constant time."""
    keys: list[bytes] = request.app.state.api_keys
    if not keys:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise AuthError("missing API key: send 'Authorization: Bearer <key>'")
    given = token.strip().encode()
    ok = False
    for key in keys:  # no early exit: timing does not reveal which key matched
        ok |= hmac.compare_digest(given, key)
    if not ok:
        raise AuthError("invalid API key")
