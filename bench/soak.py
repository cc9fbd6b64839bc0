"""Soak test (not CI): minutes of steady load on ``realign serve``, watching for leaks.

Starts ``realign serve`` as a child process on loopback with a Redis cache (a private
``redis-server`` on a free port by default, so that its client count is ours alone; or
``--redis-url`` with a key prefix of its own, deleted afterwards), then keeps ``--clients``
async clients busy for ``--minutes``: mixed request sizes, repeated texts (cache hits) and new
ones (misses), all formats, and a few clients that give up mid-request (disconnects). Every
``--interval`` seconds it samples the server's RSS (``/proc/<pid>/status``), open file
descriptors (``/proc/<pid>/fd``), threads, and Redis ``connected_clients`` (``INFO clients``).

Reports growth after the warm-up (targets: RSS < 5 %, no fd or connection growth beyond +-2
for a keep-alive socket or an on-demand pool connection) and draws
the curves to ``docs/soak.png``::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/soak.py                 # 10 minutes
    .venv/bin/python bench/soak.py --minutes 3 --warmup 45 --clients 16

Exit status 1 if a target is missed or any request failed with 5xx or a wrong shape.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.load_test import caption, default_model
from tests.servers import ServerProcess, free_port

OUT = Path(__file__).resolve().parent.parent / "docs" / "soak.png"


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    threads: int
    redis_clients: int
    texts: int


@dataclass
class Load:
    requests: int = 0
    texts: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    bad: list[str] = field(default_factory=list)
    abandoned: int = 0


def proc_sample(pid: int) -> tuple[float, int, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    rss_kb = int(fields["VmRSS"].split()[0])
    threads = int(fields["Threads"].strip())
    fds = len(list(Path(f"/proc/{pid}/fd").iterdir()))
    return rss_kb / 1024, fds, threads


async def drive(url: str, clients: int, until: float, load: Load, seed: int) -> None:
    rng = random.Random(seed)
    pool = [caption(rng, f"s{i}") for i in range(3000)]
    counter = iter(range(10**9))

    async def client(k: int) -> None:
        r_local = random.Random(seed * 1000 + k)
        async with httpx.AsyncClient(base_url=url, timeout=60) as http:
            while time.monotonic() < until:
                n = max(1, int(np.exp(r_local.uniform(0, np.log(129)))))
                texts = [
                    r_local.choice(pool)
                    if r_local.random() < 0.6
                    else caption(r_local, f"f{next(counter)}")
                    for _ in range(n)
                ]
                fmt = r_local.choice(("float", "base64", "npy"))
                body: dict[str, object] = {
                    "input": texts,
                    "alignment": r_local.choice(("realign", "anchor", "none")),
                }
                headers = {}
                if fmt == "base64":
                    body["encoding_format"] = "base64"
                elif fmt == "npy":
                    headers["accept"] = "application/x-npy"
                abandon = r_local.random() < 0.02
                try:
                    r = await http.post(
                        "/v1/embeddings",
                        json=body,
                        headers=headers,
                        timeout=0.005 if abandon else 60,
                    )
                except httpx.TimeoutException:
                    load.abandoned += 1
                    continue
                except httpx.HTTPError as exc:
                    load.bad.append(f"{type(exc).__name__}: {exc}")
                    continue
                load.requests += 1
                load.statuses[r.status_code] += 1
                if r.status_code != 200:
                    load.bad.append(f"status {r.status_code}: {r.text[:200]}")
                    continue
                load.texts += n
                if fmt != "npy" and len(r.json()["data"]) != n:
                    load.bad.append(f"{n} texts, {len(r.json()['data'])} rows")

    await asyncio.gather(*(client(k) for k in range(clients)))


def start_private_redis() -> tuple[subprocess.Popen[bytes], str]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("no redis-server on PATH: pass --redis-url")
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        client = redis.Redis.from_url(url, socket_timeout=0.2)
        try:
            if client.ping():
                return proc, url
        except redis.RedisError:
            time.sleep(0.05)
        finally:
            client.close()
    raise RuntimeError("private redis-server did not start")


def growth(samples: list[Sample], warmup_s: float, attr: str) -> tuple[float, float]:
    """(value just after the warm-up, value at the end): medians of 3 samples each."""
    after = [s for s in samples if s.t >= warmup_s]
    if len(after) < 4:
        raise SystemExit("too few samples after the warm-up: run longer or sample more often")
    first = float(np.median([getattr(s, attr) for s in after[:3]]))
    last = float(np.median([getattr(s, attr) for s in after[-3:]]))
    return first, last


def plot(samples: list[Sample], warmup_s: float, out: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s.t / 60 for s in samples]
    fig, axes = plt.subplots(4, 1, figsize=(8, 9), sharex=True)
    rate = np.diff([s.texts for s in samples], prepend=0) / np.diff([0.0] + [s.t for s in samples])
    series = [
        ("server RSS (MiB)", [s.rss_mb for s in samples]),
        ("open fds / threads", None),
        ("Redis connected clients", [s.redis_clients for s in samples]),
        ("texts/s", rate),
    ]
    for ax, (label, values) in zip(axes, series, strict=True):
        if values is None:
            ax.plot(t, [s.fds for s in samples], label="fds")
            ax.plot(t, [s.threads for s in samples], label="threads")
            ax.legend(loc="lower right")
        else:
            ax.plot(t, values)
        ax.set_ylabel(label)
        ax.axvline(warmup_s / 60, color="grey", linestyle=":")
        ax.grid(alpha=0.3)
    axes[0].set_title(title)
    axes[-1].set_xlabel("minutes (dotted: end of warm-up)")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=60.0, help="seconds excluded from growth")
    ap.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--redis-url", help="shared Redis (default: a private redis-server)")
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--json", type=Path, help="also write the samples here")
    ap.add_argument("--log", type=Path, help="write the server's log here")
    args = ap.parse_args()

    redis_proc = None
    prefix = f"realign-soak-{uuid.uuid4().hex[:8]}:"
    if args.redis_url:
        redis_url = args.redis_url
    else:
        redis_proc, redis_url = start_private_redis()
    samples: list[Sample] = []
    load = Load()
    try:
        with tempfile.TemporaryDirectory(prefix="realign-soak-") as tmp:
            model, profiles = default_model(Path(tmp))
            env = {
                "REALIGN_MODEL": model,
                "REALIGN_PROFILES_DIR": str(profiles),
                "REALIGN_REDIS_URL": redis_url,
                "REALIGN_CACHE_PREFIX": prefix,
                "REALIGN_CACHE_TTL_S": "900",
                "REALIGN_LOG_LEVEL": "warning",
            }
            with ServerProcess(env) as server:
                rclient = redis.Redis.from_url(redis_url)
                pid = server.proc.pid
                t0 = time.monotonic()
                until = t0 + args.minutes * 60

                async def run() -> None:
                    driver = asyncio.create_task(drive(server.url, args.clients, until, load, 0))
                    while not driver.done():
                        rss, fds, threads = proc_sample(pid)
                        clients = int(rclient.info("clients")["connected_clients"]) - 1  # minus us
                        samples.append(
                            Sample(time.monotonic() - t0, rss, fds, threads, clients, load.texts)
                        )
                        print(
                            f"{samples[-1].t:7.0f}s rss {rss:7.1f} MiB fds {fds:4d} threads "
                            f"{threads:3d} redis clients {clients:3d} texts {load.texts}",
                            flush=True,
                        )
                        await asyncio.wait({driver}, timeout=args.interval)
                    await driver

                asyncio.run(run())
                elapsed = time.monotonic() - t0
                server.terminate()
                rc = server.proc.wait(timeout=90)
                log = server.output()
                if args.redis_url:  # a private server is simply stopped
                    keys = list(rclient.scan_iter(match=prefix + "*", count=1000))
                    for i in range(0, len(keys), 1000):
                        rclient.delete(*keys[i : i + 1000])
                rclient.close()
    finally:
        if redis_proc is not None:
            redis_proc.terminate()
            redis_proc.wait(timeout=10)

    rss0, rss1 = growth(samples, args.warmup, "rss_mb")
    fd0, fd1 = growth(samples, args.warmup, "fds")
    th0, th1 = growth(samples, args.warmup, "threads")
    rc0, rc1 = growth(samples, args.warmup, "redis_clients")
    rss_pct = 100 * (rss1 - rss0) / rss0
    peak_fds = max(s.fds for s in samples if s.t >= args.warmup)
    title = (
        f"soak {elapsed / 60:.1f} min, {args.clients} clients: RSS {rss_pct:+.1f}% after warm-up, "
        f"fds {fd0:.0f}->{fd1:.0f}, redis clients {rc0:.0f}->{rc1:.0f}"
    )
    plot(samples, args.warmup, args.out, title)
    if args.json:
        args.json.write_text(json.dumps([s.__dict__ for s in samples]))
    if args.log:
        args.log.write_text(log)
    errors = [line for line in log.splitlines() if "ERROR" in line or "Traceback" in line]
    print()
    print(
        f"duration    {elapsed:.0f} s ({args.minutes} min), {args.clients} clients, warm-up {args.warmup:.0f} s"
    )
    print(
        f"requests    {load.requests} ({load.texts} texts, {load.texts / elapsed:.0f} texts/s), "
        f"abandoned on purpose {load.abandoned}, statuses {dict(load.statuses)}"
    )
    print(f"bad         {len(load.bad)} {load.bad[:5]}")
    print(
        f"RSS         {rss0:.1f} -> {rss1:.1f} MiB ({rss_pct:+.2f}%) after warm-up; "
        f"start {samples[0].rss_mb:.1f}, max {max(s.rss_mb for s in samples):.1f}"
    )
    print(f"fds         {fd0:.0f} -> {fd1:.0f} (peak after warm-up {peak_fds})")
    print(f"threads     {th0:.0f} -> {th1:.0f}")
    print(f"redis conns {rc0:.0f} -> {rc1:.0f}")
    print(f"server log  {len(errors)} ERROR/Traceback lines; exit {rc}")
    for line in errors[:10]:
        print("   ", line)
    print(f"plot        {args.out}")
    # fds and Redis connections: a leak grows with requests (thousands of disconnects here);
    # +-2 is a keep-alive socket or a pool connection opened on demand (pools are bounded)
    ok = rss_pct < 5 and fd1 - fd0 <= 2 and rc1 - rc0 <= 2 and not load.bad and not errors
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
