"""BentoML set-up shared by the service and the benchmark's no-op service (ARCHITECTURE.md §7).

BentoML 1.4.40's `TimeoutMiddleware` (`bentoml/_internal/server/http/traffic.py`) schedules
`loop.call_later(timeout, …)` for every HTTP request and never cancels it. The timer handle holds
a copy of the request's context — with its OpenTelemetry span, set by the tracing middleware
outside — so every request stays alive for the whole `traffic.timeout` (60 s by default). At
~1,200 requests/s that is tens of thousands of live contexts: the heap grows by hundreds of MB and
every full garbage collection walks it, freezing the event loop for 60–1,000 ms.

- `install_timeout_timer_fix()` (called by the service module at import) replaces
  `TimeoutMiddleware.__call__` with the same code plus one change: the timer is cancelled as soon
  as the response has started (the only moment it could still act) or the request ends. It
  refuses to patch a `TimeoutMiddleware` whose source it does not know, so a BentoML upgrade that
  changes or fixes that code fails at start-up instead of being silently patched.
- `SERVICE_CONFIG` keeps a 10 s traffic timeout and excludes the hot routes from BentoML's
  tracing (no exporter is configured, so their spans cost time and memory for nothing). Traces of
  `/recommend` and `/similar`, when wanted, are Shelfwise's own (`bentos/tracing.py`). It turns
  BentoML's access log off by default, as gunicorn ships: a line written to stderr on the event
  loop for every request cost one worker 12–16% of its requests (paired), and a slow reader of
  that stream stalls every request. BentoML's metrics count and time every request either way,
  Shelfwise logs its refusals and errors, and `BENTOML_CONFIG_OPTIONS=
  "services.shelfwise.logging.access.enabled=true"` turns the log back on (docs/operations.md).
- `install_api_method_cache()` (called by the service module at import) makes BentoML build each
  API's local caller once per service instance. BentoML 1.4.40 resolves the endpoint's function
  on every request (`getattr(instance, name).local` in `ServiceAppFactory.api_endpoint`), and
  `APIMethod._local_call` runs `inspect.signature` and wraps the function each time: 50-60 us of
  a request's ~0.9 ms on the event loop, for the same function every time. The cached caller is
  what BentoML would build (it depends only on the method and the instance). Like the timer
  shim, it refuses a `_local_call` whose source it does not know.
- `settle_heap()`, at the end of the service's `__init__`, freezes what start-up allocated (the
  serving snapshot, the model) so later full collections skip it.

Hostile and careless clients (issue 14, items 3 and 7). `install_http_protocol()` (called by the
service module at import: the worker imports it before it builds the uvicorn server) makes
uvicorn's `auto` HTTP protocol `bentos.protocol.ShelfwiseProtocol`: uvicorn's httptools protocol
plus load shedding (`SHELFWISE_MAX_CONCURRENCY`) and a header-read timeout
(`SHELFWISE_HEADER_TIMEOUT_S`), neither of which uvicorn 0.54.0 or BentoML's configuration offers
in a form that works (see that module). It refuses an uvicorn version it was not written for, and
the h11 protocol (uvicorn's choice when httptools is not installed).
"""

import asyncio
import gc
import hashlib
import inspect
from collections.abc import Callable
from typing import Any

import bentoml
import uvicorn
from _bentoml_sdk.method import APIMethod
from bentoml._internal.server.http import traffic
from starlette.responses import JSONResponse
from uvicorn.protocols.http import auto as uvicorn_auto
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from bentos.protocol import ShelfwiseProtocol

# Routes served on the hot path: no tracing spans for them (regexes searched in the request URL,
# which OpenTelemetry builds as scheme://host/path, without the query string).
HOT_ROUTES = ("/recommend", "/similar", "/events", "/noop", "/metrics", "/livez", "/readyz")

SERVICE_CONFIG: dict[str, Any] = {
    "traffic": {"timeout": 10},
    "logging": {"access": {"enabled": False}},  # see the module's docstring
    "tracing": {"excluded_urls": [f"{route}$" for route in HOT_ROUTES]},
}

# sha256 of `inspect.getsource(TimeoutMiddleware)` in the BentoML versions this shim was written
# against; the patched `__call__` below is that code plus the timer's cancellation.
KNOWN_TIMEOUT_MIDDLEWARE = {
    "4dab3e6bdd06efc590294d89beed9a399be6959b62bce9da024b33292e1be34b": "1.4.40",
}
_PATCHED_MARK = "__shelfwise_cancels_timer__"


