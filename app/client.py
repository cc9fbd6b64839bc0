"""Python client for realign-serve (the torch data-loader helpers are in :mod:`app.loader`).

Training jobs call the service from data-loader workers, so this module imports only httpx
and numpy, never torch.

::

    RealignClientError              base: everything this client raises on purpose
    ├── RealignConnectionError      the server could not be reached (after retries)
    │   └── RealignTimeoutError     a request timed out (after retries)
    ├── RealignHTTPError            the server answered an error status (.status, .code, ...)
    └── RealignResponseError        a success response the client cannot decode

The sync and async clients share everything but the transport call: :class:`_Core` builds the
requests, decides on retries and decodes the responses; each client only sends and sleeps.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, Literal

import httpx
import numpy as np

__all__ = [
    "AsyncRealignClient",
    "RealignClient",
    "RealignClientError",
    "RealignConnectionError",
    "RealignHTTPError",
    "RealignResponseError",
    "RealignTimeoutError",
    "RetryEvent",
    "RetryPolicy",
    "parse_retry_after",
]

Alignment = Literal["realign", "anchor", "none"]
Transport = Literal["npy", "base64"]
Dtype = Literal["float16", "float32"]
NPY = "application/x-npy"
DEFAULT_URL = "http://localhost:8000"
USER_AGENT = "realign-client/0.1"


# ---------------------------------------------------------------- errors


class RealignClientError(Exception):
    """Base class of every error this client raises on purpose."""


class RealignConnectionError(RealignClientError):
    """The server could not be reached, or the connection broke, on every attempt."""


class RealignTimeoutError(RealignConnectionError):
    """The request timed out on every attempt."""


class RealignHTTPError(RealignClientError):
    """The server answered with an error status.

    ``code`` and ``message`` come from the service's error body (``{"error": {...}}``), e.g.
    ``401 invalid_api_key`` or ``413 too_many_inputs``; ``retry_after`` is the parsed
    ``Retry-After`` header in seconds, if any.
    """

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"HTTP {status} {code or 'error'}: {message}")
        self.status = status
        self.message = message
        self.code = code
        self.type = type
        self.retry_after = retry_after


class RealignResponseError(RealignClientError):
    """A success response that is not what the contract promises (shape, encoding)."""


# ---------------------------------------------------------------- retries


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Returns ``None`` when absent or unparseable; a date in the past gives ``0.0``.
    """
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:  # RFC 9110 dates are GMT
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if seconds != seconds or seconds in (float("inf"), float("-inf")):
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """When and how long to wait before trying a request again.

    Connection errors, timeouts and the statuses in ``retry_statuses`` are retried up to
    ``max_retries`` times. The wait is exponential backoff with full jitter,
    ``uniform(0, min(backoff_max, backoff_base * 2**attempt))``, unless the server sent
    ``Retry-After``: then the client waits that long (capped at ``max_retry_after``) plus a
    jitter of at most ``backoff_base``, so that waiting clients do not all return at once.
    """

    max_retries: int = 5
    backoff_base: float = 0.25
    backoff_max: float = 8.0
    max_retry_after: float = 60.0
    retry_statuses: frozenset[int] = frozenset({429, 502, 503, 504})

    def delay(self, attempt: int, retry_after: float | None, rng: random.Random) -> float:
        if retry_after is not None:
            return min(retry_after, self.max_retry_after) + rng.uniform(0, self.backoff_base)
        return rng.uniform(0, min(self.backoff_max, self.backoff_base * 2**attempt))


@dataclass(frozen=True)
class RetryEvent:
    """Passed to ``on_retry`` before each wait: what failed, which attempt, how long we wait."""

    attempt: int  # 1 for the first retry
    delay: float
    status: int | None
    error: BaseException | None
    url: str


_RETRYABLE_ERRORS = (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)


# ---------------------------------------------------------------- shared core


def _check_texts(texts: str | Sequence[str]) -> list[str]:
    items = [texts] if isinstance(texts, str) else list(texts)
    if not items:
        raise ValueError("texts is empty")
    for i, text in enumerate(items):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is {type(text).__name__}, not str")
    return items


