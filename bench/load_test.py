"""Bounded async load test: every answer checked against a direct computation.

N concurrent clients send a fixed number of ``POST /v1/embeddings`` requests of 1-256 texts
(log-uniform sizes), mixing texts that repeat across requests (cache hits after the first time)
with texts never sent before (misses), alignments ``realign``/``anchor``/``none`` and the output
formats float JSON, base64 (float32/float16) and ``.npy`` (float32/float16). Each returned row
is compared with the text encoded *alone* by ``app.encoder.load_encoder`` and aligned by an
independent NumPy formula (``tests/reference.py``): tolerance 1e-5 for float32, 1e-3 for
float16. 429s are retried honouring ``Retry-After`` (``app.client``'s retry policy), so every
request must complete; any 5xx, transport failure or wrong number is an error::

    HF_HUB_OFFLINE=1 .venv/bin/python bench/load_test.py                 # 64 clients, 1000 requests
    .venv/bin/python bench/load_test.py --clients 16 --requests 150 --max-queue-texts 64
    .venv/bin/python bench/load_test.py --url http://127.0.0.1:8000 --model local-dir:... \\
        --profiles models/profiles                                       # an already running server

Without ``--url`` it starts ``realign serve`` on loopback (a child process) with the model and
profiles given (default: the demo model, else a tiny random model made in a temp dir).
Only loopback URLs are accepted. Exit status 1 if any answer was wrong or any request failed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.client import (
    AsyncRealignClient,
    RealignClientError,
    RetryEvent,
    RetryPolicy,
    parse_retry_after,
)
from bench.encoder_bench import _ACTIONS, _PLACES, _SUBJECTS

FORMATS = ("float", "base64-f32", "base64-f16", "npy-f32", "npy-f16")
ALIGNMENTS = ("realign", "realign", "anchor", "none")
TOLERANCE = {"float32": 1e-5, "float16": 1e-3}


# --- the plan ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class LoadConfig:
    clients: int = 64
    requests: int = 1000
    min_texts: int = 1
    max_texts: int = 256
    pool_size: int = 1500  # texts that repeat across requests: cache hits after first use
    fresh_fraction: float = 0.4  # share of a request's texts never sent before: misses
    long_fraction: float = 0.02  # texts past the context length (truncated)
    seed: int = 0


@dataclass(frozen=True)
class Planned:
    texts: list[str]
    fmt: str
    alignment: str


def caption(rng: random.Random, tag: str) -> str:
    return f"a photo of {rng.choice(_SUBJECTS)} {rng.choice(_ACTIONS)} {rng.choice(_PLACES)} {tag}"


def make_plan(cfg: LoadConfig) -> list[Planned]:
    """Deterministic requests: sizes log-uniform in [min_texts, max_texts]."""
    rng = random.Random(cfg.seed)
    pool = [caption(rng, f"p{i}") for i in range(cfg.pool_size)]
    plan = []
    lo, hi = math.log(cfg.min_texts), math.log(cfg.max_texts + 1)
    for r in range(cfg.requests):
        n = max(cfg.min_texts, min(cfg.max_texts, int(math.exp(rng.uniform(lo, hi)))))
        texts = []
        for j in range(n):
            u = rng.random()
            if u < cfg.long_fraction:
                texts.append(" ".join(["long"] * rng.randint(80, 120)) + f" r{r}.{j}")
            elif u < cfg.long_fraction + cfg.fresh_fraction:
                texts.append(caption(rng, f"r{r}.{j}"))
            else:
                texts.append(rng.choice(pool))
        plan.append(Planned(texts, FORMATS[r % len(FORMATS)], rng.choice(ALIGNMENTS)))
    return plan


# --- the direct computation ----------------------------------------------------------------------
def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def reference_rows(
    raw: np.ndarray, stats: dict[str, np.ndarray | float], alignment: str
) -> np.ndarray:
    """ReAlign in plain float64 NumPy (the formula of DESIGN.md §1, written again here)."""
    e = _unit(np.asarray(raw, np.float64))
    if alignment == "none":
        return e
    mu_t, mu_i, mu_hat = stats["mu_txt"], stats["mu_img"], stats["mu_hat"]
    if alignment == "anchor":
        return _unit(e - mu_t + mu_i)
    y = _unit(mu_i + float(stats["scale"]) * (e - mu_t))
    return _unit(y - mu_hat + mu_i)


class Reference:
    """Each text encoded alone by the real encoder (float32 raw), aligned with NumPy."""

    def __init__(self, model: str, profiles_dir: Path, profile: str | None) -> None:
        from app.config import Settings
        from app.encoder import load_encoder
        from app.profiles import ProfileRegistry

        self.encoder = load_encoder(Settings(model=model, profiles_dir=profiles_dir))
        prof = ProfileRegistry.from_dir(profiles_dir).get(profile)
        self.profile = prof.name
        self.stats: dict[str, np.ndarray | float] = {
            "mu_txt": prof.mu_txt,
            "mu_img": prof.mu_img,
            "mu_hat": prof.mu_hat,
            "scale": prof.scale,
        }
        self.raw: dict[str, np.ndarray] = {}

    def prepare(self, texts: Sequence[str]) -> float:
        """Encode every text not seen yet, one at a time; returns the seconds it took.

        One intra-op thread: for single short texts, thread start-up dominates (~10x slower
        with two threads on a busy 2-core machine). The setting is process-wide, so it is
        restored afterwards (a server in this process encodes with its usual threads).
        """
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        start = time.perf_counter()
        try:
            for t in dict.fromkeys(texts):
                if t not in self.raw:
                    self.raw[t] = self.encoder.encode_texts([t])[0].numpy()
        finally:
            torch.set_num_threads(threads)
        return time.perf_counter() - start

    def expected(self, texts: Sequence[str], alignment: str) -> np.ndarray:
        return reference_rows(np.stack([self.raw[t] for t in texts]), self.stats, alignment)


# --- running it ------------------------------------------------------------------------------------
@dataclass
class LoadReport:
    requests: int = 0
    texts: int = 0
    ok: int = 0
    wrong: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    server_errors: int = 0  # 5xx answers seen, retried or not
    retries_429: int = 0
    statuses: Counter[int] = field(default_factory=Counter)
    latencies: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0
    max_err: dict[str, float] = field(default_factory=dict)

    @property
    def errors(self) -> int:
        return len(self.wrong) + len(self.failed) + self.server_errors

    @property
    def texts_per_s(self) -> float:
        return self.texts / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies, q)) if self.latencies else float("nan")

    def summary(self) -> str:
        lines = [
            f"requests   {self.requests} ({self.ok} correct), texts {self.texts}",
            f"errors     {self.errors} (wrong {len(self.wrong)}, failed {len(self.failed)}, "
            f"5xx {self.server_errors}); 429 retried {self.retries_429}",
            f"throughput {self.texts_per_s:.1f} texts/s, {self.requests / self.elapsed_s:.1f} req/s "
            f"over {self.elapsed_s:.1f} s",
            f"latency    p50 {self.percentile(50) * 1000:.0f} ms, "
            f"p99 {self.percentile(99) * 1000:.0f} ms (incl. retries)",
            "max |err|  " + ", ".join(f"{k} {v:.2e}" for k, v in sorted(self.max_err.items())),
            f"statuses   {dict(sorted(self.statuses.items()))}",
        ]
        lines += [f"  WRONG  {w}" for w in self.wrong[:10]]
        lines += [f"  FAILED {f}" for f in self.failed[:10]]
        return "\n".join(lines)


def _decode_float(response: httpx.Response, n: int) -> np.ndarray:
    data = sorted(response.json()["data"], key=lambda d: d["index"])
    arr = np.asarray([d["embedding"] for d in data], dtype=np.float32)
    if arr.shape[0] != n:
        raise ValueError(f"expected {n} rows, got {arr.shape}")
    return arr


async def run_load(
    url: str,
    plan: Sequence[Planned],
    reference: Reference,
    *,
    clients: int,
    api_key: str | None = None,
    timeout_s: float = 120.0,
    max_retries: int = 60,
) -> LoadReport:
    """Send ``plan`` with ``clients`` concurrent workers; check every row against ``reference``."""
    report = LoadReport()
    retry = RetryPolicy(max_retries=max_retries, backoff_base=0.1, max_retry_after=5.0)

    def on_retry(event: RetryEvent) -> None:
        if event.status == 429:
            report.retries_429 += 1
        elif event.status is not None and event.status >= 500:
            report.server_errors += 1
        if event.status is not None:
            report.statuses[event.status] += 1

    headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(plan)):
        queue.put_nowait(i)
    rng = random.Random(1)

    async with httpx.AsyncClient(
        base_url=url, timeout=timeout_s, limits=limits, headers=headers
    ) as http:
        sdk = {
            (transport, dtype): AsyncRealignClient(
                url,
                transport=transport,
                dtype=dtype,
                retry=retry,
                on_retry=on_retry,
                http_client=http,
                max_batch=4096,
            )
            for transport in ("npy", "base64")
            for dtype in ("float32", "float16")
        }

        async def float_json(p: Planned) -> np.ndarray:
            """The float format is not in the SDK: a small loop honouring Retry-After."""
            body = {"input": p.texts, "alignment": p.alignment, "profile": reference.profile}
            for attempt in range(max_retries + 1):
                r = await http.post("/v1/embeddings", json=body)
                if r.status_code == 429 and attempt < max_retries:
                    report.retries_429 += 1
                    report.statuses[429] += 1
                    wait = parse_retry_after(r.headers.get("retry-after")) or 1.0
                    await asyncio.sleep(min(wait, 5.0) + rng.uniform(0, 0.1))
                    continue
                report.statuses[r.status_code] += 1
                if r.status_code >= 500:
                    report.server_errors += 1
                if r.status_code != 200:
                    raise RealignClientError(f"status {r.status_code}: {r.text[:200]}")
                return _decode_float(r, len(p.texts))
            raise AssertionError("unreachable")

        async def one(i: int) -> None:
            p = plan[i]
            fmt, _, bits = p.fmt.partition("-")
            dtype = "float16" if bits == "f16" else "float32"
            start = time.perf_counter()
            try:
                if fmt == "float":
                    got = await float_json(p)
                else:
                    got = await sdk[(fmt, dtype)].embed(
                        p.texts,
                        profile=reference.profile,
                        alignment=p.alignment,  # type: ignore[arg-type]
                    )
                    report.statuses[200] += 1
            except (RealignClientError, httpx.HTTPError, ValueError, KeyError) as exc:
                report.failed.append(f"request {i} ({p.fmt}, {len(p.texts)} texts): {exc!r}")
                return
            report.latencies.append(time.perf_counter() - start)
            want = reference.expected(p.texts, p.alignment)
            err = (
                float(np.max(np.abs(got.astype(np.float64) - want)))
                if got.shape == want.shape
                else math.inf
            )
            report.max_err[dtype] = max(report.max_err.get(dtype, 0.0), err)
            if err > TOLERANCE[dtype]:
                report.wrong.append(
                    f"request {i} ({p.fmt}, {p.alignment}, {len(p.texts)} texts): "
                    f"max |err| {err:.2e} > {TOLERANCE[dtype]:.0e}"
                )
            else:
                report.ok += 1

        async def worker() -> None:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                await one(i)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        report.elapsed_s = time.perf_counter() - t0
        for client in sdk.values():
            await client.aclose()
    report.requests = len(plan)
    report.texts = sum(len(p.texts) for p in plan)
    return report


# --- command line ------------------------------------------------------------------------------------
def default_model(workdir: Path) -> tuple[str, Path]:
    """The demo model if shipped, else a tiny random model and profile made in ``workdir``."""
    from app.config import DEFAULT_MODELS_DIR

    demo, profiles = DEFAULT_MODELS_DIR / "demo", DEFAULT_MODELS_DIR / "profiles"
    if (demo / "open_clip_config.json").exists() and any(profiles.glob("*.safetensors")):
        return f"local-dir:{demo}", profiles
    from tests.tiny_models import write_local_dir, write_profile_for

    model = write_local_dir(workdir / "tiny", seed=0)
    write_profile_for(model, workdir / "profiles")
    return f"local-dir:{model}", workdir / "profiles"


def _check_loopback(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to load-test {url}: only loopback servers")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--url", help="an already running server on loopback (else one is started)")
    ap.add_argument("--model", help="REALIGN_MODEL of the server (default: demo, else tiny)")
    ap.add_argument("--profiles", type=Path, help="profiles dir of the server")
    ap.add_argument("--profile", help="profile to request (default: the first)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--max-texts", type=int, default=256)
    ap.add_argument("--pool", type=int, default=1500, help="repeating texts (cache hits)")
    ap.add_argument("--fresh", type=float, default=0.4, help="share of never-seen texts")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-queue-texts", type=int, help="server queue size (small: 429s)")
    ap.add_argument("--max-batch-size", type=int, help="server batch size")
    ap.add_argument("--redis-url", help="server cache in this Redis (own key prefix, cleaned)")
    ap.add_argument("--api-key", help="Bearer key (sent, and configured on a started server)")
    args = ap.parse_args(argv)
    if args.max_texts > 2048:
        ap.error("--max-texts is at most 2048 (the server's per-request limit)")

    with tempfile.TemporaryDirectory(prefix="realign-load-") as tmp:
        if args.model and args.profiles:
            model, profiles = args.model, args.profiles
        elif args.url:
            ap.error("with --url give --model and --profiles too (for the reference)")
        else:
            model, profiles = default_model(Path(tmp))
        cfg = LoadConfig(
            clients=args.clients,
            requests=args.requests,
            max_texts=args.max_texts,
            pool_size=args.pool,
            fresh_fraction=args.fresh,
            seed=args.seed,
        )
        plan = make_plan(cfg)
        reference = Reference(model, profiles, args.profile)
        n_unique = len({t for p in plan for t in p.texts})
        print(f"reference: encoding {n_unique} distinct texts one at a time ...", flush=True)
        print(
            f"reference: {reference.prepare([t for p in plan for t in p.texts]):.1f} s", flush=True
        )

        if args.url:
            _check_loopback(args.url)
            report = asyncio.run(
                run_load(args.url, plan, reference, clients=args.clients, api_key=args.api_key)
            )
        else:
            report = _with_server(args, model, profiles, plan, reference)
    print(report.summary())
    return 0 if report.errors == 0 and report.ok == report.requests else 1


def _with_server(
    args: argparse.Namespace, model: str, profiles: Path, plan: list[Planned], reference: Reference
) -> LoadReport:
    import uuid

    from tests.servers import ServerProcess

    prefix = f"realign-load-{uuid.uuid4().hex[:8]}:"
    env = {
        "REALIGN_MODEL": model,
        "REALIGN_PROFILES_DIR": str(profiles),
        "REALIGN_LOG_LEVEL": "warning",
        "REALIGN_CACHE_PREFIX": prefix,
    }
    if args.max_queue_texts:
        env["REALIGN_MAX_QUEUE_TEXTS"] = str(args.max_queue_texts)
    if args.max_batch_size:
        env["REALIGN_MAX_BATCH_SIZE"] = str(args.max_batch_size)
    if args.redis_url:
        env["REALIGN_REDIS_URL"] = args.redis_url
    if args.api_key:
        env["REALIGN_API_KEYS"] = args.api_key
    try:
        with ServerProcess(env) as server:
            return asyncio.run(
                run_load(server.url, plan, reference, clients=args.clients, api_key=args.api_key)
            )
    finally:
        if args.redis_url:
            import redis

            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(match=prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
            client.close()


if __name__ == "__main__":
    sys.exit(main())
