"""Security properties: constant-time key checks over every key, what is open and what is not,
no secrets in logs or metrics (also with a wrong Redis password), no unrestricted unpickling
(ours or open_clip's checkpoint loading), a non-root container, bounded dependencies.

Auth basics (401 without/with a bad key, /healthz /readyz /metrics open) are in test_api.py.
"""

from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
import tomllib
from packaging.requirements import Requirement

from app.api import auth
from app.config import Settings
from app.errors import AuthError, EncoderError
from tests.servers import REPO, LiveServer, ServerProcess, free_port
from tests.test_api import metric

API_KEYS = ("sk-TOPSECRET-first-0a1b2c", "sk-TOPSECRET-second-3d4e5f", "sk-TOPSECRET-third-6a7b8c")
REDIS_PASSWORD = "s3cret-REDIS-pw-9z8y"


# --- API keys ------------------------------------------------------------------------------------
def test_keys_compared_with_compare_digest_and_every_key_tried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = auth.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = [k.encode() for k in API_KEYS]
    for i, key in enumerate(API_KEYS):  # the matching key first, middle, last
        calls.clear()
        auth.check_api_key(f"Bearer {key}", keys)
        assert [b for _, b in calls] == keys, f"key {i}: not every key was compared"
    calls.clear()
    with pytest.raises(AuthError):
        auth.check_api_key("Bearer sk-TOPSECRET-first-0a1b2", keys)  # a prefix
    assert len(calls) == len(keys)
    for header in (None, "", "Basic " + API_KEYS[0], "Bearer", API_KEYS[0]):
        with pytest.raises(AuthError):
            auth.check_api_key(header, keys)
    # and the source never compares keys with == / in (short-circuiting, timing-dependent)
    tree = ast.parse(inspect.getsource(auth.check_api_key))
    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            names = {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}
            assert not names & {"given", "key", "keys", "token"}, ast.unparse(node)


def test_all_v1_routes_need_a_key_and_auth_comes_before_validation(
    served_model: tuple[Path, Path],
) -> None:
    model, profiles = served_model
    with LiveServer(
        Settings(model=f"local-dir:{model}", profiles_dir=profiles, api_keys=list(API_KEYS))
    ) as s:
        paths = httpx.get(s.url + "/openapi.json").json()["paths"]
        v1 = sorted(p for p in paths if p.startswith("/v1/"))
        assert v1 == ["/v1/embeddings", "/v1/models", "/v1/profiles", "/v1/profiles/{name}"]
        for path in ("/v1/models", "/v1/profiles", "/v1/profiles/whatever"):
            r = httpx.get(s.url + path)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", path
        # an unauthenticated bad body learns nothing about validation
        for body in ({"nope": 1}, {"input": "x", "profile": "secret-profile-name"}):
            r = httpx.post(s.url + "/v1/embeddings", json=body)
            assert r.status_code == 401, r.text
        r = httpx.post(
            s.url + "/v1/embeddings",
            json={"input": "x"},
            headers={"authorization": f"bearer  {API_KEYS[2]}"},  # scheme case, spaces
        )
        assert r.status_code == 200
        assert httpx.get(s.url + "/metrics").status_code == 200