class _Core:
    """Everything but I/O: configuration, request building, retry decisions, decoding."""

    def __init__(
        self,
        base_url: str | None,
        api_key: str | None,
        transport: Transport,
        dtype: Dtype,
        max_batch: int,
        retry: RetryPolicy | None,
        on_retry: Callable[[RetryEvent], None] | None,
    ) -> None:
        if transport not in ("npy", "base64"):
            raise ValueError(f"transport must be 'npy' or 'base64', got {transport!r}")
        if dtype not in ("float16", "float32"):
            raise ValueError(f"dtype must be 'float16' or 'float32', got {dtype!r}")
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self.base_url = (base_url or os.environ.get("REALIGN_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key if api_key is not None else os.environ.get("REALIGN_API_KEY")
        self.transport = transport
        self.dtype = dtype
        self.max_batch = max_batch
        self.retry = retry or RetryPolicy()
        self.on_retry = on_retry
        self.retries = 0
        self._lock = threading.Lock()
        self._rng = random.Random()

    def headers(self) -> dict[str, str]:
        headers = {"user-agent": USER_AGENT}
        if self.api_key:
            headers["authorization"] = f"Bearer {self.api_key}"
        return headers

    def chunks(self, texts: list[str]) -> Iterator[list[str]]:
        for start in range(0, len(texts), self.max_batch):
            yield texts[start : start + self.max_batch]

    def embed_request(
        self,
        http: httpx.Client | httpx.AsyncClient,
        texts: list[str],
        profile: str | None,
        alignment: Alignment,
    ) -> httpx.Request:
        body: dict[str, Any] = {"input": texts, "alignment": alignment, "dtype": self.dtype}
        if profile is not None:
            body["profile"] = profile
        headers = {}
        if self.transport == "npy":
            headers["accept"] = NPY
        else:
            body["encoding_format"] = "base64"
            headers["accept"] = "application/json"
        return http.build_request("POST", "/v1/embeddings", json=body, headers=headers)

    def next_delay(
        self,
        attempt: int,
        url: str,
        *,
        response: httpx.Response | None = None,
        error: Exception | None = None,
    ) -> float | None:
        """The wait before retry ``attempt + 1``, or ``None`` when ``response`` is final.

        Raises the client's connection error once a transport ``error`` is out of retries.
        """
        status, retry_after = None, None
        if response is not None:
            if response.status_code not in self.retry.retry_statuses:
                return None
            status = response.status_code
            retry_after = parse_retry_after(response.headers.get("retry-after"))
        if attempt >= self.retry.max_retries or (
            error is not None and not isinstance(error, _RETRYABLE_ERRORS)
        ):
            if response is not None:
                return None  # the caller decodes the error status into RealignHTTPError
            timed_out = isinstance(error, httpx.TimeoutException)
            raise (RealignTimeoutError if timed_out else RealignConnectionError)(
                f"{url}: {type(error).__name__}: {error or 'no detail'} "
                f"(gave up after {attempt + 1} attempt{'s' if attempt else ''})"
            ) from error
        delay = self.retry.delay(attempt, retry_after, self._rng)
        with self._lock:
            self.retries += 1
        if self.on_retry is not None:
            self.on_retry(RetryEvent(attempt + 1, delay, status, error, url))
        return delay

    @staticmethod
    def raise_for_status(response: httpx.Response) -> None:
        if response.status_code < 400:
            return
        code = type_ = None
        message = response.reason_phrase or "error"
        try:
            err = response.json().get("error", {})
            code, type_ = err.get("code"), err.get("type")
            message = err.get("message") or message
        except (ValueError, AttributeError):
            text = response.text.strip()
            message = text[:200] or message
        retry_after = parse_retry_after(response.headers.get("retry-after"))
        raise RealignHTTPError(
            response.status_code, message, code=code, type=type_, retry_after=retry_after
        )

    def decode_embeddings(self, response: httpx.Response, n: int) -> np.ndarray:
        self.raise_for_status(response)
        if self.transport == "npy":
            if NPY not in response.headers.get("content-type", ""):
                raise RealignResponseError(
                    f"expected {NPY}, got {response.headers.get('content-type')!r}"
                )
            try:
                arr = np.load(io.BytesIO(response.content), allow_pickle=False)
            except (ValueError, OSError, EOFError) as exc:
                raise RealignResponseError(f"invalid .npy body: {exc}") from exc
        else:
            wire = np.dtype("<f2" if self.dtype == "float16" else "<f4")
            try:
                data = sorted(response.json()["data"], key=lambda item: item["index"])
                arr = np.stack(
                    [np.frombuffer(base64.b64decode(d["embedding"]), dtype=wire) for d in data]
                )
            except (ValueError, KeyError, TypeError) as exc:
                raise RealignResponseError(f"invalid base64 embedding body: {exc}") from exc
        if arr.ndim != 2 or arr.shape[0] != n:
            raise RealignResponseError(f"expected {n} embeddings, got an array of {arr.shape}")
        out = arr.astype(np.float32, copy=False)
        return out if out.flags.writeable else out.copy()

    def decode_json(self, response: httpx.Response) -> Any:
        self.raise_for_status(response)
        try:
            return response.json()
        except ValueError as exc:
            raise RealignResponseError(f"invalid JSON body: {exc}") from exc


# ---------------------------------------------------------------- clients


class RealignClient:
    """Synchronous client: text in, pseudo-image embeddings (numpy, float32) out.

    Thread-safe; one client per process is enough. Usage::

        with RealignClient("http://localhost:8000", api_key="...") as client:
            x = client.embed(["a red circle", "a blue square"])  # (2, d) float32
            x_anchor = client.embed(captions, alignment="anchor", profile="demo")
            print(client.models()[0]["id"], client.profiles()["default"])

    Parameters:
        base_url: the service, e.g. ``http://localhost:8000`` (default: ``$REALIGN_URL``, else
            ``http://localhost:8000``).
        api_key: sent as ``Authorization: Bearer <key>`` (default: ``$REALIGN_API_KEY``).
        timeout: seconds per request (or an ``httpx.Timeout``).
        transport: ``"npy"`` (a binary ``.npy`` body, the default) or ``"base64"`` (JSON).
        dtype: ``"float32"`` (exact) or ``"float16"`` (half the bytes, error ~1e-3) on the
            wire; ``embed`` always returns float32.
        max_batch: most texts per request; longer lists are split and reassembled in order.
            Keep it at or below the server's ``max_inputs_per_request`` (else HTTP 413).
        retry: a :class:`RetryPolicy` (429/502/503/504, connection errors and timeouts).
        on_retry: called with a :class:`RetryEvent` before each wait; ``retries`` counts them.
        http_client: your own ``httpx.Client`` (its base URL, timeout and headers are used as
            they are, and the client does not close it).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        transport: Transport = "npy",
        dtype: Dtype = "float32",
        max_batch: int = 256,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        http_client: httpx.Client | None = None,
    ) -> None:
        self._core = _Core(base_url, api_key, transport, dtype, max_batch, retry, on_retry)
        self._owns_http = http_client is None
        self._http = http_client or httpx.Client(
            base_url=self._core.base_url, timeout=timeout, headers=self._core.headers()
        )

    @property
    def retries(self) -> int:
        """How many retries this client has made so far."""
        return self._core.retries

    def embed(
        self,
        texts: str | Sequence[str],
        *,
        profile: str | None = None,
        alignment: Alignment = "realign",
    ) -> np.ndarray:
        """Pseudo-image embeddings of ``texts``: an (n, d) float32 array, rows in input order.

        ``profile`` names a server profile (default: the server's default); ``alignment`` is
        ``realign``, ``anchor`` or ``none``. Raises :class:`RealignHTTPError` for error
        statuses (after retries for 429/5xx), :class:`RealignConnectionError` when the server
        cannot be reached, ``ValueError``/``TypeError`` for an empty list or non-strings.
        """
        items = _check_texts(texts)
        parts = []
        for chunk in self._core.chunks(items):
            request = self._core.embed_request(self._http, chunk, profile, alignment)
            parts.append(self._core.decode_embeddings(self._send(request), len(chunk)))
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the served model's card (id, dim, context length, device...)."""
        return list(self._get("/v1/models")["data"])

    def profiles(self) -> dict[str, Any]:
        """``GET /v1/profiles``: ``{"default": name, "data": [summary, ...]}``."""
        return dict(self._get("/v1/profiles"))

    def _get(self, path: str) -> Any:
        return self._core.decode_json(self._send(self._http.build_request("GET", path)))

    def _send(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = self._http.send(request)
            except httpx.TransportError as exc:
                delay = self._core.next_delay(attempt, str(request.url), error=exc)
            else:
                delay = self._core.next_delay(attempt, str(request.url), response=response)
                if delay is None:
                    return response
                response.close()
            assert delay is not None
            time.sleep(delay)
            attempt += 1

    def close(self) -> None:
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> RealignClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncRealignClient:
    """Asynchronous client: the API of :class:`RealignClient`, with ``await``.

    Chunks of a long list are sent concurrently (at most ``concurrency`` at a time) and
    reassembled in order. Usage::

        async with AsyncRealignClient("http://localhost:8000") as client:
            x = await client.embed(captions, alignment="realign")  # (n, d) float32
            cards = await client.models()

    Parameters:
        base_url, api_key, timeout, transport, dtype, max_batch, retry, on_retry: as for
            :class:`RealignClient`.
        concurrency: most requests in flight per ``embed`` call (default 4).
        http_client: your own ``httpx.AsyncClient`` (not closed by this client).
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout = 60.0,
        transport: Transport = "npy",
        dtype: Dtype = "float32",
        max_batch: int = 256,
        concurrency: int = 4,
        retry: RetryPolicy | None = None,
        on_retry: Callable[[RetryEvent], None] | None = None,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self._core = _Core(base_url, api_key, transport, dtype, max_batch, retry, on_retry)
        self._concurrency = concurrency
        self._owns_http = http_client is None
        self._http = http_client or httpx.AsyncClient(
            base_url=self._core.base_url, timeout=timeout, headers=self._core.headers()
        )

    @property
    def retries(self) -> int:
        """How many retries this client has made so far."""
        return self._core.retries

    async def embed(
        self,
        texts: str | Sequence[str],
        *,
        profile: str | None = None,
        alignment: Alignment = "realign",
    ) -> np.ndarray:
        """Pseudo-image embeddings of ``texts``: an (n, d) float32 array, rows in input order."""
        items = _check_texts(texts)
        gate = asyncio.Semaphore(self._concurrency)

        async def one(chunk: list[str]) -> np.ndarray:
            async with gate:
                request = self._core.embed_request(self._http, chunk, profile, alignment)
                return self._core.decode_embeddings(await self._send(request), len(chunk))

        tasks = [asyncio.ensure_future(one(chunk)) for chunk in self._core.chunks(items)]
        try:
            parts = await asyncio.gather(*tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    async def models(self) -> list[dict[str, Any]]:
        """``GET /v1/models``: the served model's card (id, dim, context length, device...)."""
        return list((await self._get("/v1/models"))["data"])

    async def profiles(self) -> dict[str, Any]:
        """``GET /v1/profiles``: ``{"default": name, "data": [summary, ...]}``."""
        return dict(await self._get("/v1/profiles"))

    async def _get(self, path: str) -> Any:
        return self._core.decode_json(await self._send(self._http.build_request("GET", path)))

    async def _send(self, request: httpx.Request) -> httpx.Response:
        attempt = 0
        while True:
            try:
                response = await self._http.send(request)
            except httpx.TransportError as exc:
                delay = self._core.next_delay(attempt, str(request.url), error=exc)
            else:
                delay = self._core.next_delay(attempt, str(request.url), response=response)
                if delay is None:
                    return response
                await response.aclose()
            assert delay is not None
            await asyncio.sleep(delay)
            attempt += 1

    async def aclose(self) -> None:
        if self._owns_http:
            await self._http.aclose()

    async def __aenter__(self) -> AsyncRealignClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
