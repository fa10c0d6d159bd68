"""uvicorn's HTTP protocol with load shedding, a header-read timeout (issue 14, items 3 and 7) and
keep-alive connections recycled (issue 17).

BentoML 1.4.40 serves each worker with uvicorn 0.54.0 (httptools protocol, uvloop). Three gaps are
closed where they are: in the protocol, before any ASGI code runs. `bentos/compat.py` installs
`ShelfwiseProtocol` as uvicorn's `auto` protocol, refusing a uvicorn version it was not written for.

**Load shedding.** Past `SHELFWISE_MAX_CONCURRENCY` requests in progress in the worker (admitted,
not yet answered), a new request is answered at once with a canned 429,
`Retry-After` and a JSON body naming the reason, written by the protocol: no ASGI task, no
middleware, no body read, no log line. Health and metrics routes (`NEVER_SHED`) are always
admitted. Why here rather than in an ASGI middleware or BentoML's `traffic.max_concurrency`
(measured in `benchmarks/overload_benchmark.py`):

- `/recommend` runs on the event loop without awaiting anything (see `_run` in
  `bentos/service.py`), so a semaphore in the ASGI stack (BentoML's `MaxConcurrencyMiddleware`) is
  taken and released before the next request is looked at: it never refuses anything (measured:
  0% refused at 256 connections).
- The queue is the event loop's: every request that arrived in one loop round is parsed and gets
  its task in that round. Counting requests when their task is created sees that queue; capping
  it caps the work per round, hence the round's length, which is the latency of the admitted
  requests and of everything else on the loop, `/readyz` included. uvloop also accepts one new
  connection per round, so a short round is what lets a kubelet's probe (a new connection each
  time) in.
- A refusal must be cheap: a client that ignores `Retry-After` resends at once, and every
  refusal costs the loop. In the ASGI stack a 429 goes through BentoML's metrics, tracing,
  access-log and timeout middlewares (an access-log line, an extra task); here it is the
  parsing and one write, about 15 microseconds in process.

Shed requests are counted in `shelfwise_shed_requests_total` (BentoML's request metrics never see
them).

**Header-read timeout.** uvicorn has none: its only timer, `timeout_keep_alive`, is armed after a
response and cancelled by any byte received, so a client that connects and sends nothing, or half
its headers, holds the connection for ever. Here a request's headers must be complete within
`SHELFWISE_HEADER_TIMEOUT_S` of the connection's opening (first request) or of the request's first
byte (later requests; the idle time between requests stays the keep-alive timeout's); otherwise
the client gets a 408 (unless a response is being written on the connection) and the connection is
closed.

**Keep-alive connections recycled.** A worker keeps every request of a connection it accepted, and
BentoML's workers accept from one shared socket, each taking every connection pending when it
wakes (libuv accepts until the queue is empty). A few keep-alive connections opened at once (a
load balancer's pool, a benchmark client) can so all land on one worker and stay there: measured,
eight wrk connections on one of two workers for a whole 10 s run in about one run of four. After
about `SHELFWISE_MAX_REQUESTS_PER_CONNECTION` requests on a connection, the response says
`Connection: close` and the connection closes once it is sent (what uvicorn does for a request
that asked for it, and nginx's `keepalive_requests` for its clients); the client opens a new one,
which the worker that polls first accepts: an idle worker at once. So connections drift to the
workers with room within seconds under load. Each connection's number is drawn between half and
one and a half times the setting (as gunicorn's `max_requests_jitter`), so that connections opened
together, served at the same pace, do not all reconnect at once and land together again.
The price: the first request on a new connection waits for the accept, about a loop round
(measured at c=8, one worker: after 100 requests, p99 +1 ms, the reconnecting 1% of requests
being the p99; after 250, the default, within the noise; after 1,000 no change). A request
pipelined behind the last one is not read (HTTP/1.1 clients retry it on a new connection, as
after any close). 0 keeps connections for as long as the client does.
"""

import asyncio
import functools
import json
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import bentoml
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from shelfwise.settings import Settings

# Never refused: probes and metrics must answer while the worker sheds load.
NEVER_SHED = frozenset({"/livez", "/healthz", "/readyz", "/metrics"})
# Seconds a refused client should wait (HTTP allows whole seconds only): overload at this scale
# lasts milliseconds, so the shortest wait the header can say.
RETRY_AFTER_S = 1
# 429, not 503: a valid request never gets a 5xx (ARCHITECTURE.md §6); BentoML's own limit says
# 429 too.
SHED_BODY = json.dumps(
    {
        "error": "the service is at its limit of requests in progress; retry after "
        f"{RETRY_AFTER_S} s",
        "field": None,  # the shape of every client error (bentos.api_models.ErrorResponse)
    }
).encode()
SHED_RESPONSE = (
    b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
    b"retry-after: %d\r\ncontent-length: %d\r\n" % (RETRY_AFTER_S, len(SHED_BODY))
)
TIMEOUT_BODY = b"request headers not sent in time"
TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(TIMEOUT_BODY), TIMEOUT_BODY)
)

