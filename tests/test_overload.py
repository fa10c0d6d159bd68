"""Hostile and careless clients over real HTTP (issue 14, items 3 and 7): overload is answered
with 429 and `Retry-After` while health stays up, and half-sent request headers are timed out;
and keep-alive connections are recycled so that they spread over the workers (issue 17).

One server (`bentoml serve` from source on a copy of the pipeline's state) with a limit of 2
requests in progress and a 1 s header timeout (`bentos/protocol.py`). The assertions are about
behaviour: bursts are repeated until one overloads the worker (a bounded number of times), and a
connection must be closed within a generous bound, far above the configured timeout.
"""

import asyncio
import http.client
import inspect
import json
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
import uvicorn
from uvicorn.protocols.http import auto as uvicorn_auto
from uvicorn.server import ServerState

from bentos import compat
from bentos.protocol import (
    NEVER_SHED,
    Limits,
    ShelfwiseProtocol,
    last_request_of_connection,
)
from shelfwise.settings import Settings
from tests.support import served_copy

LIMIT = 2
HEADER_TIMEOUT_S = 1
BURST = 48  # concurrent /recommend requests per burst
MAX_BURSTS = 25
CLOSE_BOUND_S = 20  # a closed connection must be seen by then (the timeout is 1 s)


@pytest.fixture(scope="module")
def hardened(pipeline_run, tmp_path_factory) -> Iterator[str]:
    assert pipeline_run.result.success, pipeline_run.failures
    env = {
        "SHELFWISE_MAX_CONCURRENCY": str(LIMIT),
        "SHELFWISE_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
    }
    with served_copy(pipeline_run.settings, tmp_path_factory.mktemp("hardened"), env) as served:
        yield served[0]


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 80


def _request(method: str, path: str, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if body:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "\r\n").encode() + body


def _answer(sock: socket.socket) -> tuple[int, str | None, bytes]:
    """Status, `Retry-After` and body of the next response on a connection."""
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.getheader("Retry-After"), response.read()


def _burst(url: str) -> tuple[list[tuple[int, str | None, bytes]], list[int], int | None]:
    """`BURST` /recommend requests written at once on as many open connections, with /livez,
    /readyz and /metrics requests behind them. Returns the /recommend answers, the probes'
    statuses and the status of a second request on the first refused connection (kept alive).

    The connections are opened and used once (`/livez`) first: the server accepts one new
    connection per event-loop round, and requests on accepted connections arrive together."""
    address = _address(url)
    work = [socket.create_connection(address, timeout=30) for _ in range(BURST)]
    probes = [socket.create_connection(address, timeout=30) for _ in range(4)]
    try:
        for sock in work + probes:
            sock.sendall(_request("GET", "/livez"))
            assert _answer(sock)[0] == 200
        body = json.dumps({"user_id": "u1", "k": 10}).encode()
        request = _request("POST", "/recommend", body)
        for sock in work:
            sock.sendall(request)
        for sock, path in zip(probes, ("/livez", "/readyz", "/metrics", "/readyz"), strict=True):
            sock.sendall(_request("GET", path))
        answers = [_answer(sock) for sock in work]
        refused = [sock for sock, answer in zip(work, answers, strict=True) if answer[0] == 429]
        again = None
        if refused:  # nothing else is in flight now
            refused[0].sendall(request)
            again = _answer(refused[0])[0]
        return answers, [_answer(sock)[0] for sock in probes], again
    finally:
        for sock in work + probes:
            sock.close()


def test_overload_is_answered_with_429_and_retry_after_while_health_answers(hardened):
    shed, admitted, probe_statuses, again = [], 0, [], None
    for _ in range(MAX_BURSTS):
        answers, probes, again = _burst(hardened)
        probe_statuses += probes
        shed += [answer for answer in answers if answer[0] == 429]
        admitted += sum(answer[0] == 200 for answer in answers)
        assert {answer[0] for answer in answers} <= {200, 429}, answers
        if shed and admitted:
            break
    assert shed, f"no request was refused in {MAX_BURSTS} bursts of {BURST} at a limit of {LIMIT}"
    assert admitted
    for _, retry_after, body in shed:
        assert retry_after is not None and int(retry_after) >= 1
        assert json.loads(body)["error"].startswith("the service is at its limit")
    # Probes sent during the bursts are never refused.
    assert probe_statuses and set(probe_statuses) == {200}
    # A refused connection stays usable, and the worker serves again once the burst is over.
    assert again == 200
    response = httpx.post(f"{hardened}/recommend", json={"user_id": "u1"}, timeout=10)
    assert response.status_code == 200
    metrics = httpx.get(f"{hardened}/metrics", timeout=10).text
    counted = [line for line in metrics.splitlines() if line.startswith("shelfwise_shed_requests")]
    assert counted and float(counted[0].split()[-1]) >= len(shed)


