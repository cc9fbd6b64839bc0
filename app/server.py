"""``realign serve``: uvicorn with the fastest available loop and parser, graceful shutdown.

The model is loaded and warmed up before the port is bound, so a missing weight fails the
process at start-up with a clear message, and a load balancer never sees a half-ready server.
On SIGTERM uvicorn stops accepting, lets in-flight requests finish (up to the graceful
timeout), then the lifespan drains the batch queue and exits.
"""

from __future__ import annotations

import importlib.util
import logging

import uvicorn

from app.config import Settings
from app.service import prepare_encoder

log = logging.getLogger("app.server")


def uvicorn_config(settings: Settings, app: object) -> uvicorn.Config:
    has = importlib.util.find_spec
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        loop="uvloop" if has("uvloop") else "asyncio",
        http="httptools" if has("httptools") else "h11",
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.graceful_timeout_s) or None,
        access_log=False,
        lifespan="on",
        server_header=False,
    )


def run(settings: Settings) -> None:
    from app.api import create_app

    # force: ``realign``'s main() already configured WARNING, which would make this a no-op
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        force=True,
    )
    log.info("loading %s (pretrained=%s)", settings.model, settings.pretrained)
    encoder = prepare_encoder(settings)
    log.info(
        "encoder ready: %s dim=%d device=%s trimming=%s",
        encoder.fingerprint.model_id,
        encoder.dim,
        encoder.device,
        encoder.trimming,
    )
    uvicorn.Server(uvicorn_config(settings, create_app(settings, encoder=encoder))).run()