def test_api_keys_from_the_environment_comma_separated_or_json(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """REALIGN_API_KEYS=a,b (the documented form) once crashed start-up: the env source
    JSON-decoded the list before the validator saw it."""
    for value, want in (("k1,k2", ["k1", "k2"]), ('["k1", "k2"]', ["k1", "k2"]), ("", [])):
        monkeypatch.setenv("REALIGN_API_KEYS", value)
        assert [k.get_secret_value() for k in Settings().api_keys] == want


# --- secrets ---------------------------------------------------------------------------------------
def test_settings_repr_hides_secrets() -> None:
    s = Settings(api_keys=list(API_KEYS), redis_url=f"redis://:{REDIS_PASSWORD}@127.0.0.1:1/0")
    text = repr(s) + str(s) + s.model_dump_json()
    assert not any(k in text for k in API_KEYS) and REDIS_PASSWORD not in text


@pytest.fixture()
def private_redis() -> Iterator[int]:
    """A password-protected redis-server of this test's own (the shared one has no password)."""
    exe = shutil.which("redis-server")
    assert exe, "redis-server is installed on every machine of this kind"
    port = free_port()
    proc = subprocess.Popen(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--requirepass",
            REDIS_PASSWORD,
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            client = redis.Redis(port=port, password=REDIS_PASSWORD, socket_timeout=0.2)
            try:
                if client.ping():
                    break
            except redis.RedisError:
                time.sleep(0.05)
            finally:
                client.close()
        yield port
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.mark.parametrize("password_ok", [True, False], ids=["right-password", "wrong-password"])
def test_no_secrets_in_logs_or_metrics(
    served_model: tuple[Path, Path], private_redis: int, password_ok: bool
) -> None:
    model, profiles = served_model
    password = REDIS_PASSWORD if password_ok else "wrong-PASSWORD-q7w8"
    secrets = [*API_KEYS, password, REDIS_PASSWORD]
    env = {
        "REALIGN_MODEL": f"local-dir:{model}",
        "REALIGN_PROFILES_DIR": str(profiles),
        "REALIGN_API_KEYS": ",".join(API_KEYS),
        "REALIGN_REDIS_URL": f"redis://:{password}@127.0.0.1:{private_redis}/0",
        "REALIGN_LOG_LEVEL": "debug",
    }
    auth = {"authorization": f"Bearer {API_KEYS[1]}"}
    server = ServerProcess(env)
    with server:
        body = {"input": ["a red circle", "a blue square"]}
        first = httpx.post(server.url + "/v1/embeddings", json=body, headers=auth, timeout=30)
        assert first.status_code == 200  # serves, with or without its cache
        time.sleep(0.3)  # the background cache write
        second = httpx.post(server.url + "/v1/embeddings", json=body, headers=auth, timeout=30)
        assert second.status_code == 200
        assert second.headers["x-cache-hits"] == ("2" if password_ok else "0")
        bad = httpx.post(
            server.url + "/v1/embeddings",
            json=body,
            headers={"authorization": f"Bearer {API_KEYS[0]}x"},
        )
        assert bad.status_code == 401 and API_KEYS[0] not in bad.text
        assert metric(server.url, "realign_redis_up") == (1 if password_ok else 0)
        exposed = "".join(
            httpx.get(server.url + p, headers=auth).text
            for p in (
                "/metrics",
                "/readyz",
                "/healthz",
                "/v1/models",
                "/v1/profiles",
                "/openapi.json",
            )
        )
        server.terminate()
        server.proc.wait(timeout=60)
        logs = server.output()
    assert "encoder ready" in logs  # the app's own log lines were captured
    if not password_ok:
        assert "unavailable" in logs
    for secret in secrets:
        assert secret not in logs, f"secret in logs:\n{logs}"
        assert secret not in exposed, "secret in an HTTP response"
    if password_ok:  # our keys were written under the default prefix: remove them
        client = redis.Redis(port=private_redis, password=REDIS_PASSWORD)
        client.flushall()
        client.close()


# --- pickle and checkpoints -------------------------------------------------------------------------
_UNSAFE_CALLS = re.compile(
    r"pickle\.loads?\(|torch\.load\(|jit\.load\(|allow_pickle\s*=\s*True|weights_only\s*=\s*False"
    r"|yaml\.load\(|(?<![\w.])eval\(|(?<![\w.])exec\(|marshal\.loads?\(|shelve\.open\(|dill\.|joblib\.load"
)


def test_app_source_never_unpickles_unrestricted() -> None:
    hits = []
    for path in sorted((REPO / "app").rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            if _UNSAFE_CALLS.search(code) and "``" not in line:
                hits.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert hits == []
    # the one unpickler we have is the restricted one
    text = (REPO / "app" / "safe_pickle.py").read_text()
    assert "def find_class" in text and ".load()" in text


def test_pickled_checkpoint_with_code_is_refused(tmp_path: Path) -> None:
    """A ``.bin`` weights file is a pickle: open_clip loads it with ``weights_only=True``."""
    from tests.tiny_models import write_local_dir

    marker = tmp_path / "pwned"
    model = write_local_dir(tmp_path / "evil", seed=0)
    (model / "open_clip_model.safetensors").unlink()

    class Evil:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (os.system, (f"touch {marker}",))

    import torch

    torch.save({"state_dict": Evil()}, model / "open_clip_pytorch_model.bin")
    from app.encoder import load_encoder

    with pytest.raises(EncoderError, match="could not load model"):
        load_encoder(Settings(model=f"local-dir:{model}", profiles_dir=tmp_path))
    assert not marker.exists(), "the checkpoint's code ran"


# --- container and dependencies ---------------------------------------------------------------------
def test_container_final_stage_runs_as_non_root() -> None:
    text = (REPO / "Dockerfile").read_text()
    stages = re.split(r"^FROM\s", text, flags=re.M)
    final = stages[-1]
    users = re.findall(r"^USER\s+(\S+)", final, re.M)
    assert users, "the final stage sets no USER: it runs as root"
    user, _, group = users[-1].partition(":")
    assert user not in ("root", "0") and group not in ("root", "0")
    assert user.isdigit(), "numeric UID, so Kubernetes runAsNonRoot can verify it"


def test_every_dependency_has_an_upper_bound() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    groups = {"dependencies": project["dependencies"], **project["optional-dependencies"]}
    unbounded = []
    for group, reqs in groups.items():
        for line in reqs:
            req = Requirement(line)
            if not any(spec.operator in ("<", "<=", "==", "~=") for spec in req.specifier):
                unbounded.append(f"{group}: {line}")
    assert unbounded == []
