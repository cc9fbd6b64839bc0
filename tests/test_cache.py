"""The raw-embedding cache: value format, the in-process LRU, and the real Redis (shared by
two replicas, TTL, and a private redis-server killed and restarted under load)."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from app.cache import CachedEmbedding, MemoryBackend, decode_value, encode_value
from app.config import Settings
from tests.servers import LiveServer, free_port
from tests.test_api import metric

REDIS_URL = "redis://127.0.0.1:6379/0"


def _settings(served: tuple[Path, Path], **kw: object) -> Settings:
    model, profiles = served
    return Settings(model=f"local-dir:{model}", profiles_dir=profiles, **kw)  # type: ignore[arg-type]


@pytest.fixture()
def prefix() -> Iterator[str]:
    """A key prefix of this test's own; every key under it is deleted afterwards."""
    p = f"realign-test-{uuid.uuid4().hex[:8]}:"
    yield p
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(match=p + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def _embed(url: str, texts: list[str], **extra: object) -> tuple[np.ndarray, httpx.Response]:
    r = httpx.post(
        url + "/v1/embeddings",
        json={"input": texts, **extra},
        headers={"accept": "application/x-npy"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    import io

    return np.load(io.BytesIO(r.content)), r


# --- value format and the in-process backend --------------------------------------------------
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_value_roundtrip(dtype: str) -> None:
    v = np.random.default_rng(0).normal(size=64).astype(np.float32)
    raw = encode_value(CachedEmbedding(v, 17, True), dtype)
    assert len(raw) == 4 + 64 * (2 if dtype == "float16" else 4)
    back = decode_value(raw, 64)
    assert back is not None and back.tokens == 17 and back.truncated
    tol = 1e-3 if dtype == "float16" else 0
    assert np.max(np.abs(back.vector - v)) <= tol
    assert decode_value(raw, 65) is None and decode_value(b"xy", 64) is None


async def test_memory_backend_is_bounded_in_bytes_and_expires() -> None:
    mem = MemoryBackend(max_bytes=1000)
    await mem.set_many([(f"k{i}", b"x" * 100) for i in range(15)], ttl_s=60)
    assert mem.bytes <= 1000
    got = await mem.get_many([f"k{i}" for i in range(15)])
    assert got[:5] == [None] * 5 and all(g == b"x" * 100 for g in got[5:])
    await mem.get_many(["k5"])  # touch: k5 becomes most recent
    await mem.set_many([("new", b"y" * 100)], ttl_s=60)
    assert (await mem.get_many(["k5", "k6"])) == [b"x" * 100, None]
    await mem.set_many([("short", b"z")], ttl_s=0)
    await asyncio.sleep(0.01)
    assert (await mem.get_many(["short"])) == [None]


# --- with the real Redis ----------------------------------------------------------------------
def test_miss_then_hit_same_values_any_alignment(
    served_model: tuple[Path, Path], prefix: str
) -> None:
    settings = _settings(
        served_model, redis_url=REDIS_URL, cache_prefix=prefix, cache_dtype="float32"
    )
    texts = [f"a cached caption {i}" for i in range(10)]
    with LiveServer(settings) as s:
        assert metric(s.url, "realign_redis_up") == 1
        fresh, r1 = _embed(s.url, texts)
        assert r1.headers["x-cache-hits"] == "0"
        asyncio.run(asyncio.sleep(0.2))  # cache writes are in the background
        cached, r2 = _embed(s.url, texts)
        assert r2.headers["x-cache-hits"] == "10"
        np.testing.assert_array_equal(cached, fresh)
        anchor, r3 = _embed(
            s.url, texts, alignment="anchor"
        )  # raw vectors: any alignment reuses them
        assert r3.headers["x-cache-hits"] == "10"
        assert metric(s.url, "realign_cache_hits_total") == 20
        assert metric(s.url, "realign_cache_misses_total") == 10
        keys = redis.Redis.from_url(REDIS_URL).keys(prefix + "*")
        assert len(keys) == 10
        assert not np.allclose(anchor, fresh)


def test_duplicates_in_a_request_and_in_flight_are_encoded_once(
    served_model: tuple[Path, Path],
) -> None:
    settings = _settings(served_model, cache_enabled=False, max_batch_size=1)
    texts = [f"shared caption {k}" for k in range(40)]
    with LiveServer(settings) as s:
        _embed(s.url, ["same", "same", "other", "same"])
        assert metric(s.url, "realign_batch_size_sum") == 2

        async def many() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                return await asyncio.gather(
                    *(c.post("/v1/embeddings", json={"input": texts}) for _ in range(8))
                )

        responses = asyncio.run(many())
        assert all(r.status_code == 200 for r in responses)
        first = responses[0].json()["data"]
        assert all(r.json()["data"] == first for r in responses)
        encoded = metric(s.url, "realign_batch_size_sum") - 2
        assert encoded < 2 * len(texts), encoded  # 8 requests x 40 texts, encoded about once


def test_ttl_is_honoured(served_model: tuple[Path, Path], prefix: str) -> None:
    settings = _settings(served_model, redis_url=REDIS_URL, cache_prefix=prefix, cache_ttl_s=1)
    with LiveServer(settings) as s:
        _embed(s.url, ["ttl text"])
        asyncio.run(asyncio.sleep(0.2))
        client = redis.Redis.from_url(REDIS_URL)
        (key,) = client.keys(prefix + "*")
        assert 0 < client.pttl(key) <= 1000
        assert _embed(s.url, ["ttl text"])[1].headers["x-cache-hits"] == "1"
        asyncio.run(asyncio.sleep(1.3))
        assert _embed(s.url, ["ttl text"])[1].headers["x-cache-hits"] == "0"


def test_two_replicas_share_hits(served_model: tuple[Path, Path], prefix: str) -> None:
    settings = _settings(
        served_model, redis_url=REDIS_URL, cache_prefix=prefix, cache_dtype="float16"
    )
    texts = [f"replica caption {i}" for i in range(16)]
    with LiveServer(settings) as a, LiveServer(settings) as b:
        from_a, _ = _embed(a.url, texts)
        asyncio.run(asyncio.sleep(0.2))
        from_b, r = _embed(b.url, texts)
        assert r.headers["x-cache-hits"] == "16"
        assert np.max(np.abs(from_a - from_b)) < 2e-3  # float16 storage of the raw vectors
        assert metric(b.url, "realign_batch_size_sum") == 0  # replica b encoded nothing


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    assert exe, "redis-server is installed on every machine of this kind"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(100):
        try:
            if redis.Redis(port=port, socket_timeout=0.2).ping():
                return proc
        except redis.RedisError:
            time.sleep(0.05)
    raise RuntimeError("private redis-server did not start")


def test_redis_killed_and_restarted_under_load(served_model: tuple[Path, Path]) -> None:
    port = free_port()
    proc = _start_redis(port)
    settings = _settings(
        served_model,
        redis_url=f"redis://127.0.0.1:{port}/0",
        redis_breaker_cooldown_s=0.5,
        redis_timeout_ms=50,
    )
    texts = [f"fault caption {i}" for i in range(8)]
    try:
        with LiveServer(settings) as s:
            reference, _ = _embed(s.url, texts)
            asyncio.run(asyncio.sleep(0.2))
            assert _embed(s.url, texts)[1].headers["x-cache-hits"] == "8"
            proc.kill()
            proc.wait()
            for i in range(30):  # load while Redis is gone: every request still right
                batch = texts if i % 2 else [f"new text {i}"]
                got, r = _embed(s.url, batch)
                if batch is texts:
                    np.testing.assert_allclose(got, reference, atol=1e-6)
            assert metric(s.url, "realign_redis_up") == 0
            assert metric(s.url, "realign_cache_errors_total") >= 1
            proc = _start_redis(port)
            deadline = time.monotonic() + 10
            while metric(s.url, "realign_redis_up") != 1 and time.monotonic() < deadline:
                asyncio.run(asyncio.sleep(0.1))
            assert metric(s.url, "realign_redis_up") == 1
            _embed(s.url, texts)  # refill the fresh (empty) Redis
            asyncio.run(asyncio.sleep(0.2))
            again, r = _embed(s.url, texts)
            assert r.headers["x-cache-hits"] == "8"
            np.testing.assert_allclose(again, reference, atol=1e-6)
    finally:
        proc.kill()
        proc.wait()
