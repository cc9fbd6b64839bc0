"""Real uvicorn servers on loopback for end-to-end tests: in a thread, or as a process."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import TracebackType

import httpx
import uvicorn

from app.api import create_app
from app.config import Settings
from app.encoder import TextEncoder
from app.metrics import Metrics
from app.server import uvicorn_config

REPO = Path(__file__).resolve().parent.parent


class LiveServer:
    """``with LiveServer(settings) as s: httpx.get(s.url + "/healthz")``."""

    def __init__(self, settings: Settings, encoder: TextEncoder | None = None) -> None:
        """``encoder``: a pre-built (e.g. fault-injecting) encoder instead of loading one."""
        self.settings = settings.model_copy(
            update={"host": "127.0.0.1", "port": 0, "log_level": "warning"}
        )
        self.metrics = Metrics()
        self.app = create_app(self.settings, metrics=self.metrics, encoder=encoder)
        self.server = uvicorn.Server(uvicorn_config(self.settings, self.app))
        self._thread = threading.Thread(target=self.server.run, name="live-server", daemon=True)
        self.url = ""

    def __enter__(self) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            if not self._thread.is_alive():
                raise RuntimeError("server thread exited during start-up")
            if time.monotonic() > deadline:
                raise TimeoutError("server did not start")
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    @property
    def service(self):  # type: ignore[no-untyped-def]
        return self.app.state.service

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=60)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    """``realign serve`` as a child process (for signals: SIGTERM, kill)."""

    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {
            **os.environ,
            "HF_HUB_OFFLINE": "1",
            "REALIGN_HOST": "127.0.0.1",
            "REALIGN_PORT": str(self.port),
            **env,
        }
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "app.cli", "serve"],
            cwd=REPO,
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited early:\n{self.output()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready:\n{self.output()}")

    def output(self) -> str:
        if self.proc.poll() is None:
            return "(still running)"
        assert self.proc.stdout is not None
        return self.proc.stdout.read()

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def __enter__(self) -> ServerProcess:
        self.wait_ready()
        return self

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)
        if self.proc.stdout:
            self.proc.stdout.close()