def _closed_within_bound(sock: socket.socket) -> bytes:
    """Everything the server sent until it closed the connection; fails if it stays open."""
    sock.settimeout(CLOSE_BOUND_S)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        pytest.fail(f"the server kept the connection open for {CLOSE_BOUND_S} s")
    return received


def test_half_sent_headers_are_timed_out(hardened):
    with socket.create_connection(_address(hardened)) as sock:
        sock.sendall(b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Ty")
        assert _closed_within_bound(sock).startswith(b"HTTP/1.1 408")


def test_a_connection_that_sends_nothing_is_closed(hardened):
    with socket.create_connection(_address(hardened)) as sock:
        _closed_within_bound(sock)


def test_a_half_sent_second_request_on_a_kept_alive_connection_is_timed_out(hardened):
    with socket.create_connection(_address(hardened), timeout=30) as sock:
        sock.sendall(_request("GET", "/livez"))
        status, _, _ = _answer(sock)
        assert status == 200
        sock.sendall(b"GET /livez HTTP/1.1\r\nHo")
        assert _closed_within_bound(sock).startswith(b"HTTP/1.1 408")


def test_normal_requests_still_work(hardened):
    with httpx.Client(timeout=10) as client:  # keep-alive: several requests on one connection
        for _ in range(3):
            assert client.post(f"{hardened}/recommend", json={"user_id": "u1"}).status_code == 200


def test_a_keep_alive_connection_is_closed_after_its_last_request(hardened):
    setting = Settings.max_requests_per_connection  # the default: the server does not set it
    with socket.create_connection(_address(hardened), timeout=30) as sock:
        closing = []
        for _ in range(setting * 3 // 2):
            sock.sendall(_request("GET", "/livez"))
            response = http.client.HTTPResponse(sock)
            response.begin()
            response.read()
            assert response.status == 200
            closing.append(response.getheader("Connection") == "close")
            if closing[-1]:
                break
        # Closed after its last request, drawn between half and 1.5 times the setting.
        assert closing[-1] and not any(closing[:-1])
        assert setting // 2 <= len(closing) <= setting * 3 // 2
        assert _closed_within_bound(sock) == b""


def test_clients_reconnect_when_their_connection_is_recycled(hardened):
    setting = Settings.max_requests_per_connection
    ports = set()

    def connection_port(response: httpx.Response) -> None:  # before the body: still connected
        ports.add(response.extensions["network_stream"].get_extra_info("client_addr")[1])

    # Keep-alive, reconnecting when told to close: no request fails.
    with httpx.Client(timeout=10, event_hooks={"response": [connection_port]}) as client:
        for _ in range(3 * setting + 1):  # more than two connections' most
            assert client.get(f"{hardened}/livez").status_code == 200
    assert len(ports) >= 3


def test_health_routes_are_never_shed():
    assert {"/livez", "/readyz", "/metrics"} <= NEVER_SHED


def test_the_protocol_shim_refuses_unknown_uvicorn_and_h11():
    from uvicorn.protocols.http.h11_impl import H11Protocol
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    compat.check_uvicorn(uvicorn.__version__, HttpToolsProtocol)  # what is installed: accepted
    with pytest.raises(compat.BentoMLCompatError, match="not a version"):
        compat.check_uvicorn("99.0.0", HttpToolsProtocol)
    with pytest.raises(compat.BentoMLCompatError, match="httptools"):
        compat.check_uvicorn(uvicorn.__version__, H11Protocol)


def test_uvicorn_still_has_no_header_timeout_of_its_own():
    """When uvicorn gains one, consider passing it through instead of `ShelfwiseProtocol`'s."""
    timeouts = {name for name in inspect.signature(uvicorn.Config).parameters if "timeout" in name}
    assert timeouts == {
        "timeout_keep_alive",  # armed after a response only, cancelled by any byte
        "timeout_notify",
        "timeout_graceful_shutdown",
        "timeout_worker_healthcheck",
        "ws_ping_timeout",
    }


def test_installing_the_protocol_is_idempotent(monkeypatch):
    monkeypatch.setattr(uvicorn_auto, "AutoHTTPProtocol", uvicorn_auto.AutoHTTPProtocol)
    compat.install_http_protocol()
    compat.install_http_protocol()
    assert uvicorn_auto.AutoHTTPProtocol is ShelfwiseProtocol


# --- the protocol in process, on a fake transport (what the server tests cannot reach) ---------


class FakeTransport(asyncio.Transport):
    """Collects what the protocol writes; closing is recorded."""

    def __init__(self) -> None:
        super().__init__()
        self.written = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.written += data

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return {"sockname": ("127.0.0.1", 3000), "peername": ("127.0.0.1", 40000)}.get(
            name, default
        )

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _ok(scope, receive, send) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


def _connections(count: int) -> list[tuple[ShelfwiseProtocol, FakeTransport]]:
    config = uvicorn.Config(app=_ok, log_config=None, lifespan="off")
    config.load()
    state = ServerState()
    opened = []
    for _ in range(count):
        protocol = ShelfwiseProtocol(config=config, server_state=state, app_state={})
        transport = FakeTransport()
        protocol.connection_made(transport)
        opened.append((protocol, transport))
    return opened


RECOMMEND = _request("POST", "/recommend", b'{"user_id": "u1"}')


@pytest.fixture
def limit_of_one(monkeypatch):
    monkeypatch.setattr(ShelfwiseProtocol, "limits", Limits(max_concurrency=1, header_timeout_s=0))
    monkeypatch.setattr(ShelfwiseProtocol, "in_progress", 0)


def test_requests_count_until_answered_and_probes_are_never_shed(limit_of_one):
    async def scenario() -> None:
        (first, first_out), (second, second_out), (probe, probe_out) = _connections(3)
        first.data_received(RECOMMEND)  # admitted: its task has not run yet
        assert ShelfwiseProtocol.in_progress == 1
        second.data_received(RECOMMEND)  # refused at once, the connection kept
        assert second_out.written.startswith(b"HTTP/1.1 429 ")
        assert b"retry-after: 1\r\n" in second_out.written and not second_out.closed
        assert "at its limit" in json.loads(second_out.written.split(b"\r\n\r\n", 1)[1])["error"]
        probe.data_received(_request("GET", "/readyz"))  # never refused, never counted
        assert ShelfwiseProtocol.in_progress == 1
        while not (first_out.written and probe_out.written):
            await asyncio.sleep(0)
        assert first_out.written.startswith(b"HTTP/1.1 200 ")
        assert probe_out.written.startswith(b"HTTP/1.1 200 ")
        assert ShelfwiseProtocol.in_progress == 0
        second.data_received(RECOMMEND)  # the worker has room again
        assert ShelfwiseProtocol.in_progress == 1

    asyncio.run(scenario())


def test_a_request_whose_client_left_no_longer_counts(limit_of_one):
    async def scenario() -> None:
        [(protocol, _)] = _connections(1)
        protocol.data_received(RECOMMEND)
        assert ShelfwiseProtocol.in_progress == 1
        protocol.connection_lost(None)
        assert ShelfwiseProtocol.in_progress == 0

    asyncio.run(scenario())


def test_a_refused_request_that_asked_to_close_gets_its_connection_closed(limit_of_one):
    async def scenario() -> None:
        (busy, _), (closing, out) = _connections(2)
        busy.data_received(RECOMMEND)
        closing.data_received(RECOMMEND.replace(b"Host:", b"Connection: close\r\nHost:"))
        assert out.written.startswith(b"HTTP/1.1 429 ")
        assert b"connection: close\r\n" in out.written and out.closed

    asyncio.run(scenario())


def test_connections_close_after_a_drawn_number_of_requests_around_the_setting(monkeypatch):
    limits = Limits(max_concurrency=0, header_timeout_s=0, max_requests_per_connection=6)
    monkeypatch.setattr(ShelfwiseProtocol, "limits", limits)

    async def requests_until_closed(protocol: ShelfwiseProtocol, out: FakeTransport) -> int:
        for served in range(1, 20):
            out.written = b""
            protocol.data_received(RECOMMEND)
            for _ in range(1_000):  # the response's task runs in a few steps of the loop
                if out.written.endswith(b"0\r\n\r\n"):  # the chunked body's end
                    break
                await asyncio.sleep(0)
            assert out.written.startswith(b"HTTP/1.1 200 ")
            # Only the last response says so, and the connection closes once it is sent.
            assert (b"connection: close\r\n" in out.written) == out.closed
            if out.closed:
                return served
        pytest.fail("the connection was never closed")

    async def scenario() -> list[int]:
        return [await requests_until_closed(*opened) for opened in _connections(40)]

    served = asyncio.run(scenario())
    assert set(served) <= set(range(3, 10))  # half to one and a half times the setting
    assert len(set(served)) > 1  # drawn per connection: they do not all reconnect together


def test_the_draw_of_a_connections_last_request():
    assert last_request_of_connection(0) == 0  # never closed
    assert last_request_of_connection(1) == 1
    assert {last_request_of_connection(250) for _ in range(2_000)} <= set(range(125, 376))


def test_a_refused_last_request_closes_its_connection_too(monkeypatch):
    limits = Limits(max_concurrency=1, header_timeout_s=0, max_requests_per_connection=1)
    monkeypatch.setattr(ShelfwiseProtocol, "limits", limits)
    monkeypatch.setattr(ShelfwiseProtocol, "in_progress", 0)

    async def scenario() -> None:
        (busy, _), (refused, out) = _connections(2)
        busy.data_received(RECOMMEND)
        refused.data_received(RECOMMEND)
        assert out.written.startswith(b"HTTP/1.1 429 ")
        assert b"connection: close\r\n" in out.written and out.closed

    asyncio.run(scenario())
