"""Helpers shared by tests (plain functions; fixtures live in conftest.py)."""

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from shelfwise.settings import Settings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# The executables of the virtual environment running the tests (also when it is not activated).
VENV_BIN = Path(sys.executable).parent


def service_env(settings: Settings) -> dict[str, str]:
    """The environment a Shelfwise process needs to work on `settings`' state."""
    return {
        **os.environ,
        "SHELFWISE_HOME": str(settings.home),
        "SHELFWISE_LAKE": settings.lake_url,
        "BENTOML_HOME": str(settings.bentoml_home),
        "BENTOML_DO_NOT_TRACK": "true",
    }


def free_port() -> int:
    """A free TCP port on the loopback interface."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def bentoml_server(
    target: str, settings: Settings, cwd: Path, log_path: Path, timeout: float = 120
) -> Iterator[str]:
    """Runs `bentoml serve TARGET` on a free loopback port until `/readyz` answers; yields its URL.

    Args:
        target: A bento tag or `bentos/service.py:Class`.
        settings: The Shelfwise state the server works on.
        cwd: Where to start it (the project root to serve from source).
        log_path: Where its output goes (named in errors).
        timeout: Seconds to wait for readiness.
    """
    port = free_port()
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                str(VENV_BIN / "bentoml"),
                "serve",
                target,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env=service_env(settings),
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + timeout
        try:
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"bentoml serve exited ({process.returncode}):\n"
                        + log_path.read_text()[-3000:]
                    )
                try:
                    if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"bentoml serve not ready in {timeout} s; see {log_path}")
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
