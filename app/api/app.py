"""The FastAPI application factory and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from app import __version__
from app.api import errors, routes_embeddings, routes_health, routes_meta
from app.api.auth import ApiKeyAuth
from app.api.middleware import BodyLimit, RequestMetrics
from app.config import Settings
from app.encoder import TextEncoder
from app.metrics import Metrics
from app.service import start_service


def create_app(
    settings: Settings, *, encoder: TextEncoder | None = None, metrics: Metrics | None = None
) -> FastAPI:
    """Build the app. ``encoder`` lets ``realign serve`` load the model before binding."""
    metrics = metrics or Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service = await start_service(settings, metrics, encoder)
        app.state.service = service
        try:
            yield
        finally:
            await service.close()

    app = FastAPI(
        title="realign-serve",
        version=__version__,
        description="Text in, pseudo-image embeddings out (OpenCLIP + ReAlign).",
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    app.state.service = None
    errors.install(app)
    app.include_router(routes_health.router)
    app.include_router(routes_embeddings.router, tags=["embeddings"])
    app.include_router(routes_meta.router, tags=["models"])
    # outermost last: metrics see every answer; auth answers before a body byte is read
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(ApiKeyAuth, keys=[k.get_secret_value().encode() for k in settings.api_keys])
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
