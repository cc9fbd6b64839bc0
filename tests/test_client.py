"""The Python client against a real server on loopback (tiny random model), plus unit tests of
its retry logic against httpx's mock transport."""

from __future__ import annotations

import asyncio
import io
import pickle
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import SecretStr

from app.client import (
    AsyncRealignClient,
    RealignClient,
    RealignConnectionError,
    RealignHTTPError,
    RetryEvent,
    RetryPolicy,
    parse_retry_after,
)
from app.config import Settings
from app.loader import CaptionDataset, PseudoImageCollate
from tests.servers import LiveServer, free_port
from tests.tiny_models import write_local_dir, write_profile_for

pytestmark = pytest.mark.slow

WORDS = ["red", "blue", "green", "circle", "square", "big", "small", "left", "right", "ring"]
FAST_RETRY = RetryPolicy(max_retries=2, backoff_base=0.01, backoff_max=0.02)


def captions(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [f"{i} " + " ".join(rng.choice(WORDS, size=rng.integers(1, 5))) for i in range(n)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Settings:
    root = tmp_path_factory.mktemp("client-models")
    model = write_local_dir(root / "tiny", seed=0)
    write_profile_for(model, root / "profiles")
    return Settings(
        model=f"local-dir:{model}",
        profiles_dir=root / "profiles",
        device="cpu",
        precision="fp32",
        redis_url=None,
        max_inputs_per_request=8,
    )


@pytest.fixture(scope="module")
def server(tiny: Settings) -> Iterator[LiveServer]:
    with LiveServer(tiny) as live:
        yield live


def reference(url: str, texts: list[str], alignment: str = "realign") -> np.ndarray:
    """The server's plain JSON float response, fetched without the client, 8 texts a request."""
    rows = []
    with httpx.Client(base_url=url, timeout=30) as http:
        for start in range(0, len(texts), 8):
            r = http.post(
                "/v1/embeddings", json={"input": texts[start : start + 8], "alignment": alignment}
            )
            r.raise_for_status()
            data = sorted(r.json()["data"], key=lambda d: d["index"])
            rows += [np.asarray(d["embedding"], dtype=np.float64) for d in data]
    return np.stack(rows)


# ---------------------------------------------------------------- against a live server


@pytest.mark.parametrize("alignment", ["realign", "anchor", "none"])
def test_embed_matches_json_floats(server: LiveServer, alignment: str) -> None:
    texts = captions(6)
    expected = reference(server.url, texts, alignment)
    for transport in ("npy", "base64"):
        with RealignClient(server.url, transport=transport, max_batch=8) as client:
            got = client.embed(texts, alignment=alignment)  # type: ignore[arg-type]
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-6
    with RealignClient(server.url, dtype="float16", max_batch=8) as client:
        half = client.embed(texts, alignment=alignment)  # type: ignore[arg-type]
    assert half.dtype == np.float32
    assert np.abs(half - expected).max() <= 1e-3


def test_npy_and_base64_decode_equal(server: LiveServer) -> None:
    texts = captions(5, seed=1)
    for dtype in ("float16", "float32"):
        out = []
        for transport in ("npy", "base64"):
            with RealignClient(server.url, transport=transport, dtype=dtype) as c:  # type: ignore[arg-type]
                out.append(c.embed(texts))
        np.testing.assert_array_equal(out[0], out[1])


def test_single_string_and_models_and_profiles(server: LiveServer) -> None:
    with RealignClient(server.url) as client:
        one = client.embed("a red circle")
        card = client.models()[0]
        profiles = client.profiles()
    assert one.shape == (1, card["dim"])
    assert profiles["default"] == "tiny"
    assert [p["name"] for p in profiles["data"]] == ["tiny"]


def test_long_lists_are_chunked_and_reassembled_in_order(server: LiveServer) -> None:
    texts = captions(21, seed=2)
    expected = reference(server.url, texts)
    sent: list[int] = []

    def count(request: httpx.Request) -> None:
        sent.append(len(request.content))

    with httpx.Client(base_url=server.url, event_hooks={"request": [count]}) as http:
        got = RealignClient(http_client=http, max_batch=8).embed(texts)
    assert len(sent) == 3
    assert got.shape[0] == 21
    assert np.abs(got - expected).max() <= 1e-6


def test_over_the_server_limit_is_a_413_with_code(server: LiveServer) -> None:
    with RealignClient(server.url, max_batch=9) as client, pytest.raises(RealignHTTPError) as err:
        client.embed(captions(9))
    assert err.value.status == 413
    assert err.value.code == "too_many_inputs"


def test_unknown_profile_is_a_404(server: LiveServer) -> None:
    with RealignClient(server.url) as client, pytest.raises(RealignHTTPError) as err:
        client.embed(["x"], profile="nope")
    assert err.value.status == 404 and err.value.code


def test_async_client_equals_sync_client(server: LiveServer) -> None:
    texts = captions(19, seed=3)
    with RealignClient(server.url, max_batch=8) as client:
        sync = client.embed(texts, alignment="anchor")

    async def run() -> tuple[np.ndarray, list[dict[str, object]]]:
        async with AsyncRealignClient(
            server.url, max_batch=4, concurrency=3, transport="base64"
        ) as client:
            return await client.embed(texts, alignment="anchor"), await client.models()

    got, models = asyncio.run(run())
    assert models[0]["dim"] == sync.shape[1]
    assert np.abs(got - sync).max() <= 1e-6


def test_auth(tiny: Settings) -> None:
    settings = tiny.model_copy(update={"api_keys": [SecretStr("sekret")]})
    with LiveServer(settings) as live:
        for key in (None, "wrong"):
            with (
                RealignClient(live.url, api_key=key) as client,
                pytest.raises(RealignHTTPError) as err,
            ):
                client.embed(["a red circle"])
            assert err.value.status == 401
            assert err.value.code == "invalid_api_key"
            assert err.value.message
        with RealignClient(live.url, api_key="sekret") as client:
            assert client.embed(["a red circle"]).shape[0] == 1
            assert client.models()


def test_429_is_retried_until_every_call_succeeds(tiny: Settings, server: LiveServer) -> None:
    settings = tiny.model_copy(
        update={"max_batch_size": 2, "max_queue_texts": 2, "cache_enabled": False}
    )
    events: list[RetryEvent] = []
    texts = captions(48, seed=4)
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []
    with LiveServer(settings) as live:
        policy = RetryPolicy(max_retries=30, backoff_base=0.2)
        with RealignClient(live.url, max_batch=2, retry=policy, on_retry=events.append) as client:
            start = threading.Barrier(6)

            def work(k: int) -> None:
                try:
                    start.wait()
                    results[k] = client.embed(texts[k * 8 : (k + 1) * 8])
                except BaseException as exc:  # surfaced by the assertion below
                    errors.append(exc)

            threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            retries = client.retries
    assert not errors
    expected = reference(server.url, texts)  # same model and profile, default limits
    got = np.concatenate([results[k] for k in range(6)])
    assert np.abs(got - expected).max() <= 1e-6
    assert retries >= 1 and len(events) == retries
    assert all(e.status == 429 for e in events)
    assert all(e.delay >= 1.0 for e in events)  # the server's Retry-After: 1


def test_connection_refused_retries_then_raises() -> None:
    events: list[RetryEvent] = []
    url = f"http://127.0.0.1:{free_port()}"
    with (
        RealignClient(url, retry=FAST_RETRY, on_retry=events.append) as client,
        pytest.raises(RealignConnectionError, match="gave up after 3 attempts"),
    ):
        client.embed(["a red circle"])
    assert len(events) == 2 and client.retries == 2
    assert all(isinstance(e.error, httpx.ConnectError) for e in events)


# ---------------------------------------------------------------- data loaders


def test_collate_in_dataloader_workers(server: LiveServer) -> None:
    from torch.utils.data import DataLoader

    texts = captions(12, seed=5)
    labels = list(range(12))
    collate = PseudoImageCollate(server.url, alignment="realign", max_batch=8)
    loader = DataLoader(
        CaptionDataset(texts, label=labels), batch_size=5, num_workers=2, collate_fn=collate
    )
    batches = list(loader)
    assert collate._client is None  # only the workers made clients
    assert [b["caption"] for b in batches] == [texts[0:5], texts[5:10], texts[10:12]]
    assert [b["label"].tolist() for b in batches] == [labels[0:5], labels[5:10], labels[10:12]]
    expected = reference(server.url, texts)
    got = np.concatenate([b["pseudo_image"].numpy() for b in batches])
    assert np.abs(got - expected).max() <= 1e-6

    plain = collate(texts[:3])  # strings in, a tensor out, in this process too
    assert tuple(plain.shape) == (3, expected.shape[1])
    state = pickle.loads(pickle.dumps(collate))
    assert state._client is None and collate._client is not None
    collate.close()


def test_client_module_does_not_import_torch() -> None:
    code = "import sys, app.client; print('torch' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert out.stdout.strip() == "False"


# ---------------------------------------------------------------- retry logic, no server


def test_parse_retry_after() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after("3", now=now) == 3.0
    assert parse_retry_after(" 1.5 ", now=now) == 1.5
    assert parse_retry_after("-4", now=now) == 0.0
    assert parse_retry_after(formatdate(now + 10, usegmt=True), now=now) == pytest.approx(10)
    assert parse_retry_after(formatdate(now - 10, usegmt=True), now=now) == 0.0
    for bad in (None, "", "soon", "nan", "inf", "Mon, 99 Foo 2020"):
        assert parse_retry_after(bad, now=now) is None


def _npy(rows: int, dim: int = 4) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ones((rows, dim), dtype="<f4"))
    return buf.getvalue()


def _mock_client(responses: list[httpx.Response], **kwargs: object) -> RealignClient:
    queue = list(responses)

    def handler(request: httpx.Request) -> httpx.Response:
        return queue.pop(0)

    http = httpx.Client(base_url="http://mock", transport=httpx.MockTransport(handler))
    return RealignClient(http_client=http, **kwargs)  # type: ignore[arg-type]


def test_retry_after_is_honoured() -> None:
    events: list[RetryEvent] = []
    ok = httpx.Response(200, content=_npy(2), headers={"content-type": "application/x-npy"})
    busy = httpx.Response(429, json={"error": {"code": "overloaded"}}, headers={"Retry-After": "1"})
    client = _mock_client([busy, ok], retry=FAST_RETRY, on_retry=events.append)
    start = time.monotonic()
    out = client.embed(["a", "b"])
    elapsed = time.monotonic() - start
    client._http.close()
    assert out.shape == (2, 4)
    assert [e.status for e in events] == [429]
    assert 1.0 <= events[0].delay <= 1.0 + FAST_RETRY.backoff_base
    assert elapsed >= 1.0


def test_retryable_status_runs_out_into_http_error() -> None:
    down = {"error": {"message": "loading", "type": "service_unavailable", "code": "not_ready"}}
    client = _mock_client([httpx.Response(503, json=down) for _ in range(3)], retry=FAST_RETRY)
    with pytest.raises(RealignHTTPError) as err:
        client.embed(["a"])
    client._http.close()
    assert (err.value.status, err.value.code, err.value.message) == (503, "not_ready", "loading")
    assert client.retries == 2


def test_client_errors_are_not_retried_and_bad_bodies_are_clear() -> None:
    client = _mock_client(
        [httpx.Response(422, json={"error": {"code": "empty_input", "message": "empty"}})],
        retry=FAST_RETRY,
    )
    with pytest.raises(RealignHTTPError, match="422 empty_input"):
        client.embed(["a"])
    assert client.retries == 0
    client._http.close()
    from app.client import RealignResponseError

    wrong_rows = httpx.Response(200, content=_npy(3), headers={"content-type": "application/x-npy"})
    client = _mock_client([wrong_rows])
    with pytest.raises(RealignResponseError, match="expected 2 embeddings"):
        client.embed(["a", "b"])
    client._http.close()


def test_backoff_is_full_jitter_and_capped() -> None:
    import random

    policy = RetryPolicy(backoff_base=0.5, backoff_max=4.0)
    rng = random.Random(0)
    for attempt in range(8):
        cap = min(4.0, 0.5 * 2**attempt)
        delays = [policy.delay(attempt, None, rng) for _ in range(200)]
        assert min(delays) >= 0 and max(delays) <= cap
        assert max(delays) > 0.8 * cap  # spread over the whole range, not clustered
    assert policy.delay(0, 100.0, rng) <= policy.max_retry_after + 0.5


def test_input_validation() -> None:
    with RealignClient("http://127.0.0.1:9") as client:
        with pytest.raises(ValueError):
            client.embed([])
        with pytest.raises(TypeError):
            client.embed(["a", 3])  # type: ignore[list-item]
    with pytest.raises(ValueError):
        RealignClient("http://x", transport="json")  # type: ignore[arg-type]
