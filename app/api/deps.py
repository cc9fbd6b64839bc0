"""Typed dependencies handed to routes."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.errors import NotReadyError
from app.service import Service


async def get_service(request: Request) -> Service:
    service: Service | None = getattr(request.app.state, "service", None)
    if service is None or not service.ready:
        raise NotReadyError("the model is still loading")
    return service


ServiceDep = Annotated[Service, Depends(get_service)]