class BentoMLCompatError(RuntimeError):
    """The installed BentoML is not the one a compatibility shim was written for."""


def source_fingerprint(code: Any) -> str:
    """sha256 of a class's or function's source, to recognise the BentoML code a shim patches."""
    return hashlib.sha256(inspect.getsource(code).encode()).hexdigest()


def _check_known_source(
    code: Any, name: str, shim: str, known: dict[str, str], version: str, advice: str
) -> None:
    """Raises unless `code`'s source is one of `known` (sha256 -> BentoML version).

    Args:
        code: The BentoML class or function a shim replaces (unpatched).
        name: What it is, for the message.
        shim: The shim, for the message.
        known: The fingerprints of the sources the shim was written against.
        version: The installed BentoML version, for the message.
        advice: What to do about a new source.

    Raises:
        BentoMLCompatError: The source differs from every known one, or cannot be read.
    """
    try:
        fingerprint = source_fingerprint(code)
    except (OSError, TypeError) as error:  # installed without its source
        raise BentoMLCompatError(
            f"bentos/compat.py: cannot read the source of BentoML {version}'s {name} "
            f"to check that {shim} fits it: {error}"
        ) from error
    if fingerprint not in known:
        versions = ", ".join(sorted(set(known.values())))
        raise BentoMLCompatError(
            f"bentos/compat.py: BentoML {version}'s {name} ({inspect.getfile(code)}) "
            f"is not the code {shim} was written for (BentoML {versions}; "
            f"source sha256 {fingerprint}). {advice}"
        )


def check_timeout_middleware(cls: type, version: str) -> None:
    """Raises unless `cls` is a `TimeoutMiddleware` whose source the shim was written for.

    Args:
        cls: The middleware class (BentoML's, unpatched).
        version: The installed BentoML version, for the message.

    Raises:
        BentoMLCompatError: The source differs from every known one.
    """
    _check_known_source(
        cls,
        "TimeoutMiddleware",
        "the timer-cancelling shim",
        KNOWN_TIMEOUT_MIDDLEWARE,
        version,
        "If the new version cancels its per-request `loop.call_later` timer itself, delete "
        "install_timeout_timer_fix(); otherwise port the shim to the new source and add its "
        "fingerprint to KNOWN_TIMEOUT_MIDDLEWARE.",
    )


async def _call_cancelling_timer(self: Any, scope: Any, receive: Any, send: Any) -> None:
    """BentoML 1.4.40's `TimeoutMiddleware.__call__`, plus cancelling the timer when done."""
    if scope["type"] not in ("http", "websocket"):
        return await self.app(scope, receive, send)
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    timer = loop.call_later(self.timeout, self._set_timer_out, waiter)

    async def _send(message: Any) -> None:
        if not waiter.done():
            waiter.set_result(None)
        await send(message)

    fut = asyncio.ensure_future(self.app(scope, receive, _send), loop=loop)

    try:
        try:
            await waiter
        finally:
            # Once the response has started (or timed out, or the caller is gone) the timer can
            # do nothing more; left scheduled it keeps this request's context alive.
            timer.cancel()
    except TimeoutError:  # asyncio.TimeoutError since Python 3.11
        if fut.cancel():
            resp = JSONResponse(
                {"error": f"Not able to process the request in {self.timeout} seconds"},
                status_code=504,
            )
            await resp(scope, receive, send)
    else:
        await fut  # wait for the future to finish


def install_timeout_timer_fix() -> None:
    """Makes BentoML's `TimeoutMiddleware` cancel its per-request timer (idempotent).

    Raises:
        BentoMLCompatError: The installed BentoML's `TimeoutMiddleware` is not the known code.
    """
    cls = traffic.TimeoutMiddleware
    if getattr(cls.__call__, _PATCHED_MARK, False):
        return
    check_timeout_middleware(cls, bentoml.__version__)
    setattr(_call_cancelling_timer, _PATCHED_MARK, True)
    cls.__call__ = _call_cancelling_timer  # type: ignore[method-assign]


