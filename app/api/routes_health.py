"""Liveness, readiness and Prometheus metrics: open even when API keys are set."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from app.api.responses import JSONBytes
from app.service import Service

router = APIRouter()


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process and its event loop answer."""
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(request: Request) -> JSONBytes:
    """Model loaded and warmed, worker alive, accepting. Redis does not count: we run without it."""
    service: Service | None = getattr(request.app.state, "service", None)
    checks = {
        "model_loaded": service is not None and service.ready,
        "worker_alive": service is not None and service.batcher.alive,
        "accepting": service is not None and service.accepting,
    }
    ok = all(checks.values())
    return JSONBytes(
        {"status": "ready" if ok else "not_ready", **checks}, status_code=200 if ok else 503
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
