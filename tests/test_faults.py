"""Faults in a *live* server: the encoder raising mid-batch, the worker thread dying, clients
leaving while their texts are being encoded (alone or shared with another request), and
corrupt or tampered profile files next to good ones."""

from __future__ import annotations

import asyncio
import logging
import shutil
import struct
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from app.config import Settings
from app.encoder import TextEncoder, TokenizedText
from app.service import prepare_encoder
from tests.reference import apply
from tests.servers import LiveServer
from tests.test_api import metric

FAIL = "__fail_here__"
DIE = "__die_here__"
SLOW = "__slow_here__"
SLOW_TOKENIZE = "__slow_tokenize__"


def _settings(served: tuple[Path, Path], **kw: object) -> Settings:
    model, profiles = served
    return Settings(model=f"local-dir:{model}", profiles_dir=profiles, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Marked(TokenizedText):
    """A token sequence whose text carried a fault marker."""

    marker: str = ""


class FaultyEncoder:
    """The real encoder, but a batch holding a marked text raises, kills the worker or stalls."""

    def __init__(self, inner: TextEncoder) -> None:
        self.inner = inner
        self.release = threading.Event()
        self.in_encode = threading.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def tokenize(self, texts: Sequence[str]) -> list[TokenizedText]:
        if any(SLOW_TOKENIZE in t for t in texts):
            time.sleep(1.0)  # in a worker thread: >= 16 texts are tokenised off the loop
        out = self.inner.tokenize(texts)
        for i, text in enumerate(texts):
            for marker in (FAIL, DIE, SLOW):
                if marker in text:
                    out[i] = Marked(out[i].ids, out[i].truncated, marker)
        return out

    def encode(self, batch: Sequence[TokenizedText]) -> torch.Tensor:
        markers = {t.marker for t in batch if isinstance(t, Marked)}
        if FAIL in markers:
            raise RuntimeError("injected failure: secret-internal-detail")
        if DIE in markers:
            raise SystemExit("injected worker death")
        if SLOW in markers:
            self.in_encode.set()
            self.release.wait(timeout=30)
        return self.inner.encode(batch)


class Records(logging.Handler):
    """Every WARNING+ record of the app, uvicorn (which does not propagate) and asyncio."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def errors(self) -> list[str]:
        return [
            f"{r.name}: {r.getMessage()}" + (" (with traceback)" if r.exc_info else "")
            for r in self.records
            if r.levelno >= logging.ERROR
        ]


@pytest.fixture()
def logs() -> Iterator[Records]:
    handler = Records()
    loggers = [
        logging.getLogger(),
        logging.getLogger("uvicorn"),
        logging.getLogger("uvicorn.error"),
    ]
    for lg in loggers:
        lg.addHandler(handler)
    yield handler
    for lg in loggers:
        lg.removeHandler(handler)


@pytest.fixture(scope="module")
def real_encoder(served_model: tuple[Path, Path]) -> TextEncoder:
    return prepare_encoder(_settings(served_model))


@pytest.fixture()
def faulty_server(
    served_model: tuple[Path, Path], real_encoder: TextEncoder
) -> Iterator[tuple[LiveServer, FaultyEncoder]]:
    enc = FaultyEncoder(real_encoder)
    settings = _settings(served_model, cache_enabled=False, max_batch_size=8)
    with LiveServer(settings, encoder=enc) as server:  # type: ignore[arg-type]
        yield server, enc
    enc.release.set()


def _embed(url: str, texts: list[str], timeout: float = 30) -> httpx.Response:
    return httpx.post(url + "/v1/embeddings", json={"input": texts}, timeout=timeout)


def _wait_ready(url: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if httpx.get(url + "/readyz").status_code == 200:
            return
        time.sleep(0.02)
    raise AssertionError(f"/readyz not 200 after {timeout}s: {httpx.get(url + '/readyz').text}")


# --- the encoder raising mid-batch ---------------------------------------------------------------
def test_encoder_exception_fails_only_its_request_with_clear_json(
    faulty_server: tuple[LiveServer, FaultyEncoder], logs: Records
) -> None:
    server, _ = faulty_server
    t0 = time.monotonic()
    r = _embed(server.url, ["a red circle", f"this one {FAIL}"])
    assert time.monotonic() - t0 < 10
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["code"] == "encoder_error" and err["type"] == "server_error"
    assert "encoder failed" in err["message"]
    assert "secret-internal-detail" not in r.text  # raw exception text never reaches clients
    # the service goes on: ready, and the same harmless text now encodes fine
    assert httpx.get(server.url + "/readyz").status_code == 200
    ok = _embed(server.url, ["a red circle", "a blue square"])
    assert ok.status_code == 200 and len(ok.json()["data"]) == 2
    assert metric(server.url, "realign_batch_failures_total") == 1
    assert metric(server.url, "realign_worker_restarts_total") == 0
    # logged once, server-side, with the cause
    assert any("failed" in e and "traceback" in e for e in logs.errors()), logs.errors()


def test_concurrent_requests_around_a_failing_batch_all_answer(
    faulty_server: tuple[LiveServer, FaultyEncoder],
) -> None:
    server, _ = faulty_server

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            bodies = [
                {"input": [f"caption {i} {FAIL if i == 5 else ''}".strip()]} for i in range(20)
            ]
            return await asyncio.gather(*(c.post("/v1/embeddings", json=b) for b in bodies))

    responses = asyncio.run(burst())
    codes = [r.status_code for r in responses]
    assert codes[5] == 500
    assert set(codes) <= {200, 500} and codes.count(200) >= 10, codes  # batch-mates may fail too
    assert _embed(server.url, ["after the storm"]).status_code == 200


# --- the worker thread dying -------------------------------------------------------------------------
def test_worker_thread_death_fails_its_request_then_restarts(
    faulty_server: tuple[LiveServer, FaultyEncoder], logs: Records
) -> None:
    server, _ = faulty_server
    t0 = time.monotonic()
    r = _embed(server.url, [f"kill {DIE}"], timeout=15)
    assert time.monotonic() - t0 < 10, "the request hung on a dead worker"
    assert r.status_code == 500 and r.json()["error"]["code"] == "encoder_error"
    assert "crashed" in r.json()["error"]["message"]
    _wait_ready(server.url)
    assert metric(server.url, "realign_worker_restarts_total") == 1
    good = _embed(server.url, ["a green triangle"])
    assert good.status_code == 200
    assert any("worker died" in e for e in logs.errors()), logs.errors()


def test_worker_death_with_a_queue_behind_it_answers_everyone(
    faulty_server: tuple[LiveServer, FaultyEncoder],
) -> None:
    server, _ = faulty_server

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            bodies = [{"input": [f"queued {i} {DIE if i == 3 else ''}".strip()]} for i in range(24)]
            return await asyncio.gather(*(c.post("/v1/embeddings", json=b) for b in bodies))

    t0 = time.monotonic()
    codes = [r.status_code for r in asyncio.run(burst())]
    assert time.monotonic() - t0 < 20
    assert codes[3] == 500 and set(codes) <= {200, 500} and codes.count(200) >= 12, codes
    _wait_ready(server.url)
    assert _embed(server.url, ["still alive"]).status_code == 200


# --- clients leaving mid-request --------------------------------------------------------------------
def test_disconnect_during_encoding_is_quiet_and_drops_the_rest(
    faulty_server: tuple[LiveServer, FaultyEncoder], logs: Records
) -> None:
    server, enc = faulty_server
    # the marked text is the shortest, so it is in the first batch; the rest wait behind it
    texts = [SLOW] + [f"a queued caption of a red square, number {i} in a list" for i in range(200)]
    with pytest.raises(httpx.ReadTimeout):
        _embed(server.url, texts, timeout=0.5)  # in the encoder when the client leaves
    assert enc.in_encode.is_set()
    enc.release.set()
    deadline = time.monotonic() + 10
    while metric(server.url, "realign_queue_depth") > 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server.url, "realign_queue_depth") == 0
    assert metric(server.url, "realign_dropped_texts_total") >= 150
    assert metric(server.url, "realign_batch_size_sum") < 50
    assert _embed(server.url, ["back to normal"]).status_code == 200
    assert metric(server.url, "realign_requests_total", {"status": "500"}) == 0
    assert logs.errors() == []


def test_disconnect_of_one_of_two_identical_requests_keeps_the_other(
    faulty_server: tuple[LiveServer, FaultyEncoder],
    logs: Records,
    real_encoder: TextEncoder,
    served_model: tuple[Path, Path],
) -> None:
    """B awaits A's in-flight encoding of the same texts; A's client leaves; B still gets them."""
    server, enc = faulty_server
    texts = [f"{SLOW} shared", "shared caption one", "shared caption two"]

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            a = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": texts}, timeout=1.0))
            while not enc.in_encode.is_set():
                await asyncio.sleep(0.01)
            b = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": texts}))
            with pytest.raises(httpx.ReadTimeout):
                await a  # A's client leaves while the batch is still in the encoder
            enc.release.set()
            return await b

    r = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    from app.profiles import ProfileRegistry

    p = ProfileRegistry.from_dir(served_model[1]).get(None)
    stats = {"mu_txt": p.mu_txt, "mu_img": p.mu_img, "mu_hat": p.mu_hat, "scale": p.scale}
    got = np.asarray([d["embedding"] for d in r.json()["data"]], np.float32)
    raw = np.concatenate([real_encoder.encode_texts([t]).numpy() for t in texts])
    assert np.max(np.abs(got - apply(stats, raw))) <= 1e-5
    assert logs.errors() == []


def test_owner_leaving_while_tokenizing_does_not_fail_the_waiter(
    faulty_server: tuple[LiveServer, FaultyEncoder], logs: Records
) -> None:
    """A owns texts and is still tokenising them when its client leaves; B, sent later with
    the same texts, waits on A's work. B must still get its embeddings (found by the soak:
    B got a bare 500 from a CancelledError that was not its own)."""
    server, _ = faulty_server
    texts = [f"{SLOW_TOKENIZE} shared while tokenising {i}" for i in range(20)]

    async def scenario() -> httpx.Response:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as c:
            a = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": texts}, timeout=0.5))
            await asyncio.sleep(0.2)  # A is in tokenize (1 s)
            b = asyncio.ensure_future(c.post("/v1/embeddings", json={"input": texts}))
            with pytest.raises(httpx.ReadTimeout):
                await a
            return await b

    r = asyncio.run(scenario())
    assert r.status_code == 200, r.text
    assert len(r.json()["data"]) == 20
    assert logs.errors() == []


# --- corrupt and tampered profiles ---------------------------------------------------------------------
def _tamper(good: Path, out: Path, **changes: Any) -> None:
    tensors = load_file(str(good))
    with safe_open(str(good), framework="numpy") as fh:
        meta = dict(fh.metadata())
    for k, v in changes.items():
        if k in tensors:
            tensors[k] = np.asarray(v, dtype=tensors[k].dtype).reshape(tensors[k].shape)
        else:
            meta[k] = v
    save_file(tensors, str(out), metadata=meta)


def test_corrupt_and_tampered_profiles_are_rejected_others_served(
    served_model: tuple[Path, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model, profiles = served_model
    good = sorted(profiles.glob("*.safetensors"))[0]
    d = tmp_path / "profiles"
    d.mkdir()
    shutil.copy(good, d / "a_good.safetensors")
    raw = good.read_bytes()
    (d / "garbage.safetensors").write_bytes(b"\x00\xffnot a profile at all" * 10)
    (d / "truncated.safetensors").write_bytes(raw[: len(raw) // 2])
    (d / "huge_header.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + b"{}")
    (d / "empty.safetensors").write_bytes(b"")
    _tamper(good, d / "neg_scale.safetensors", scale=-1.0, name="neg")
    dim = len(load_file(str(good))["mu_hat"])
    _tamper(good, d / "nan.safetensors", mu_hat=[np.nan] * dim, name="nan")
    _tamper(good, d / "other_model.safetensors", model="ViT-B-32:someone-else", name="other")
    _tamper(good, d / "future.safetensors", format_version="99", name="future")
    _tamper(good, d / "dim_lie.safetensors", dim=str(dim + 1), name="dimlie")
    (d / "notes.txt").write_text("not a profile, ignored")
    with safe_open(str(good), framework="numpy") as fh:
        good_name = fh.metadata()["name"]

    caplog.set_level(logging.ERROR)
    with LiveServer(Settings(model=f"local-dir:{model}", profiles_dir=d)) as s:
        listed = httpx.get(s.url + "/v1/profiles").json()
        assert [p["name"] for p in listed["data"]] == [good_name]
        assert listed["default"] == good_name
        assert httpx.post(s.url + "/v1/embeddings", json={"input": "ok"}).status_code == 200
        for bad in ("neg", "nan", "other", "future", "dimlie"):
            r = httpx.post(s.url + "/v1/embeddings", json={"input": "x", "profile": bad})
            assert r.status_code == 404, (bad, r.text)
    logged = "\n".join(r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR)
    for stem in (
        "garbage",
        "truncated",
        "huge_header",
        "empty",
        "neg_scale",
        "nan",
        "future",
        "dim_lie",
    ):
        assert f"{stem}.safetensors" in logged, (stem, logged)
    assert "'other'" in logged and "built for" in logged  # wrong encoder: refused by name
    assert "scale must be > 0" in logged and "NaN" in logged and "format_version" in logged