SHED = bentoml.metrics.Counter(
    name="shelfwise_shed_requests",
    documentation="Requests refused with 429 because the worker was at SHELFWISE_MAX_CONCURRENCY.",
)


@dataclass(frozen=True)
class Limits:
    """The protocol's settings, read from the environment at the worker's first connection."""

    max_concurrency: int
    header_timeout_s: float
    max_requests_per_connection: int = 0

    @classmethod
    def from_env(cls) -> "Limits":
        settings = Settings.from_env()
        return cls(
            settings.max_concurrency,
            settings.header_timeout_s,
            settings.max_requests_per_connection,
        )


def last_request_of_connection(max_requests: int) -> int:
    """The request after which a connection is closed: drawn uniformly between half and one and
    a half times `max_requests` (at least 1); 0 (never) when `max_requests` is 0."""
    if not max_requests:
        return 0
    return random.randint(max(1, max_requests - max_requests // 2), max_requests * 3 // 2)


class ShelfwiseProtocol(HttpToolsProtocol):
    """uvicorn 0.54.0's httptools protocol plus load shedding, a header-read timeout and recycled
    keep-alive connections."""

    limits: ClassVar[Limits | None] = None
    # Requests admitted and not yet answered, in this worker (all its connections; one event loop).
    # Counted from admission to the response's last byte: uvicorn's own set of tasks keeps a
    # request one or two loop rounds longer (until its task's done-callback has run).
    in_progress: ClassVar[int] = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._counted: set[Any] = set()  # this connection's requests counted in `in_progress`
        self._requests = 0  # requests started on this connection
        self._last_request: int | None = None  # the one that closes it (drawn at the first)

    # --- the header-read timeout -------------------------------------------------------------

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._header_timer is None:  # the first request's deadline runs from the connection
            self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._cancel_header_timer()
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_header_timer()
        # A request whose client went away no longer counts (its task ends at its next await or
        # when it answers, which uvicorn then discards).
        for cycle in list(self._counted):
            self._release(cycle)
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        timeout = self._limits().header_timeout_s
        if timeout:
            self._header_timer = self.loop.call_later(timeout, self._header_timeout)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is None or self.cycle.response_complete:  # no response is being written
            self.transport.write(TIMEOUT_RESPONSE)
        self.transport.close()

    # --- load shedding -----------------------------------------------------------------------

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        """Starts the request's ASGI task, or refuses the request when the worker is full; the
        connection's last request (`max_requests_per_connection`) closes it once answered."""
        cls = type(self)
        path = cycle.scope["path"]
        limits = self._limits()
        self._requests += 1
        if self._last_request is None:
            self._last_request = last_request_of_connection(limits.max_requests_per_connection)
        if self._last_request and self._requests >= self._last_request:
            cycle.keep_alive = False  # as uvicorn's shutdown: `Connection: close`, then closed
        limit = limits.max_concurrency
        if limit and cls.in_progress >= limit and path not in NEVER_SHED:
            return self._shed(cycle)
        if path not in NEVER_SHED:  # probes are cheap and must not take a place
            cls.in_progress += 1
            self._counted.add(cycle)
            cycle.on_response = functools.partial(self._finished, cycle, cycle.on_response)
        super()._start_asgi_task(cycle, app)

    def _finished(self, cycle: Any, on_response: Callable[[], None]) -> None:
        """The cycle's response is complete: the request no longer counts as in progress."""
        self._release(cycle)
        on_response()

    def _release(self, cycle: Any) -> None:
        if cycle in self._counted:
            self._counted.discard(cycle)
            type(self).in_progress -= 1

    def _shed(self, cycle: Any) -> None:
        """Answers 429 on the connection, as the cycle's `send` would after a whole response."""
        SHED.inc()
        cycle.response_started = cycle.response_complete = True
        cycle.message_event.set()  # nothing waits on it; as after a response
        ending = b"\r\n" if cycle.keep_alive else b"connection: close\r\n\r\n"
        self.transport.write(SHED_RESPONSE + ending + SHED_BODY)
        if not cycle.keep_alive:
            self.transport.close()
        # Keep-alive timer or the next pipelined request; a body still arriving is discarded by
        # the parser callbacks (the cycle's response is complete).
        self.on_response_complete()

    @classmethod
    def _limits(cls) -> Limits:
        if cls.limits is None:
            cls.limits = Limits.from_env()
        return cls.limits
