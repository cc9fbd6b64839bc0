"""A minimal HTTP/1.1 keep-alive load generator on raw asyncio streams.

Benchmarks here share 2 cores with the server, so the client's own CPU cost distorts what
is measured: httpx spends about a millisecond of CPU per request, this about a tenth of that
(measured by ``client_cpu_s`` in the result). Only what the benchmarks need: POST JSON, read
``Content-Length`` bodies, one request at a time per connection.
"""

from __future__ import annotations

import asyncio
import json
import resource
import statistics
import time
from collections.abc import Callable
from urllib.parse import urlsplit


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def _connection(host: str, port: int, path: str, next_body: Callable[[], bytes | None],
                      latencies: list[float]) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    head = f"POST {path} HTTP/1.1\r\nhost: {host}\r\ncontent-type: application/json\r\n"
    try:
        while (body := next_body()) is not None:
            t0 = time.perf_counter()
            writer.write(f"{head}content-length: {len(body)}\r\n\r\n".encode() + body)
            status_line = await reader.readline()
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)
            if not status_line.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"unexpected response: {status_line!r}")
            latencies.append(time.perf_counter() - t0)
    finally:
        writer.close()


async def post_load(url: str, bodies: Callable[[int], dict], concurrency: int, seconds: float) -> dict[str, float]:
    """POST ``bodies(i)`` as JSON from ``concurrency`` connections for ``seconds``."""
    parts = urlsplit(url)
    counter = iter(range(10**12))
    stop = time.perf_counter() + seconds
    latencies: list[float] = []

    def next_body() -> bytes | None:
        return json.dumps(bodies(next(counter))).encode() if time.perf_counter() < stop else None

    cpu0, t0 = _cpu(), time.perf_counter()
    await asyncio.gather(*(
        _connection(parts.hostname or "127.0.0.1", parts.port or 80, "/v1/embeddings", next_body, latencies)
        for _ in range(concurrency)
    ))
    elapsed = time.perf_counter() - t0
    lat = sorted(latencies)
    return {
        "requests": len(lat),
        "requests_s": len(lat) / elapsed,
        "p50_ms": 1000 * statistics.median(lat),
        "p99_ms": 1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))],
        "client_cpu_share": (_cpu() - cpu0) / elapsed,
    }
