"""`bentoml serve` for a benchmark: started from the project root, ready when `/readyz` answers
200, stopped with its whole process tree."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

from .processes import TreeMemory, process_tree
from .state import BIN, ROOT


@dataclass
class Server:
    """A running `bentoml serve`."""

    process: subprocess.Popen
    url: str  # http://127.0.0.1:PORT
    startup_seconds: float  # until /readyz answered 200
    memory: TreeMemory | None  # sampling since the start, when asked for


def exit_on_sigterm() -> None:
    """Stopped with TERM (or INT, ignored by background jobs), the script still stops the
    servers it started (their context managers run on the way out)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


@contextmanager
def serve(
    target: str,
    env: dict[str, str],
    port: int,
    log: Path,
    timeout: float = 300,
    grace: float = 30,
    memory: bool = False,
    root: Path = ROOT,
) -> Iterator[Server]:
    """`bentoml serve TARGET` on 127.0.0.1:`port` from the project root, until `/readyz` is 200.

    Args:
        target: What to serve, e.g. `bentos/service.py:RecommendationService`.
        env: Its environment (`state_env`).
        port: Its port.
        log: Its output (overwritten).
        timeout: Seconds it may take to get ready.
        grace: Seconds it has to stop after TERM (the service's workers seal their logs);
            then its processes still there are killed (a worker still loading ignores the
            shutdown).
        memory: Sample its process tree's RSS and PSS from the start (`Server.memory`).
        root: The checkout to serve from (this one unless given: another version's code).
    """
    for attempt in range(1, START_ATTEMPTS + 1):
        started = time.perf_counter()
        with log.open("w") as out:
            command = [str(BIN / "bentoml"), "serve", target, "--host", "127.0.0.1", "--port"]
            process = subprocess.Popen(
                [*command, str(port)], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT
            )
        sampler = TreeMemory(process.pid, pss=True) if memory else None
        try:
            with sampler or nullcontext():
                try:
                    _wait_ready(process, target, f"http://127.0.0.1:{port}", log, started, timeout)
                except _PortTaken:
                    if attempt == START_ATTEMPTS:
                        raise
                    continue
                seconds = time.perf_counter() - started
                yield Server(process, f"http://127.0.0.1:{port}", seconds, sampler)
                return
        finally:
            stop(process, grace)


class _PortTaken(RuntimeError):
    """`bentoml serve` lost a race for a port BentoML had picked."""


# BentoML picks circus' control port by binding port 0 and closing it, and binds it again later;
# meanwhile another process's outgoing connection may take it. Such a start is tried again.
START_ATTEMPTS = 3


def _wait_ready(
    process: subprocess.Popen, target: str, url: str, log: Path, started: float, timeout: float
) -> None:
    """Returns once `/readyz` answers 200; raises if the server exits or overruns `timeout`."""
    import httpx

    while True:
        if process.poll() is not None:
            taken = "Address already in use" in log.read_text(errors="replace")
            error = _PortTaken if taken else RuntimeError
            raise error(f"{target} exited ({process.returncode}); see {log}")
        if time.perf_counter() - started > timeout:
            raise RuntimeError(f"{target} not ready in {timeout:.0f} s; see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)


def stop(process: subprocess.Popen, grace: float) -> None:
    """TERM to a `bentoml serve`; after `grace` s, KILL to every bentoml process of its tree."""
    tree = process_tree(process.pid)
    process.terminate()
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        pass
    for pid in tree:
        try:
            if b"bentoml" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    process.wait()