# sha256 of `inspect.getsource(APIMethod._local_call)` in the BentoML versions whose local caller
# depends only on the method and the instance (what makes caching it per instance exact).
KNOWN_LOCAL_CALL = {
    "72c85cd5fadd8a7c9c7af342f0f245c457c0b5fcb0b71094c49d5048dc5dc43f": "1.4.40",
}
# The attribute of a service instance holding its callers (id of the `APIMethod` -> caller). On
# the instance, not in a global table: a caller holds its instance, so the two go together.
_CALLERS_ATTR = "__shelfwise_api_callers__"
_CACHED_MARK = "__shelfwise_caches_callers__"


def check_local_call(method: Callable[..., Any], version: str) -> None:
    """Raises unless `method` is an `APIMethod._local_call` whose source the cache knows.

    Args:
        method: `APIMethod._local_call` (BentoML's, unpatched).
        version: The installed BentoML version, for the message.

    Raises:
        BentoMLCompatError: The source differs from every known one, or cannot be read.
    """
    _check_known_source(
        method,
        "APIMethod._local_call",
        "the per-instance cache of callers",
        KNOWN_LOCAL_CALL,
        version,
        "If the new version no longer rebuilds the caller per request, delete "
        "install_api_method_cache(); otherwise check that its caller still depends only on the "
        "method and the instance and add the fingerprint to KNOWN_LOCAL_CALL.",
    )


def install_api_method_cache() -> None:
    """Makes BentoML build each API's local caller once per service instance (idempotent).

    Raises:
        BentoMLCompatError: The installed BentoML's `APIMethod._local_call` is not known code.
    """
    build = APIMethod._local_call
    if getattr(build, _CACHED_MARK, False):
        return
    check_local_call(build, bentoml.__version__)

    def _local_call(self: APIMethod, instance: Any) -> Callable[..., Any]:
        try:
            callers = vars(instance).setdefault(_CALLERS_ATTR, {})
        except TypeError:  # an instance without a __dict__: built per call, as BentoML does
            return build(self, instance)
        caller = callers.get(id(self))  # APIMethods live as long as their class: ids are stable
        if caller is None:
            caller = callers[id(self)] = build(self, instance)
        return caller

    _local_call.__wrapped__ = build  # type: ignore[attr-defined]
    setattr(_local_call, _CACHED_MARK, True)
    APIMethod._local_call = _local_call  # type: ignore[method-assign]


def settle_heap() -> None:
    """Collects once and freezes what start-up allocated, so later collections skip it."""
    gc.collect()
    gc.freeze()


# uvicorn versions whose httptools protocol `ShelfwiseProtocol` was written against: it relies on
# the parser callbacks `on_message_begin` / `on_headers_complete`, on `_start_asgi_task`, on the
# request cycle's `response_started` / `response_complete` / `keep_alive` and on `self.tasks`.
# A version that offers a header timeout or a task-only concurrency limit may make it moot.
KNOWN_UVICORN = frozenset({"0.54.0"})


def check_uvicorn(version: str, protocol: type) -> None:
    """Raises unless uvicorn is a known version serving with its httptools protocol.

    Args:
        version: The installed uvicorn version.
        protocol: The class uvicorn's `auto` HTTP protocol resolves to.

    Raises:
        BentoMLCompatError: An unknown version, or another protocol (h11 without httptools).
    """
    if version not in KNOWN_UVICORN:
        raise BentoMLCompatError(
            f"bentos/compat.py: uvicorn {version} is not a version bentos.protocol."
            f"ShelfwiseProtocol was written for ({', '.join(sorted(KNOWN_UVICORN))}). Check it "
            "against the new httptools protocol (or use the new version's own header timeout and "
            "concurrency limit, if it has them) and add the version to KNOWN_UVICORN."
        )
    if protocol is not HttpToolsProtocol:
        raise BentoMLCompatError(
            f"bentos/compat.py: uvicorn serves with {protocol.__name__}, not its httptools "
            "protocol: install httptools (pinned in constraints.txt) for load shedding and the "
            "header timeout."
        )


def install_http_protocol() -> None:
    """Makes uvicorn's `auto` HTTP protocol `ShelfwiseProtocol` (idempotent).

    Raises:
        BentoMLCompatError: The installed uvicorn is not a known version, or serves with h11.
    """
    if uvicorn_auto.AutoHTTPProtocol is ShelfwiseProtocol:
        return
    check_uvicorn(uvicorn.__version__, uvicorn_auto.AutoHTTPProtocol)
    # uvicorn.Config.load() resolves http="auto" (what BentoML passes) through this attribute.
    uvicorn_auto.AutoHTTPProtocol = ShelfwiseProtocol
