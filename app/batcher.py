"""Continuous dynamic batching with admission control (TEI's ``queue.rs`` + ``infer.rs``, in small).

One worker thread owns the encoder. Requests put their (already tokenised) texts into one
queue; while the worker runs batch N, texts pile up, and the next batch takes up to
``max_batch_size`` texts and ``max_batch_tokens`` padded tokens, grouping texts of similar
length so that context trimming pads little. The oldest queued text is always in the next
batch, so nothing starves.

- Admission: a bounded count of queued texts, checked without waiting; full → OverloadError.
- Event-driven: the worker sleeps on a condition variable, never polls.
- A failed batch fails every request in it with the same EncoderError; later batches go on.
- A dead worker thread is noticed on the event loop, fails what it held, and is restarted;
  ``alive`` is False meanwhile (``/readyz``). Every job's future always resolves.
- Texts of requests whose client left are dropped before encoding and counted.

The batcher knows an encoder only through :class:`BatchEncoder`, so it can be tested with a
deterministic stand-in as well as the real model.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from app.errors import EncoderError, NotReadyError, OverloadError, TooManyInputsError
from app.metrics import Metrics

log = logging.getLogger(__name__)

#: How many queued texts the batch builder looks at when grouping by length.
WINDOW_FACTOR = 4
RESTART_DELAY_S = 0.05


class Tokens(Protocol):
    """A tokenised text: 1-D ids without padding (``encoder.TokenizedText`` satisfies it)."""

    @property
    def ids(self) -> torch.Tensor: ...


class BatchEncoder(Protocol):
    """What the batcher needs from an encoder."""

    dim: int

    def encode(self, batch: Sequence[Any]) -> torch.Tensor:
        """(n, dim) float32 CPU rows in input order."""
        ...


@dataclass(frozen=True)
class BatchingConfig:
    max_batch_size: int = 64
    max_batch_tokens: int = 16384
    max_wait_ms: float = 0.0
    max_queue_texts: int = 4096
    retry_after_s: int = 1


@dataclass(eq=False)
class Job:
    """One request's texts; its future resolves to an (n, dim) float32 tensor."""

    n: int
    out: torch.Tensor
    future: asyncio.Future[torch.Tensor]
    remaining: int
    cancelled: bool = False
    queue_wait_s: float = 0.0
    encode_s: float = 0.0

    def cancel(self) -> None:
        """The client left: queued texts are skipped; the future is cancelled."""
        self.cancelled = True
        if not self.future.done():
            self.future.cancel()


