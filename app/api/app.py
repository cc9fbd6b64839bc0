"""The FastAPI application factory and its lifespan."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI

from app import __version__
from app.api import errors, routes_embeddings, routes_health, routes_meta
from app.api.deps import require_api_key
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
    app.state.api_keys = [k.get_secret_value().encode() for k in settings.api_keys]
    errors.install(app)
    app.include_router(routes_health.router)
    v1 = [Depends(require_api_key)]
    app.include_router(routes_embeddings.router, dependencies=v1, tags=["embeddings"])
    app.include_router(routes_meta.router, dependencies=v1, tags=["models"])
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics)
    return app
