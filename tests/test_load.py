"""A reduced ``bench/load_test.py`` in the suite: concurrent mixed load, every number checked.

Each returned row is compared with its text encoded alone and aligned by NumPy (1e-5 float32,
1e-3 float16). With a small queue the server answers 429 and the clients' retries (honouring
Retry-After) must still complete every request.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest

from app.config import Settings
from bench.load_test import LoadConfig, Reference, make_plan, run_load
from tests.servers import LiveServer


def _settings(served: tuple[Path, Path], **kw: object) -> Settings:
    model, profiles = served
    return Settings(model=f"local-dir:{model}", profiles_dir=profiles, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def reference(served_model: tuple[Path, Path]) -> Reference:
    model, profiles = served_model
    return Reference(f"local-dir:{model}", profiles, None)


def test_mixed_load_every_answer_right(
    served_model: tuple[Path, Path], reference: Reference
) -> None:
    plan = make_plan(LoadConfig(requests=150, max_texts=64, pool_size=300, seed=1))
    reference.prepare([t for p in plan for t in p.texts])
    with LiveServer(_settings(served_model)) as server:
        report = asyncio.run(run_load(server.url, plan, reference, clients=16))
    assert report.errors == 0, report.summary()
    assert report.ok == report.requests == 150, report.summary()
    assert report.retries_429 == 0, report.summary()  # the default queue never fills here
    assert {"float16", "float32"} <= set(report.max_err)


def test_small_queue_429_then_retries_complete_everything(
    served_model: tuple[Path, Path], reference: Reference
) -> None:
    plan = make_plan(
        LoadConfig(requests=60, min_texts=8, max_texts=32, pool_size=50, fresh_fraction=0.9, seed=2)
    )
    reference.prepare([t for p in plan for t in p.texts])
    settings = _settings(
        served_model, max_batch_size=8, max_queue_texts=32, retry_after_s=1, cache_enabled=False
    )
    with LiveServer(settings) as server:
        report = asyncio.run(run_load(server.url, plan, reference, clients=16))
    assert report.retries_429 > 0, "the small queue never filled: no 429 to retry"
    assert report.errors == 0, report.summary()
    assert report.ok == report.requests == 60, report.summary()
    assert set(report.statuses) <= {200, 429}, report.summary()


def test_request_larger_than_the_queue_is_413_not_endless_429(
    served_model: tuple[Path, Path],
) -> None:
    """More texts to encode than the queue can ever hold: retrying could never succeed."""
    settings = _settings(served_model, max_batch_size=8, max_queue_texts=32, cache_enabled=False)
    with LiveServer(settings) as server:
        texts = [f"one of too many captions {i}" for i in range(33)]
        r = httpx.post(server.url + "/v1/embeddings", json={"input": texts}, timeout=30)
        assert r.status_code == 413, r.text
        assert r.json()["error"]["code"] == "too_many_inputs" and "retry-after" not in r.headers
        ok = httpx.post(server.url + "/v1/embeddings", json={"input": texts[:32]}, timeout=30)
        assert ok.status_code == 200