@dataclass(eq=False)
class _Entry:
    tokens: Any
    length: int
    job: Job
    row: int
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    """Queue + one encoder worker thread. Create inside a running event loop; call ``start``."""

    def __init__(self, encoder: BatchEncoder, config: BatchingConfig, metrics: Metrics) -> None:
        self.encoder = encoder
        self.config = config
        self.metrics = metrics
        self._cond = threading.Condition()
        self._pending: deque[_Entry] = deque()
        self._queued = 0
        self._inflight: list[_Entry] = []
        self._accepting = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._idle = asyncio.Event()
        self.batches_run = 0

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._accepting = True
        self._stopping = False
        self._spawn()

    def _spawn(self) -> None:
        self._thread = threading.Thread(target=self._run, name="realign-batcher", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    async def close(self, *, drain: bool = True, timeout_s: float = 30.0) -> None:
        """Stop accepting; with ``drain`` finish everything queued first; then stop the thread."""
        self._accepting = False
        if drain:
            deadline = time.monotonic() + timeout_s
            while (self._queued or self._inflight) and time.monotonic() < deadline and self.alive:
                self._idle.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._idle.wait(), timeout=0.5)
        with self._cond:
            self._stopping = True
            leftovers = list(self._pending)
            self._pending.clear()
            self._queued = 0
            self._cond.notify_all()
        self._fail(leftovers, NotReadyError("the service is shutting down"))
        thread = self._thread
        if thread is not None:
            await asyncio.to_thread(thread.join, timeout_s)

    # --- admission -----------------------------------------------------------------------
    def submit(self, tokens: Sequence[Any]) -> Job:
        """Queue texts for encoding or raise OverloadError at once (never waits)."""
        assert self._loop is not None, "Batcher.start() was not called"
        if not self._accepting:
            raise NotReadyError("the service is not accepting requests (starting or shutting down)")
        n = len(tokens)
        if n > self.config.max_queue_texts:  # would never fit: a 429 would be retried forever
            raise TooManyInputsError(
                f"{n} texts to encode exceed the queue capacity of "
                f"{self.config.max_queue_texts}; send fewer texts per request"
            )
        job = Job(
            n=n,
            out=torch.empty(n, self.encoder.dim, dtype=torch.float32),
            future=self._loop.create_future(),
            remaining=n,
        )
        if n == 0:
            job.future.set_result(job.out)
            return job
        entries = [_Entry(t, int(t.ids.shape[0]), job, i) for i, t in enumerate(tokens)]
        with self._cond:
            if self._queued + n > self.config.max_queue_texts:
                self.metrics.rejected_total.inc(n)
                raise OverloadError(
                    f"queue full ({self._queued} texts waiting, limit {self.config.max_queue_texts}); retry later",
                    retry_after_s=self.config.retry_after_s,
                )
            # a request's own texts go in length order, so its batches are homogeneous
            entries.sort(key=lambda e: e.length)
            self._pending.extend(entries)
            self._queued += n
            self.metrics.queue_depth.set(self._queued)
            self._cond.notify()
        return job

    # --- the worker thread ---------------------------------------------------------------
    def _run(self) -> None:
        exc: BaseException | None = None
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                if batch:
                    self._encode(batch)
        except BaseException as e:
            exc = e
        finally:
            if not self._stopping and self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._worker_died, exc)

    def _next_batch(self) -> list[_Entry] | None:
        cfg = self.config
        with self._cond:
            while not self._pending:
                if self._stopping:
                    return None
                self._loop_call(self._idle.set)
                self._cond.wait()
            if cfg.max_wait_ms > 0:
                deadline = self._pending[0].enqueued + cfg.max_wait_ms / 1000
                while len(self._pending) < cfg.max_batch_size and not self._stopping:
                    left = deadline - time.perf_counter()
                    if left <= 0:
                        break
                    self._cond.wait(timeout=left)
            batch, dropped = self._take()
            self._queued -= len(batch) + dropped
            self.metrics.queue_depth.set(self._queued)
            self._inflight = batch
        if dropped:
            self.metrics.dropped_total.inc(dropped)
        return batch

    def _take(self) -> tuple[list[_Entry], int]:
        """Pick the next batch (lock held): the oldest text plus neighbours in length."""
        cfg = self.config
        dropped = 0
        while self._pending and self._pending[0].job.cancelled:
            self._pending.popleft()
            dropped += 1
        if not self._pending:
            return [], dropped
        window: list[_Entry] = []
        limit = cfg.max_batch_size * WINDOW_FACTOR
        while self._pending and len(window) < limit:
            e = self._pending.popleft()
            if e.job.cancelled:
                dropped += 1
            else:
                window.append(e)
        oldest = window[0]
        by_length = sorted(window, key=lambda e: e.length)
        pos = by_length.index(oldest)
        size = min(cfg.max_batch_size, len(by_length))
        start = max(0, min(pos - size // 2, len(by_length) - size))
        chosen = by_length[start : start + size]
        # token budget: rows x longest row; drop the rows farthest in length from the oldest
        while (
            len(chosen) > 1 and len(chosen) * max(e.length for e in chosen) > cfg.max_batch_tokens
        ):
            far = max(chosen, key=lambda e: (abs(e.length - oldest.length), e is not oldest))
            chosen.remove(far)
        picked = {id(e) for e in chosen}
        rest = [e for e in window if id(e) not in picked]
        self._pending.extendleft(reversed(rest))
        return chosen, dropped

    def _encode(self, batch: list[_Entry]) -> None:
        start = time.perf_counter()
        for e in batch:
            self.metrics.queue_wait_seconds.observe(start - e.enqueued)
        try:
            out = self.encoder.encode([e.tokens for e in batch])
        except Exception as exc:  # a failed batch fails its requests, not the service
            log.exception("encoder batch of %d texts failed", len(batch))
            self.metrics.batch_failures_total.inc()
            self._loop_call(
                self._fail, batch, EncoderError("the encoder failed on this batch"), exc
            )
            with self._cond:
                self._inflight = []
            return
        elapsed = time.perf_counter() - start
        self.batches_run += 1
        longest = max(e.length for e in batch)
        self.metrics.encode_seconds.observe(elapsed)
        self.metrics.batch_size.observe(len(batch))
        self.metrics.batch_tokens.observe(len(batch) * longest)
        self.metrics.tokens_total.inc(sum(e.length for e in batch))
        self._loop_call(self._deliver, batch, out, start, elapsed)
        with self._cond:
            self._inflight = []

    def _loop_call(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(fn, *args)

    # --- on the event loop ---------------------------------------------------------------
    def _deliver(
        self, batch: list[_Entry], out: torch.Tensor, started: float, elapsed: float
    ) -> None:
        for k, e in enumerate(batch):
            job = e.job
            if job.future.done():
                continue
            job.out[e.row] = out[k]
            job.queue_wait_s = max(job.queue_wait_s, started - e.enqueued)
            job.remaining -= 1
            if job.remaining == 0:
                job.future.set_result(job.out)
        for job in {id(e.job): e.job for e in batch}.values():
            job.encode_s += elapsed

    def _fail(
        self, entries: list[_Entry], error: Exception, cause: BaseException | None = None
    ) -> None:
        for job in {id(e.job): e.job for e in entries}.values():
            if not job.future.done():
                if cause is not None:
                    error.__cause__ = cause
                job.future.set_exception(error)

    def _worker_died(self, exc: BaseException | None) -> None:
        log.error("batching worker died (%r); restarting", exc)
        self.metrics.worker_restarts_total.inc()
        with self._cond:
            held = self._inflight
            self._inflight = []
        self._fail(
            held, EncoderError("the batching worker crashed while encoding this request"), exc
        )
        if not self._stopping and self._loop is not None:
            self._loop.call_later(RESTART_DELAY_S, self._restart)

    def _restart(self) -> None:
        if not self._stopping:
            self._spawn()
