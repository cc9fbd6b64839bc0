"""A cache of *raw* encoder outputs (before alignment), in Redis or in process.

Keys are ``{prefix}{encoder cache_id}:{blake2b(text)}``: a new encoder never sees another's
vectors, and because values are raw, any profile and alignment reuse them. A value is a small
header (token count, truncation flag, dtype) and the vector bytes (float16 or float32).

Redis failures never fail a request: they are translated to :class:`CacheError` here, the
caller treats them as misses, and a circuit breaker stops calling Redis for a cool-down after
a failure (a background probe closes it again when Redis answers), so a dead Redis costs one
timeout, not one per request. This is the only module that imports redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import struct
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from app.config import Settings
from app.errors import CacheError
from app.metrics import Metrics

log = logging.getLogger(__name__)

_HEADER = struct.Struct("<HBB")  # tokens, truncated, dtype code
_DTYPES: dict[int, np.dtype[Any]] = {0: np.dtype("<f2"), 1: np.dtype("<f4")}
_CODES = {"float16": 0, "float32": 1}


@dataclass(frozen=True)
class CachedEmbedding:
    """A raw encoder output plus what the response reports about its text."""

    vector: np.ndarray  # float32 (d,)
    tokens: int
    truncated: bool


def encode_value(item: CachedEmbedding, dtype: str) -> bytes:
    code = _CODES[dtype]
    header = _HEADER.pack(min(item.tokens, 0xFFFF), int(item.truncated), code)
    return header + np.ascontiguousarray(item.vector, dtype=_DTYPES[code]).tobytes()


def decode_value(raw: bytes, dim: int) -> CachedEmbedding | None:
    """``None`` for anything malformed (an old format, another dim): a miss, not an error."""
    if len(raw) < _HEADER.size:
        return None
    tokens, truncated, code = _HEADER.unpack_from(raw)
    dt = _DTYPES.get(code)
    if dt is None or len(raw) != _HEADER.size + dim * dt.itemsize:
        return None
    vec = np.frombuffer(raw, dtype=dt, offset=_HEADER.size).astype(np.float32)
    return CachedEmbedding(vec, tokens, bool(truncated))


def text_key(prefix: str, namespace: str, text: str) -> str:
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    return f"{prefix}{namespace}:{digest}"


class CacheBackend(Protocol):
    """Raw bytes by key; implementations raise :class:`CacheError` on failure."""

    name: str

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None: ...

    async def ping(self) -> None: ...

    async def close(self) -> None: ...


class MemoryBackend:
    """In-process LRU bounded in bytes, with TTL: the embedded default when no Redis is set.

    Only touched from the event loop thread, so it needs no lock.
    """

    name = "memory"

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self._items: OrderedDict[str, tuple[bytes, float]] = OrderedDict()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        now = time.monotonic()
        out: list[bytes | None] = []
        for key in keys:
            hit = self._items.get(key)
            if hit is None or hit[1] < now:
                if hit is not None:
                    self._drop(key)
                out.append(None)
            else:
                self._items.move_to_end(key)
                out.append(hit[0])
        return out

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        expires = time.monotonic() + ttl_s
        for key, value in items:
            if key in self._items:
                self._drop(key)
            if len(value) > self.max_bytes:
                continue
            self._items[key] = (value, expires)
            self.bytes += len(value)
        while self.bytes > self.max_bytes and self._items:
            self._drop(next(iter(self._items)))

    def _drop(self, key: str) -> None:
        value, _ = self._items.pop(key)
        self.bytes -= len(value)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        self._items.clear()
        self.bytes = 0


class RedisBackend:
    """redis-py asyncio client with a pool and tight timeouts (tens of ms)."""

    name = "redis"

    def __init__(self, url: str, *, timeout_s: float, pool_size: int) -> None:
        import redis.asyncio as aioredis

        self._errors: tuple[type[Exception], ...] = (
            aioredis.RedisError,
            OSError,
            asyncio.TimeoutError,
        )
        try:
            self._client = aioredis.Redis.from_url(
                url,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                max_connections=pool_size,
                retry_on_timeout=False,
                health_check_interval=30,
            )
        except (ValueError, *self._errors) as exc:  # a malformed URL is a start-up error
            raise CacheError(f"invalid Redis URL: {type(exc).__name__}") from exc

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        try:
            values: list[Any] = await self._client.mget(list(keys))
            return [v if v is None or isinstance(v, bytes) else bytes(v) for v in values]
        except self._errors as exc:
            raise CacheError(f"redis MGET failed: {type(exc).__name__}") from exc

    async def set_many(self, items: Sequence[tuple[str, bytes]], ttl_s: int) -> None:
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items:
                    pipe.set(key, value, ex=ttl_s)
                await pipe.execute()
        except self._errors as exc:
            raise CacheError(f"redis SET pipeline failed: {type(exc).__name__}") from exc

    async def ping(self) -> None:
        try:
            await self._client.ping()
        except self._errors as exc:
            raise CacheError(f"redis PING failed: {type(exc).__name__}") from exc

    async def close(self) -> None:
        with contextlib.suppress(*self._errors):
            await self._client.aclose()


class EmbeddingCache:
    """Typed cache front: keys, value encoding, the circuit breaker, metrics."""

    def __init__(
        self,
        backend: CacheBackend,
        *,
        namespace: str,
        prefix: str,
        dim: int,
        dtype: str,
        ttl_s: int,
        cooldown_s: float,
        metrics: Metrics,
    ) -> None:
        self.backend = backend
        self.namespace = namespace
        self.prefix = prefix
        self.dim = dim
        self.dtype = dtype
        self.ttl_s = ttl_s
        self.cooldown_s = cooldown_s
        self.metrics = metrics
        self._open_until = 0.0
        self._probe: asyncio.Task[None] | None = None
        self._writes: set[asyncio.Task[None]] = set()
        self._closed = False
        metrics.redis_up.set(1 if backend.name == "redis" else 0)

    def key(self, text: str) -> str:
        return text_key(self.prefix, self.namespace, text)

    @property
    def available(self) -> bool:
        return time.monotonic() >= self._open_until

    async def get_many(self, texts: Sequence[str]) -> list[CachedEmbedding | None]:
        """Look up texts in one round trip; any failure is all misses."""
        if not texts or not self.available:
            return [None] * len(texts)
        try:
            raw = await self.backend.get_many([self.key(t) for t in texts])
        except CacheError as exc:
            self._trip(exc)
            return [None] * len(texts)
        return [None if r is None else decode_value(r, self.dim) for r in raw]

    def put_many_background(self, items: Sequence[tuple[str, CachedEmbedding]]) -> None:
        """Write without delaying the response; the task is kept so it is not collected."""
        if not items or not self.available or self._closed:
            return
        task = asyncio.get_running_loop().create_task(self._put(list(items)))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _put(self, items: list[tuple[str, CachedEmbedding]]) -> None:
        payload = [(self.key(t), encode_value(v, self.dtype)) for t, v in items]
        try:
            await self.backend.set_many(payload, self.ttl_s)
        except CacheError as exc:
            self._trip(exc)

    async def flush(self) -> None:
        """Wait for background writes (tests, shutdown)."""
        while self._writes:
            await asyncio.gather(*list(self._writes), return_exceptions=True)

    def _trip(self, exc: CacheError) -> None:
        self.metrics.cache_errors_total.inc()
        if self.available:
            log.warning(
                "cache unavailable (%s); serving without it for %.1fs", exc.message, self.cooldown_s
            )
        self._open_until = time.monotonic() + self.cooldown_s
        self.metrics.redis_up.set(0)
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._recover())

    async def _recover(self) -> None:
        """Ping after each cool-down until the backend answers, then close the breaker."""
        while True:
            await asyncio.sleep(max(0.0, self._open_until - time.monotonic()))
            try:
                await self.backend.ping()
            except CacheError:
                self.metrics.cache_errors_total.inc()
                self._open_until = time.monotonic() + self.cooldown_s
                continue
            self._open_until = 0.0
            self.metrics.redis_up.set(1 if self.backend.name == "redis" else 0)
            log.info("cache backend is back")
            return

    async def probe(self) -> None:
        """Check the backend once at start-up so ``redis_up`` tells the truth from the start."""
        try:
            await self.backend.ping()
        except CacheError as exc:
            self._trip(exc)

    async def close(self) -> None:
        self._closed = True  # late writers (after the drain) are dropped, not sent to a closed client
        await self.flush()
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
        await self.backend.close()


def create_cache(settings: Settings, *, namespace: str, dim: int, metrics: Metrics) -> EmbeddingCache:
    """Redis when ``REALIGN_REDIS_URL`` is set, else the in-process LRU."""
    url = settings.redis_url.get_secret_value() if settings.redis_url else None
    backend: CacheBackend = (
        RedisBackend(url, timeout_s=settings.redis_timeout_ms / 1000, pool_size=settings.redis_pool_size)
        if url
        else MemoryBackend(settings.cache_memory_bytes)
    )
    return EmbeddingCache(
        backend,
        namespace=namespace,
        prefix=settings.cache_prefix,
        dim=dim,
        dtype=settings.cache_dtype,
        ttl_s=settings.cache_ttl_s,
        cooldown_s=settings.redis_breaker_cooldown_s,
        metrics=metrics,
    )
