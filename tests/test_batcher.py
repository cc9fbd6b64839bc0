"""The batching loop with a deterministic stand-in encoder (and the real tiny model)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import pytest
import torch

from app.batcher import Batcher, BatchingConfig
from app.errors import EncoderError, NotReadyError, OverloadError
from app.metrics import Metrics


@dataclass(frozen=True)
class Tok:
    ids: torch.Tensor


def tok(value: int, length: int = 3) -> Tok:
    """A fake tokenised text whose 'embedding' is its value; ``length`` sets its token count."""
    return Tok(torch.full((length,), value, dtype=torch.long))


class StandIn:
    """Deterministic encoder: row = [value, length, batch number]; can block, fail or die."""

    dim = 3

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.gate = threading.Event()
        self.gate.set()
        self.fail_on: set[int] = set()
        self.die_on: set[int] = set()

    def encode(self, batch: Sequence[Tok]) -> torch.Tensor:
        self.gate.wait(timeout=10)
        values = [int(t.ids[0]) for t in batch]
        self.batches.append(values)
        if self.fail_on & set(values):
            raise RuntimeError("boom")
        if self.die_on & set(values):
            self.die_on.clear()
            raise SystemExit("worker killed")  # BaseException: kills the thread
        n = len(self.batches)
        return torch.tensor(
            [[v, int(t.ids.shape[0]), n] for v, t in zip(values, batch, strict=True)],
            dtype=torch.float32,
        )


async def _batcher(encoder: StandIn, **cfg: int) -> tuple[Batcher, Metrics]:
    metrics = Metrics()
    b = Batcher(encoder, BatchingConfig(**cfg), metrics)  # type: ignore[arg-type]
    b.start()
    return b, metrics


def _sample(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    return 0.0 if value is None else value


async def test_each_job_gets_its_own_rows_and_batches_form_under_load() -> None:
    enc = StandIn()
    b, metrics = await _batcher(enc, max_batch_size=8)
    enc.gate.clear()  # hold the worker so a queue builds up
    jobs = [b.submit([tok(100 * j + k, length=1 + (k % 5)) for k in range(3)]) for j in range(20)]
    await asyncio.sleep(0.05)
    enc.gate.set()
    outs = await asyncio.gather(*(j.future for j in jobs))
    for j, out in enumerate(outs):
        assert out[:, 0].tolist() == [100 * j + k for k in range(3)]
    assert max(len(x) for x in enc.batches) == 8
    assert _sample(metrics, "realign_batch_size_count") == len(enc.batches)
    assert len(enc.batches) <= 60 // 8 + 2
    await b.close()


async def test_queue_full_is_refused_at_once() -> None:
    enc = StandIn()
    b, metrics = await _batcher(enc, max_batch_size=2, max_queue_texts=4, retry_after_s=3)
    enc.gate.clear()
    first = b.submit([tok(1), tok(2)])
    await asyncio.sleep(0.05)  # the worker holds batch 1; the queue is empty again
    b.submit([tok(3), tok(4), tok(5), tok(6)])
    with pytest.raises(OverloadError) as info:
        b.submit([tok(7)])
    assert info.value.retry_after_s == 3
    assert _sample(metrics, "realign_rejected_texts_total") == 1
    enc.gate.set()
    await first.future
    await b.close()


async def test_oldest_first_and_length_grouping_within_token_budget() -> None:
    enc = StandIn()
    b, _ = await _batcher(enc, max_batch_size=4, max_batch_tokens=4 * 10)
    enc.gate.clear()
    blocker = b.submit([tok(0)])
    await asyncio.sleep(0.05)
    lengths = [
        50,
        2,
        3,
        40,
        2,
        45,
        3,
        2,
    ]  # the oldest (50) fits alone in a 40-token budget? no: 1 row
    jobs = [b.submit([tok(i + 1, length=n)]) for i, n in enumerate(lengths)]
    enc.gate.set()
    await asyncio.gather(blocker.future, *(j.future for j in jobs))
    batches = enc.batches[1:]
    assert batches[0] == [1]  # the oldest goes first, alone: 2 x 50 tokens > budget
    for batch in batches:
        longest = max(lengths[v - 1] for v in batch)
        assert len(batch) == 1 or len(batch) * longest <= 40
    short = [v for batch in batches for v in batch if lengths[v - 1] <= 3]
    assert any(len(batch) >= 3 for batch in batches)  # short texts grouped together
    assert sorted(short) == [2, 3, 5, 7, 8]
    await b.close()


async def test_failed_batch_fails_its_requests_only() -> None:
    enc = StandIn()
    b, metrics = await _batcher(enc, max_batch_size=4)
    enc.fail_on = {13}
    bad = b.submit([tok(13), tok(14)])
    with pytest.raises(EncoderError, match="encoder failed"):
        await bad.future
    good = b.submit([tok(15)])
    assert (await good.future)[0, 0] == 15
    assert _sample(metrics, "realign_batch_failures_total") == 1
    assert b.alive
    await b.close()


async def test_dead_worker_fails_held_jobs_restarts_and_serves_again() -> None:
    enc = StandIn()
    b, metrics = await _batcher(enc, max_batch_size=4)
    enc.die_on = {66}
    doomed = b.submit([tok(66)])
    with pytest.raises(EncoderError, match="crashed"):
        await asyncio.wait_for(doomed.future, 5)
    for _ in range(100):
        if b.alive and _sample(metrics, "realign_worker_restarts_total") == 1:
            break
        await asyncio.sleep(0.02)
    assert b.alive
    after = b.submit([tok(67)])
    assert (await asyncio.wait_for(after.future, 5))[0, 0] == 67
    await b.close()


async def test_cancelled_jobs_are_dropped_before_encoding() -> None:
    enc = StandIn()
    b, metrics = await _batcher(enc, max_batch_size=2)
    enc.gate.clear()
    blocker = b.submit([tok(1)])
    await asyncio.sleep(0.05)
    gone = b.submit([tok(50 + k) for k in range(6)])
    gone.cancel()
    kept = b.submit([tok(9)])
    enc.gate.set()
    await blocker.future
    await kept.future
    encoded = {v for batch in enc.batches for v in batch}
    assert not encoded & set(range(50, 56))
    assert _sample(metrics, "realign_dropped_texts_total") == 6
    await b.close()


async def test_close_drains_then_refuses() -> None:
    enc = StandIn()
    b, _ = await _batcher(enc, max_batch_size=2)
    enc.gate.clear()
    jobs = [b.submit([tok(i)]) for i in range(7)]
    closing = asyncio.ensure_future(b.close(drain=True))
    await asyncio.sleep(0.05)
    with pytest.raises(NotReadyError):
        b.submit([tok(99)])
    enc.gate.set()
    await closing
    assert [int((await j.future)[0, 0]) for j in jobs] == list(range(7))
    assert not b.alive


async def test_real_tiny_encoder_through_the_batcher(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from app.config import Settings
    from app.encoder import load_encoder
    from tests.tiny_models import write_local_dir

    enc = load_encoder(Settings(model=f"local-dir:{write_local_dir(tmp_path / 'tiny', seed=0)}"))
    texts = [f"caption number {i} " + "word " * (i % 9) for i in range(40)]
    b, _ = await _batcher(enc, max_batch_size=16)  # type: ignore[arg-type]
    jobs = [b.submit(enc.tokenize([t])) for t in texts]
    outs = torch.cat(await asyncio.gather(*(j.future for j in jobs)))
    torch.testing.assert_close(outs, enc.encode_texts(texts), atol=1e-5, rtol=0)
    assert b.batches_run < len(texts)
    await b.close()


async def test_max_wait_collects_a_fuller_batch() -> None:
    enc = StandIn()
    b, _ = await _batcher(enc, max_batch_size=8, max_wait_ms=1000)
    jobs = []
    for i in range(5):  # trickle in, well within the wait
        jobs.append(b.submit([tok(i)]))
        await asyncio.sleep(0.02)
    await asyncio.gather(*(j.future for j in jobs))
    assert enc.batches == [[0, 1, 2, 3, 4]]
    full = [b.submit([tok(10 + i)]) for i in range(8)]  # a full batch does not wait
    await asyncio.wait_for(asyncio.gather(*(j.future for j in full)), 0.8)
    await b.close()
