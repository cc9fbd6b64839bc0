"""The request path below the HTTP layer: cache → batcher → encoder → realign.

One request's texts are de-duplicated, looked up in the cache in one round trip, and only the
misses are tokenised and queued. Identical texts already being encoded for another request are
awaited, not encoded twice. Raw encoder outputs go back to the cache in the background, and
the requested profile and alignment are applied last, so any profile reuses any cached vector.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from app.batcher import Batcher, Job, Tokens
from app.cache import CachedEmbedding, EmbeddingCache
from app.metrics import Metrics
from app.profiles import Profile, ProfileRegistry
from app.realign import align

#: Above this many floats, alignment runs in a worker thread instead of on the event loop.
_OFFLOAD_FLOATS = 1 << 18
#: Below this many texts, tokenising inline is cheaper than a thread hop.
_INLINE_TOKENIZE = 16


def _cancel_requested() -> bool:
    """Whether the current task itself is being cancelled (Python >= 3.11 can tell)."""
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else False


class Tokenizer(Protocol):
    def tokenize(self, texts: Sequence[str]) -> list[Any]: ...


@dataclass(frozen=True)
class EmbedResult:
    vectors: torch.Tensor  # (n, d) float32, aligned, input order
    tokens: int
    truncated: list[int]
    cache_hits: int
    queue_s: float
    inference_s: float
    cache_s: float
    profile: str | None


@dataclass(eq=False)
class _Shared:
    """A text being encoded: the owner's result, awaited by later identical requests too."""

    future: asyncio.Future[CachedEmbedding]
    waiters: int = 0


