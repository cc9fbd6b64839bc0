"""Bad input at ``/v1/embeddings``: property-based fuzzing against our own OpenAPI schema
(schemathesis, positive and negative examples) and arbitrary JSON bodies (hypothesis), then
hostile cases by hand: size limits that must act before any encoding, deep nesting, wrong
content types and encodings, surrogates, lying Content-Length headers and trickled bodies.

Nothing may answer 5xx or hang. (Error codes already covered in test_api.py are not repeated.)
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from app.config import Settings
from tests.servers import LiveServer
from tests.test_api import metric

MAX_CHARS = 2000
MAX_INPUTS = 64
MAX_BODY = 2_000_000
FUZZ = settings(
    max_examples=100,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
#: Every status a bad request may get; 5xx never.
CLIENT_ERRORS = {400, 404, 405, 409, 413, 415, 422}


@pytest.fixture(scope="module")
def server(served_model: tuple[Path, Path]) -> Iterator[LiveServer]:
    model, profiles = served_model
    settings = Settings(
        model=f"local-dir:{model}",
        profiles_dir=profiles,
        max_inputs_per_request=MAX_INPUTS,
        max_text_chars=MAX_CHARS,
        max_body_bytes=MAX_BODY,
    )
    with LiveServer(settings) as s:
        yield s


def _post(server: LiveServer, **kw: Any) -> httpx.Response:
    return httpx.post(server.url + "/v1/embeddings", timeout=30, **kw)


def _raw(server: LiveServer) -> socket.socket:
    port = int(server.url.rsplit(":", 1)[1])
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


# --- property-based ----------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", list(GenerationMode), ids=lambda m: m.value)
def test_schemathesis_fuzz_embeddings(server: LiveServer, mode: GenerationMode) -> None:
    """Our OpenAPI schema drives the generator. ``positive_data_acceptance`` is left out on
    purpose: the schema cannot state the configured limits (non-empty, max texts/chars), so
    schema-valid bodies such as ``{"input": ""}`` are rightly refused with 4xx."""
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    operation = schema["/v1/embeddings"]["POST"]
    seen: dict[int, int] = {}

    @FUZZ
    @given(case=operation.as_strategy(generation_mode=mode))
    def check(case: Any) -> None:
        t0 = time.monotonic()
        response = case.call(base_url=server.url, timeout=30)
        assert time.monotonic() - t0 < 10
        seen[response.status_code] = seen.get(response.status_code, 0) + 1
        case.validate_response(
            response,
            checks=[
                not_a_server_error,
                status_code_conformance,
                content_type_conformance,
                response_schema_conformance,
                negative_data_rejection,
            ],
        )

    check()
    assert sum(seen.values()) >= 50 and all(code < 500 for code in seen), seen


_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5)
    ),
    max_leaves=30,
)
_fields = st.fixed_dictionaries(
    {},
    optional={
        "input": _json
        | st.text(max_size=100)
        | st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=MAX_INPUTS + 4),
        "profile": _json,
        "alignment": st.sampled_from(["realign", "anchor", "none", "whiten", ""]) | _json,
        "encoding_format": st.sampled_from(["float", "base64", "int8"]) | _json,
        "dtype": st.sampled_from(["float32", "float16", "int4"]) | _json,
        "model": _json,
        "user": _json,
    },
)


def test_arbitrary_json_bodies_never_5xx(server: LiveServer) -> None:
    seen: dict[int, int] = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:

        @FUZZ
        @given(body=_fields | _json)
        def check(body: Any) -> None:
            r = client.post("/v1/embeddings", json=body)
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code == 200 or r.status_code in CLIENT_ERRORS, (body, r.text)
            if r.status_code != 200:
                assert set(r.json()["error"]) == {"message", "type", "code"}

        check()
    assert 200 in seen and 422 in seen, seen


# --- sizes: refused before any work -------------------------------------------------------------------
def test_text_at_the_char_limit_passes_one_over_is_413(server: LiveServer) -> None:
    assert _post(server, json={"input": ["ok", "a" * MAX_CHARS]}).status_code == 200
    r = _post(server, json={"input": ["ok", "a" * MAX_CHARS + "b"]})
    assert r.status_code == 413 and "input[1]" in r.json()["error"]["message"]


def test_hundred_thousand_inputs_refused_fast_before_encoding(server: LiveServer) -> None:
    batches = metric(server.url, "realign_batch_size_count")
    texts = [f"text number {i}" for i in range(100_000)]  # ~1.7 MB, under the body limit
    t0 = time.monotonic()
    r = _post(server, json={"input": texts})
    elapsed = time.monotonic() - t0
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_many_inputs"
    assert elapsed < 3, f"took {elapsed:.2f}s: refused after doing work?"
    assert metric(server.url, "realign_batch_size_count") == batches


def test_deeply_nested_json_is_4xx(server: LiveServer) -> None:
    for depth in (10_000, 200_000):
        for inner in (b"[" * depth + b"]" * depth, b'{"a":' * depth + b"1" + b"}" * depth):
            r = _post(
                server,
                content=b'{"input": "x", "user": ' + inner + b"}",
                headers={"content-type": "application/json"},
            )
            assert r.status_code in (400, 413, 422), r.text
    assert httpx.get(server.url + "/healthz").status_code == 200


# --- content types and encodings -------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs",
    [
        {"content": b'{"input": "x"}', "headers": {"content-type": "text/plain"}},
        {"content": b"input=x", "headers": {"content-type": "application/x-www-form-urlencoded"}},
        {"files": {"input": ("a.txt", b"hello")}},
        {"content": b"\x93NUMPY", "headers": {"content-type": "application/x-npy"}},
        {"content": b"", "headers": {"content-type": "application/json"}},
    ],
    ids=["text-plain", "form", "multipart", "npy-body", "empty"],
)
def test_wrong_content_types_are_4xx(server: LiveServer, kwargs: dict[str, Any]) -> None:
    r = _post(server, **kwargs)
    assert r.status_code in CLIENT_ERRORS, r.text
    assert r.json()["error"]["code"]


@pytest.mark.parametrize(
    "body",
    [
        b'{"input": "\xff\xfe bad"}',  # invalid UTF-8
        b'{"input": "\xc3"}',  # truncated multi-byte sequence
        b'{"input": "a\x00b"}',  # raw NUL inside a string
        b'{"input": "x", "user": 9' + b"9" * 5000 + b"}",  # an integer past Python's digit limit
        '{"input": "é"}'.encode("latin-1"),
    ],
    ids=["invalid-utf8", "truncated-utf8", "raw-nul", "huge-int", "latin1"],
)
def test_undecodable_bodies_are_400(server: LiveServer, body: bytes) -> None:
    r = _post(server, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text


@pytest.mark.parametrize(
    "escaped",
    [r"\ud800", r"\udfff lone low", r"\ud83d\ude00 a real pair", r"x\u0000y", r"\u200b", "\\u202e"],
)
def test_escaped_surrogates_and_controls_never_5xx(server: LiveServer, escaped: str) -> None:
    body = b'{"input": ["fine", "' + escaped.encode() + b'"]}'
    r = _post(server, content=body, headers={"content-type": "application/json"})
    assert r.status_code in (200, 422), r.text
    if "u0000" in escaped:
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input"
    if r.status_code == 200:
        assert len(r.json()["data"]) == 2


# --- lying and slow bodies ------------------------------------------------------------------------------
def test_huge_declared_content_length_is_413_before_any_body(server: LiveServer) -> None:
    with _raw(server) as sock:
        t0 = time.monotonic()
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b"Content-Length: 1000000000000\r\n\r\n"
        )
        head = sock.recv(4096)  # not one body byte was sent
        elapsed = time.monotonic() - t0
    assert head.startswith(b"HTTP/1.1 413"), head
    assert b"body_too_large" in head or b"413" in head
    assert elapsed < 0.5, f"{elapsed:.3f}s"


def test_trickled_chunked_body_is_cut_at_the_limit(server: LiveServer) -> None:
    """A body sent slowly in chunks gets 413 once it passes the limit, not at its end."""
    chunk = b"a" * 100_000
    sent = 0
    with _raw(server) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Transfer-Encoding: chunked\r\n\r\n10\r\n{"input": ["aaaa\r\n'
        )
        sock.setblocking(False)
        head = b""
        t0 = time.monotonic()
        while sent < 20 * MAX_BODY and time.monotonic() - t0 < 20:
            with contextlib.suppress(BlockingIOError):
                head += sock.recv(4096)
            if head:
                break
            try:
                sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                sent += len(chunk)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                time.sleep(0.01)
                continue
            time.sleep(0.005)
        sock.setblocking(True)
        sock.settimeout(5)
        if not head:
            head = sock.recv(4096)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert sent <= MAX_BODY + 1_000_000, f"server read {sent} bytes past a {MAX_BODY} limit"


def test_stalled_body_does_not_block_other_requests(server: LiveServer) -> None:
    """A client that declares a body and sends half of it holds only its own connection."""
    with _raw(server) as sock:
        sock.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"input": ['
        )

        async def others() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=10) as c:
                rs = await asyncio.gather(
                    *(c.post("/v1/embeddings", json={"input": f"other {i}"}) for i in range(8))
                )
                return [r.status_code for r in rs]

        t0 = time.monotonic()
        assert asyncio.run(others()) == [200] * 8
        assert time.monotonic() - t0 < 5
