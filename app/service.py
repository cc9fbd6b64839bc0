"""Assembling the running service from settings: encoder, profiles, batcher, cache, embedder.

Kept out of ``app/api`` so that the wiring is testable without HTTP, and so that ``realign
serve`` can load (and fail on) the model before it binds a port.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from app.batcher import Batcher, BatchingConfig
from app.cache import EmbeddingCache, create_cache
from app.config import Settings
from app.embedder import Embedder
from app.encoder import TextEncoder, load_encoder
from app.errors import ProfileError
from app.metrics import Metrics
from app.profiles import ProfileRegistry

log = logging.getLogger(__name__)


@dataclass
class Service:
    settings: Settings
    metrics: Metrics
    encoder: TextEncoder
    profiles: ProfileRegistry
    batcher: Batcher
    cache: EmbeddingCache | None
    embedder: Embedder
    ready: bool = False
    accepting: bool = True
    served_name: str = field(default="")
    started_at: int = field(default_factory=lambda: int(time.time()))

    async def close(self) -> None:
        """Graceful: refuse new work, finish what is queued, stop the worker, close the cache."""
        self.accepting = False
        self.ready = False
        self.metrics.ready.set(0)
        await self.batcher.close(drain=True, timeout_s=self.settings.graceful_timeout_s)
        await self.embedder.drain()
        if self.cache is not None:
            await self.cache.close()


def load_profiles(settings: Settings, encoder: TextEncoder) -> ProfileRegistry:
    """Load every profile; serve only those built for this encoder (and with its dimension)."""
    registry = ProfileRegistry.from_dir(settings.profiles_dir)
    model_id = encoder.fingerprint.model_id
    for name in list(registry.profiles):
        prof = registry.profiles[name]
        problem = None
        if prof.dim != encoder.dim:
            problem = f"dimension {prof.dim} != encoder dimension {encoder.dim}"
        elif prof.model != model_id:
            problem = f"built for {prof.model!r}, the loaded encoder is {model_id!r}"
        if problem:
            log.error("not serving profile %r: %s (rebuild it with this model)", name, problem)
            registry.errors[name] = problem
            del registry.profiles[name]
    wanted = settings.default_profile
    if wanted is not None and wanted not in registry.profiles:
        raise ProfileError(
            f"REALIGN_DEFAULT_PROFILE={wanted!r} is not among the served profiles {registry.names()}"
        )
    registry.default = wanted or (registry.names()[0] if registry.profiles else None)
    if not registry.profiles:
        log.warning(
            "no profiles served from %s: only alignment 'none' will work", settings.profiles_dir
        )
    return registry


def prepare_encoder(settings: Settings) -> TextEncoder:
    """Load and warm up (blocking): done before binding the port in ``realign serve``."""
    encoder = load_encoder(settings)
    encoder.warmup()
    return encoder


async def start_service(
    settings: Settings, metrics: Metrics, encoder: TextEncoder | None = None
) -> Service:
    if encoder is None:
        encoder = await asyncio.to_thread(prepare_encoder, settings)
    profiles = load_profiles(settings, encoder)
    batcher = Batcher(
        encoder,
        BatchingConfig(
            max_batch_size=settings.max_batch_size,
            max_batch_tokens=settings.max_batch_tokens,
            max_wait_ms=settings.max_wait_ms,
            max_queue_texts=settings.max_queue_texts,
            retry_after_s=settings.retry_after_s,
        ),
        metrics,
    )
    batcher.start()
    cache = None
    if settings.cache_enabled:
        cache = create_cache(settings, namespace=encoder.fingerprint.cache_id, dim=encoder.dim, metrics=metrics)
        if settings.redis_url:
            await cache.probe()
    fp = encoder.fingerprint
    metrics.model_info.info(
        {
            "model": fp.arch,
            "pretrained": fp.weights,
            "device": str(encoder.device),
            "dtype": fp.dtype,
        }
    )
    service = Service(
        settings=settings,
        metrics=metrics,
        encoder=encoder,
        profiles=profiles,
        batcher=batcher,
        cache=cache,
        embedder=Embedder(encoder, batcher, cache, profiles, metrics),
        served_name=fp.arch,
    )
    service.ready = True
    metrics.ready.set(1)
    return service