@dataclass
class Embedder:
    encoder: Tokenizer
    batcher: Batcher
    cache: EmbeddingCache | None
    profiles: ProfileRegistry
    metrics: Metrics
    _inflight: dict[str, _Shared] = field(default_factory=dict)
    _background: set[asyncio.Task[dict[str, CachedEmbedding]]] = field(default_factory=set)

    def profile(self, name: str | None, alignment: str) -> Profile | None:
        """Resolve the profile first, so an unknown name is a 404 before any work.

        ``none`` needs no profile: without a name it uses none (and reports none)."""
        if alignment == "none" and name is None:
            return None
        return self.profiles.get(name)

    async def embed(
        self, texts: Sequence[str], profile: Profile | None, alignment: str
    ) -> EmbedResult:
        unique = list(dict.fromkeys(texts))
        raw, hits, cache_s = await self._lookup(unique)
        queue_s = inference_s = 0.0
        missing = [t for t in unique if t not in raw]
        if missing:
            found, queue_s, inference_s = await self._encode_shared(missing)
            raw.update(found)
        self.metrics.texts_total.inc(len(texts))
        index = {t: i for i, t in enumerate(unique)}
        matrix = torch.from_numpy(np.stack([raw[t].vector for t in unique]))
        rows = torch.tensor([index[t] for t in texts]) if len(unique) != len(texts) else None
        vectors = await self._align(matrix, profile, alignment)
        if rows is not None:
            vectors = vectors.index_select(0, rows)
        truncated = [i for i, t in enumerate(texts) if raw[t].truncated]
        if truncated:
            self.metrics.texts_truncated_total.inc(len(truncated))
        return EmbedResult(
            vectors=vectors,
            tokens=sum(raw[t].tokens for t in texts),
            truncated=truncated,
            cache_hits=hits,
            queue_s=queue_s,
            inference_s=inference_s,
            cache_s=cache_s,
            profile=profile.name if profile is not None else None,
        )

    async def _lookup(self, unique: list[str]) -> tuple[dict[str, CachedEmbedding], int, float]:
        if self.cache is None:
            return {}, 0, 0.0
        start = time.perf_counter()
        values = await self.cache.get_many(unique)
        elapsed = time.perf_counter() - start
        self.metrics.cache_seconds.observe(elapsed)
        found = {t: v for t, v in zip(unique, values, strict=True) if v is not None}
        self.metrics.cache_hits_total.inc(len(found))
        self.metrics.cache_misses_total.inc(len(unique) - len(found))
        return found, len(found), elapsed

    async def _encode_shared(
        self, missing: list[str]
    ) -> tuple[dict[str, CachedEmbedding], float, float]:
        """Encode what nobody is encoding; await what somebody already is."""
        mine = [t for t in missing if t not in self._inflight]
        theirs = {t: self._inflight[t] for t in missing if t in self._inflight}
        for shared in theirs.values():
            shared.waiters += 1
        loop = asyncio.get_running_loop()
        owned = {t: _Shared(loop.create_future()) for t in mine}
        self._inflight.update(owned)
        result: dict[str, CachedEmbedding] = {}
        queue_s = inference_s = 0.0
        orphaned: list[str] = []
        try:
            if mine:
                encoded, queue_s, inference_s = await self._encode_own(mine, owned)
                result.update(encoded)
            for t, shared in theirs.items():
                try:
                    result[t] = await asyncio.shield(shared.future)
                except asyncio.CancelledError:
                    if not shared.future.cancelled() or _cancel_requested():
                        raise  # our own client left
                    orphaned.append(t)  # the owner's client left before queueing them
        finally:
            for shared in theirs.values():
                shared.waiters -= 1
        if orphaned:
            found, more_queue_s, more_inference_s = await self._encode_shared(orphaned)
            result.update(found)
            queue_s += more_queue_s
            inference_s += more_inference_s
        return result, queue_s, inference_s

    async def _encode_own(
        self, texts: list[str], owned: dict[str, _Shared]
    ) -> tuple[dict[str, CachedEmbedding], float, float]:
        job: Job | None = None
        tokens: list[Tokens] = []
        try:
            if len(texts) < _INLINE_TOKENIZE:
                tokens = self.encoder.tokenize(texts)
            else:
                tokens = await asyncio.to_thread(self.encoder.tokenize, texts)
            job = self.batcher.submit(tokens)
            await asyncio.shield(job.future)
        except asyncio.CancelledError:
            # our client left: keep encoding only if another request waits for these texts
            if job is not None and any(owned[t].waiters for t in texts):
                task = asyncio.get_running_loop().create_task(
                    self._finish(job, texts, tokens, owned)
                )
                self._background.add(task)
                task.add_done_callback(self._forget)
            else:
                if job is not None:
                    job.cancel()
                self._settle(owned, error=None)
            raise
        except BaseException as exc:
            self._settle(owned, error=exc)
            raise
        return await self._finish(job, texts, tokens, owned), job.queue_wait_s, job.encode_s

    async def _finish(
        self, job: Job, texts: list[str], tokens: list[Tokens], owned: dict[str, _Shared]
    ) -> dict[str, CachedEmbedding]:
        try:
            out = await job.future
        except BaseException as exc:
            self._settle(owned, error=exc)
            raise
        values = {
            t: CachedEmbedding(
                out[i].numpy(), int(tok.ids.shape[0]), bool(getattr(tok, "truncated", False))
            )
            for i, (t, tok) in enumerate(zip(texts, tokens, strict=True))
        }
        self._settle(owned, values=values)
        if self.cache is not None:
            self.cache.put_many_background(list(values.items()))
        return values

    def _forget(self, task: asyncio.Task[dict[str, CachedEmbedding]]) -> None:
        """Drop a finished background task, reading its error: the waiters already got it."""
        self._background.discard(task)
        if not task.cancelled():
            task.exception()

    async def drain(self) -> None:
        """Wait for encodes kept alive for other requests' sake (shutdown: before the cache)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)

    def _settle(
        self,
        owned: dict[str, _Shared],
        *,
        values: dict[str, CachedEmbedding] | None = None,
        error: BaseException | None = None,
    ) -> None:
        """Resolve the shared futures of texts this request owned, and forget them."""
        for t, shared in owned.items():
            if self._inflight.get(t) is shared:
                del self._inflight[t]
            fut = shared.future
            if fut.done():
                continue
            if values is not None:
                fut.set_result(values[t])
            elif error is not None and not isinstance(error, asyncio.CancelledError):
                fut.set_exception(error)
                fut.exception()  # mark retrieved: waiters, if any, still receive it
            else:
                fut.cancel()

    async def _align(
        self, matrix: torch.Tensor, profile: Profile | None, alignment: str
    ) -> torch.Tensor:
        stats = profile.tensors("cpu") if profile is not None else None
        if matrix.numel() > _OFFLOAD_FLOATS:
            return await asyncio.to_thread(align, matrix, stats, alignment)
        return align(matrix, stats, alignment)
