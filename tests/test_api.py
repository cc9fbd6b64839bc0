"""End to end: a real uvicorn server on loopback, real HTTP, the real (demo or tiny) model."""

from __future__ import annotations

import asyncio
import base64
import io
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from app.config import Settings
from app.encoder import TextEncoder, load_encoder
from app.profiles import ProfileRegistry
from tests.reference import apply
from tests.servers import LiveServer


def _settings(served: tuple[Path, Path], **kw: object) -> Settings:
    model, profiles = served
    return Settings(model=f"local-dir:{model}", profiles_dir=profiles, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def server(served_model: tuple[Path, Path]) -> Iterator[LiveServer]:
    with LiveServer(
        _settings(
            served_model, max_inputs_per_request=64, max_text_chars=2000, max_body_bytes=200_000
        )
    ) as s:
        yield s


@pytest.fixture(scope="module")
def encoder(served_model: tuple[Path, Path]) -> TextEncoder:
    return load_encoder(_settings(served_model))


@pytest.fixture(scope="module")
def profile_stats(served_model: tuple[Path, Path]) -> dict:
    reg = ProfileRegistry.from_dir(served_model[1])
    p = reg.get(None)
    return {
        "name": p.name,
        "mu_txt": p.mu_txt,
        "mu_img": p.mu_img,
        "mu_hat": p.mu_hat,
        "scale": p.scale,
    }


def metric(url: str, name: str, labels: dict[str, str] | None = None) -> float:
    text = httpx.get(url + "/metrics").text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(
                sample.labels.get(k) == v for k, v in (labels or {}).items()
            ):
                total += sample.value
    return total


def test_300_concurrent_requests_each_get_their_own_embedding(
    server: LiveServer, encoder: TextEncoder, profile_stats: dict
) -> None:
    texts = [
        f"a {c} {s} number {i} at the {p}"
        for i, (c, s, p) in enumerate(
            (c, s, p)
            for c in ("red", "green", "blue", "yellow", "purple")
            for s in ("circle", "square", "triangle", "star")
            for p in ("top left", "bottom right", "centre")
        )
    ]
    texts = [f"{t} {'and more ' * (i % 4)}".strip() for i, t in enumerate((texts * 6)[:300])]
    texts = [f"{t} #{i}" for i, t in enumerate(texts)]
    batches_before = metric(server.url, "realign_batch_size_count")

    async def fire() -> list[np.ndarray]:
        limits = httpx.Limits(max_connections=300)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as client:

            async def one(t: str) -> np.ndarray:
                r = await client.post("/v1/embeddings", json={"input": t})
                assert r.status_code == 200, r.text
                return np.asarray(r.json()["data"][0]["embedding"], dtype=np.float32)

            return await asyncio.gather(*(one(t) for t in texts))

    got = np.stack(asyncio.run(fire()))
    alone = np.concatenate([encoder.encode_texts([t]).numpy() for t in texts])
    expected = apply(profile_stats, alone, "realign")
    assert np.max(np.abs(got - expected)) <= 1e-5
    batches = metric(server.url, "realign_batch_size_count") - batches_before
    texts_in_batches = metric(server.url, "realign_batch_size_sum")
    assert batches < 300, "no batch larger than one formed under 300 concurrent requests"
    assert texts_in_batches >= 300


def test_formats_agree_float_base64_npy(server: LiveServer) -> None:
    texts = ["a red circle at the top", "a small blue square", "a red circle at the top"]
    body = {"input": texts, "alignment": "anchor"}
    floats = np.asarray(
        [
            d["embedding"]
            for d in httpx.post(server.url + "/v1/embeddings", json=body).json()["data"]
        ],
        np.float32,
    )
    b64 = httpx.post(
        server.url + "/v1/embeddings", json={**body, "encoding_format": "base64"}
    ).json()
    dec = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f4") for d in b64["data"]])
    b16 = httpx.post(
        server.url + "/v1/embeddings",
        json={**body, "encoding_format": "base64", "dtype": "float16"},
    ).json()
    dec16 = np.stack([np.frombuffer(base64.b64decode(d["embedding"]), "<f2") for d in b16["data"]])
    r = httpx.post(
        server.url + "/v1/embeddings", json=body, headers={"accept": "application/x-npy"}
    )
    assert r.headers["content-type"] == "application/x-npy"
    npy = np.load(io.BytesIO(r.content))
    np.testing.assert_array_equal(dec, floats)
    np.testing.assert_array_equal(npy, floats)
    assert np.max(np.abs(dec16.astype(np.float32) - floats)) < 1e-3
    np.testing.assert_array_equal(floats[0], floats[2])  # duplicate input, same row
    assert b64["alignment"] == "anchor" and [d["index"] for d in b64["data"]] == [0, 1, 2]
    assert np.allclose(np.linalg.norm(floats, axis=1), 1, atol=1e-5)


def test_alignments_and_usage(
    server: LiveServer, encoder: TextEncoder, profile_stats: dict
) -> None:
    text = "a green triangle"
    raw = encoder.encode_texts([text]).numpy()
    for alignment in ("none", "anchor", "realign"):
        r = httpx.post(
            server.url + "/v1/embeddings", json={"input": [text], "alignment": alignment}
        )
        body = r.json()
        got = np.asarray(body["data"][0]["embedding"], np.float32)
        assert np.max(np.abs(got - apply(profile_stats, raw, alignment)[0])) <= 1e-5
        n_tokens = int(encoder.tokenize([text])[0].ids.shape[0])
        assert body["usage"] == {"prompt_tokens": n_tokens, "total_tokens": n_tokens}
        assert body["profile"] == (None if alignment == "none" else profile_stats["name"])
        assert body["truncated"] == []
        assert {"x-queue-time", "x-inference-time", "x-cache-hits"} <= set(r.headers)


def test_long_text_truncated_and_reported(server: LiveServer) -> None:
    long = " ".join(["word"] * 200)
    r = httpx.post(server.url + "/v1/embeddings", json={"input": ["short", long]})
    assert r.status_code == 200
    assert r.json()["truncated"] == [1]
    assert r.json()["usage"]["prompt_tokens"] == 3 + 77


def test_models_profiles_health(server: LiveServer, profile_stats: dict) -> None:
    models = httpx.get(server.url + "/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"
    name = models["data"][0]["id"]
    assert (
        httpx.post(server.url + "/v1/embeddings", json={"input": "x", "model": name}).status_code
        == 200
    )
    profiles = httpx.get(server.url + "/v1/profiles").json()
    assert profiles["default"] == profile_stats["name"]
    one = httpx.get(server.url + f"/v1/profiles/{profile_stats['name']}").json()
    assert one["dim"] == len(profile_stats["mu_txt"])
    assert httpx.get(server.url + "/healthz").json() == {"status": "ok"}
    assert httpx.get(server.url + "/readyz").status_code == 200


@pytest.mark.parametrize(
    ("kwargs", "status", "code"),
    [
        ({"json": {"input": []}}, 422, "empty_input"),
        ({"json": {"input": ["ok", ""]}}, 422, "empty_input"),
        ({"json": {"input": ["ok", "   "]}}, 422, "empty_input"),
        ({"json": {"input": [1, 2]}}, 422, "invalid_input"),
        ({"json": {"input": "x", "alignment": "whiten"}}, 422, "invalid_input"),
        ({"json": {"input": "x", "encoding_format": "int8"}}, 422, "invalid_input"),
        ({"json": {"input": ["x"] * 65}}, 413, "too_many_inputs"),
        ({"json": {"input": "y" * 2001}}, 413, "too_many_inputs"),
        ({"json": {"input": "nul\x00byte"}}, 422, "invalid_input"),
        ({"json": {"nope": 1}}, 422, "invalid_input"),
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "invalid_json",
        ),
        (
            {"content": b"x" * 300_000, "headers": {"content-type": "application/json"}},
            413,
            "body_too_large",
        ),
        ({"json": {"input": "x", "profile": "nope"}}, 404, "not_found"),
        ({"json": {"input": "x", "model": "ViT-H-14"}}, 404, "not_found"),
    ],
)
def test_error_paths(server: LiveServer, kwargs: dict, status: int, code: str) -> None:
    r = httpx.post(server.url + "/v1/embeddings", **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code and err["message"] and err["type"]


def test_chunked_body_over_limit_is_refused(server: LiveServer) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"input": ["'
        for _ in range(100):
            yield b"a" * 10_000
        yield b'"]}'

    r = httpx.post(
        server.url + "/v1/embeddings",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413
    assert r.json()["error"]["code"] == "body_too_large"


def test_wrong_methods_and_paths(server: LiveServer) -> None:
    assert httpx.get(server.url + "/v1/embeddings").status_code == 405
    r = httpx.get(server.url + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert (
        metric(server.url, "realign_requests_total", {"route": "unmatched", "status": "404"}) >= 1
    )


def test_api_keys(served_model: tuple[Path, Path]) -> None:
    with LiveServer(_settings(served_model, api_keys="k-one,k-two")) as s:
        body = {"input": "a red circle"}
        assert httpx.post(s.url + "/v1/embeddings", json=body).status_code == 401
        bad = httpx.post(
            s.url + "/v1/embeddings", json=body, headers={"authorization": "Bearer nope"}
        )
        assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(s.url + "/v1/models").status_code == 401
        for key in ("k-one", "k-two"):
            ok = httpx.post(
                s.url + "/v1/embeddings", json=body, headers={"authorization": f"Bearer {key}"}
            )
            assert ok.status_code == 200
        for open_path in ("/healthz", "/readyz", "/metrics"):
            assert httpx.get(s.url + open_path).status_code == 200
        assert "k-one" not in httpx.get(s.url + "/metrics").text


def test_overload_gives_429_with_retry_after(served_model: tuple[Path, Path]) -> None:
    settings = _settings(
        served_model, max_batch_size=1, max_queue_texts=4, retry_after_s=2, cache_enabled=False
    )
    with LiveServer(settings) as s:

        async def burst() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
                return await asyncio.gather(
                    *(
                        c.post(
                            "/v1/embeddings", json={"input": [f"text {i} {k}" for k in range(3)]}
                        )
                        for i in range(12)
                    )
                )

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert 429 in codes and 200 in codes and set(codes) <= {200, 429}
        limited = next(r for r in responses if r.status_code == 429)
        assert limited.headers["retry-after"] == "2"
        assert limited.json()["error"]["code"] == "overloaded"


def test_client_disconnect_drops_queued_work(served_model: tuple[Path, Path]) -> None:
    settings = _settings(
        served_model, max_batch_size=1, cache_enabled=False, max_inputs_per_request=2048
    )
    with LiveServer(settings) as s:
        texts = [f"a long queue of captions {i}" for i in range(1500)]
        with pytest.raises(httpx.TimeoutException):
            httpx.post(s.url + "/v1/embeddings", json={"input": texts}, timeout=0.5)
        for _ in range(100):
            if (
                metric(s.url, "realign_dropped_texts_total") > 0
                and metric(s.url, "realign_queue_depth") == 0
            ):
                break
            asyncio.run(asyncio.sleep(0.05))
        dropped = metric(s.url, "realign_dropped_texts_total")
        assert dropped > 500, dropped
        assert metric(s.url, "realign_batch_size_sum") < 1500
        assert httpx.post(s.url + "/v1/embeddings", json={"input": "still fine"}).status_code == 200
