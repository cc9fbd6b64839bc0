"""Cached vs uncached throughput through the real service and the real Redis.

Workload: requests of 64 texts, base64 float16 responses, ``--concurrency`` clients, against
``realign serve`` (a separate process) with ``REALIGN_REDIS_URL`` set and a key prefix of this
run (deleted at the end). Pass 1 sends texts never seen (every text encoded: uncached); pass 2
sends the same requests again (every text a Redis hit). Reports texts/s for both, the cached
path's p50/p99 latency, and the share of request time spent in the cache lookup, from the
``x-cache-time`` header vs the client-observed latency.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/cache_bench.py [--model vit-b-32|demo] [--requests 60]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import DEFAULT_MODELS_DIR
from bench.encoder_bench import captions
from bench.serve_bench import random_local_dir
from tests.servers import ServerProcess
from tests.tiny_models import write_profile_for

REDIS_URL = "redis://127.0.0.1:6379/0"


async def run_pass(url: str, requests: list[list[str]], concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    cache_ms: list[float] = []
    hits = 0
    queue = list(reversed(requests))
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=httpx.Limits(max_connections=concurrency)) as c:
        async def worker() -> None:
            nonlocal hits
            while queue:
                texts = queue.pop()
                t0 = time.perf_counter()
                r = await c.post("/v1/embeddings", json={"input": texts, "encoding_format": "base64", "dtype": "float16"})
                r.raise_for_status()
                latencies.append(time.perf_counter() - t0)
                cache_ms.append(float(r.headers["x-cache-time"]))
                hits += int(r.headers["x-cache-hits"])

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {
        "texts_s": sum(len(r) for r in requests) / elapsed,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "cache_share": sum(cache_ms) / (1000 * sum(lat)),
        "cache_p50_ms": statistics.median(cache_ms),
        "hits": hits,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", choices=["demo", "vit-b-32"], default="demo")
    ap.add_argument("--requests", type=int, default=60)
    ap.add_argument("--concurrency", type=int, default=8)
    args = ap.parse_args()
    prefix = f"realign-bench-{uuid.uuid4().hex[:8]}:"
    texts = [f"{c} #{i}" for i, c in enumerate(captions(64 * args.requests, seed=2))]
    requests = [texts[i : i + 64] for i in range(0, len(texts), 64)]
    with tempfile.TemporaryDirectory(prefix="cache-bench-") as tmp:
        if args.model == "demo":
            model_dir, profiles = DEFAULT_MODELS_DIR / "demo", DEFAULT_MODELS_DIR / "profiles"
        else:
            model_dir = random_local_dir(Path(tmp))
            profiles = write_profile_for(model_dir, Path(tmp) / "profiles", name="bench").parent
        env = {"REALIGN_MODEL": f"local-dir:{model_dir}", "REALIGN_PROFILES_DIR": str(profiles),
               "REALIGN_REDIS_URL": REDIS_URL, "REALIGN_CACHE_PREFIX": prefix, "REALIGN_CACHE_DTYPE": "float16",
               "REALIGN_LOG_LEVEL": "warning"}
        try:
            with ServerProcess(env) as server:
                cold = asyncio.run(run_pass(server.url, requests, args.concurrency))
                time.sleep(0.5)  # background cache writes land
                warm = asyncio.run(run_pass(server.url, requests, args.concurrency))
        finally:
            client = redis.Redis.from_url(REDIS_URL)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
    print(f"model {args.model}: {args.requests} requests x 64 texts, base64 float16, concurrency {args.concurrency}")
    print(f"{'pass':<10}{'texts/s':>12}{'p50 ms':>10}{'p99 ms':>10}{'cache share':>13}{'hits':>8}")
    for name, m in (("uncached", cold), ("cached", warm)):
        print(f"{name:<10}{m['texts_s']:>12,.0f}{m['p50_ms']:>10.1f}{m['p99_ms']:>10.1f}{m['cache_share']:>12.1%}{m['hits']:>8}")
    print(f"cached / uncached: {warm['texts_s'] / cold['texts_s']:.1f}x;  cache lookup p50 {warm['cache_p50_ms']:.2f} ms "
          f"= {warm['cache_share']:.1%} of request time")


if __name__ == "__main__":
    main()
