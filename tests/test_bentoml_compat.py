"""The BentoML compatibility shim of `bentos/compat.py`, against BentoML's real code.

- BentoML's real `TimeoutMiddleware`, behind OpenTelemetry's real ASGI middleware (as in a
  BentoML server), on asyncio and on uvloop (what `bentoml serve` runs): unpatched, every
  request's timer stays scheduled and keeps the request's span alive; patched, it is cancelled
  and the span freed.
- A real BentoML service built with `SERVICE_CONFIG`, served through its ASGI app in a separate
  process (BentoML's configuration is process-global): the timeout middleware is in the stack
  with a 10 s timeout, its timers are cancelled once the shim is installed and not before, the
  hot routes are not traced, BentoML's access log is off; BentoML's own option
  (`BENTOML_CONFIG_OPTIONS`) turns the access log back on.
- The shim refuses a `TimeoutMiddleware` whose source it does not know, as after an upgrade.
- The API method cache: BentoML's own caller (defaults filled in, bound to its instance), built
  once per service instance and method, through a real service's ASGI app too; refused for a
  `_local_call` it does not know.
"""

import asyncio
import functools
import gc
import importlib.util
import json
import subprocess
import sys
import weakref
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any

import bentoml
import httpx
import pytest
import uvloop
from bentoml._internal.server.http import traffic
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.util.http import ExcludeList
from pydantic import Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from bentos import compat
from tests.support import PROJECT_ROOT

REQUESTS = 300


def _load_traffic_module(source: str, folder: Path, name: str) -> ModuleType:
    """A fresh module from `source`: BentoML's traffic.py, unpatched or modified."""
    path = folder / f"{name}.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # inspect.getsource finds a class's file through its module
    spec.loader.exec_module(module)
    return module


def _bentoml_traffic_source() -> str:
    return Path(traffic.__file__).read_text()


def _recording(loop_class: type[asyncio.AbstractEventLoop]) -> type[asyncio.AbstractEventLoop]:
    """An event loop class that also keeps every `TimeoutMiddleware` timer it schedules."""

    class RecordingLoop(loop_class):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__()
            self.timeout_timers: list[asyncio.TimerHandle] = []

        def call_later(
            self, delay: float, callback: Callable[..., Any], *args: Any, context: Any = None
        ) -> asyncio.TimerHandle:
            handle = super().call_later(delay, callback, *args, context=context)
            if getattr(callback, "__name__", "") == "_set_timer_out":
                self.timeout_timers.append(handle)
            return handle

    return RecordingLoop


LOOPS = {"asyncio": asyncio.SelectorEventLoop, "uvloop": uvloop.Loop}


def _serve_requests(middleware_class: type, loop_class: type) -> tuple[int, int, int, int]:
    """REQUESTS requests through OTel → TimeoutMiddleware(60 s) → a Starlette route.

    Returns:
        How many timeout timers were scheduled and how many of them are cancelled once the
        responses are done; how many requests were served and how many of their spans are still
        alive then (after a full collection, while the event loop is still open).
    """
    spans: list[weakref.ref] = []

    async def noop(request: Request) -> PlainTextResponse:
        spans.append(weakref.ref(trace.get_current_span()))
        return PlainTextResponse("ok")

    app = OpenTelemetryMiddleware(
        middleware_class(Starlette(routes=[Route("/noop", noop, methods=["POST"])]), timeout=60),
        tracer_provider=TracerProvider(),
    )

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            for _ in range(REQUESTS):
                assert (await client.post("/noop", json={"user_id": "u1"})).text == "ok"
        await asyncio.sleep(0)

    with asyncio.Runner(loop_factory=_recording(loop_class)) as runner:
        runner.run(main())
        timers = runner.get_loop().timeout_timers  # type: ignore[attr-defined]
        scheduled, cancelled = len(timers), sum(timer.cancelled() for timer in timers)
        timers.clear()  # only the event loop may keep them (and their contexts) now
        gc.collect()
        alive = sum(ref() is not None for ref in spans)
    return scheduled, cancelled, len(spans), alive


@pytest.fixture(scope="module")
def unpatched_middleware(tmp_path_factory: pytest.TempPathFactory) -> type:
    """BentoML's TimeoutMiddleware as shipped, loaded afresh from its file (never patched)."""
    folder = tmp_path_factory.mktemp("bentoml_traffic")
    return _load_traffic_module(
        _bentoml_traffic_source(), folder, "bentoml_traffic_unpatched"
    ).TimeoutMiddleware


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_unpatched_timeout_middleware_keeps_every_request_alive(
    unpatched_middleware: type, loop_name: str
) -> None:
    scheduled, cancelled, served, alive = _serve_requests(unpatched_middleware, LOOPS[loop_name])

    assert scheduled == served == REQUESTS
    assert cancelled == 0
    assert alive == REQUESTS  # the problem the shim exists for; if this fails it may be moot


@pytest.mark.parametrize("loop_name", sorted(LOOPS))
def test_shim_cancels_the_timer_and_frees_the_request(loop_name: str) -> None:
    compat.install_timeout_timer_fix()

    scheduled, cancelled, served, alive = _serve_requests(
        traffic.TimeoutMiddleware, LOOPS[loop_name]
    )

    assert scheduled == served == cancelled == REQUESTS
    if loop_name == "uvloop":
        assert alive == 0
    else:
        # asyncio drops a cancelled timer's context only when it purges its timer heap (once
        # more than 100 are scheduled and half are cancelled), so at most ~100 stay alive.
        assert alive <= 101


def test_shim_is_idempotent() -> None:
    compat.install_timeout_timer_fix()
    patched = traffic.TimeoutMiddleware.__call__

    compat.install_timeout_timer_fix()

    assert traffic.TimeoutMiddleware.__call__ is patched


def test_shim_still_times_out_a_slow_request() -> None:
    compat.install_timeout_timer_fix()

    async def slow(request: Request) -> PlainTextResponse:
        await asyncio.sleep(5)
        return PlainTextResponse("late")

    app = traffic.TimeoutMiddleware(
        Starlette(routes=[Route("/slow", slow, methods=["POST"])]), timeout=0.05
    )

    async def main() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post("/slow")

    response = asyncio.run(main())

    assert response.status_code == 504
    assert "0.05 seconds" in response.json()["error"]


def test_installed_bentoml_is_the_one_the_shim_knows() -> None:
    compat.check_timeout_middleware(traffic.TimeoutMiddleware, bentoml.__version__)


def test_shim_refuses_a_timeout_middleware_it_does_not_know(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What an upstream fix would look like: BentoML cancelling the timer itself.
    original = "        loop.call_later(self.timeout, self._set_timer_out, waiter)\n"
    source = _bentoml_traffic_source()
    assert original in source
    fixed = source.replace(
        original, "        timer = loop.call_later(self.timeout, self._set_timer_out, waiter)\n"
    ).replace(
        "        else:\n            await fut  # wait for the future to finish\n",
        "        else:\n            await fut  # wait for the future to finish\n"
        "        finally:\n            timer.cancel()\n",
    )
    assert fixed.count("timer.cancel()") == 1
    upgraded = _load_traffic_module(fixed, tmp_path, "bentoml_traffic_upgraded").TimeoutMiddleware

    with pytest.raises(compat.BentoMLCompatError, match="BentoML 1.4.99's TimeoutMiddleware"):
        compat.check_timeout_middleware(upgraded, "1.4.99")

    # The installer checks the class BentoML would use, not just any class it is given.
    monkeypatch.setattr(traffic, "TimeoutMiddleware", upgraded)
    with pytest.raises(compat.BentoMLCompatError, match="delete install_timeout_timer_fix"):
        compat.install_timeout_timer_fix()


def test_tracing_exclusions_cover_exactly_the_hot_routes() -> None:
    excluded = ExcludeList(compat.SERVICE_CONFIG["tracing"]["excluded_urls"])

    for route in compat.HOT_ROUTES:
        assert excluded.url_disabled(f"http://127.0.0.1:3000{route}")
    for other in ("/docs", "/docs.json", "/recommend/explain", "/"):
        assert not excluded.url_disabled(f"http://127.0.0.1:3000{other}")


def probe_service(install_shim: bool) -> dict[str, Any]:
    """Serves a real BentoML service with SERVICE_CONFIG through its ASGI app (own process).

    Returns:
        Its middleware stack, the timeout timers its requests scheduled and whether they were
        cancelled, and whether /noop (a hot route) and /traced (not one) got a tracing span.
    """
    from bentoml._internal.context import trace_context
    from pydantic import BaseModel
    from starlette.testclient import TestClient

    if install_shim:
        compat.install_timeout_timer_fix()

    class Traced(BaseModel):
        traced: bool

    @bentoml.service(name="compat_probe", **compat.SERVICE_CONFIG)
    class Probe:
        def __init__(self) -> None:
            compat.settle_heap()

        @bentoml.api(route="/noop")
        def noop(self, user_id: str) -> Traced:
            return Traced(traced=trace_context.request_id is not None)

        @bentoml.api(route="/traced")
        def traced(self, user_id: str) -> Traced:
            return Traced(traced=trace_context.request_id is not None)

    loop_class = _recording(asyncio.SelectorEventLoop)
    loops: list[Any] = []

    def loop_factory() -> asyncio.AbstractEventLoop:
        loops.append(loop_class())
        return loops[-1]

    app = Probe.to_asgi()
    with TestClient(app, backend_options={"loop_factory": loop_factory}) as client:
        noop = [client.post("/noop", json={"user_id": "u1"}).json()["traced"] for _ in range(20)]
        traced = client.post("/traced", json={"user_id": "u1"}).json()["traced"]
    timers = [timer for loop in loops for timer in loop.timeout_timers]
    return {
        "middlewares": [[m.cls.__name__, m.kwargs.get("timeout")] for m in app.user_middleware],
        "timers": len(timers),
        "cancelled": sum(timer.cancelled() for timer in timers),
        "noop_traced": any(noop),
        "traced_traced": traced,
    }


def _probe_in_subprocess(
    install_shim: bool, tmp_path: Path, env: dict[str, str] | None = None
) -> dict[str, Any]:
    code = (
        "import json, sys; from tests.test_bentoml_compat import probe_service; "
        f"sys.stdout.write('PROBE ' + json.dumps(probe_service({install_shim})))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=PROJECT_ROOT,
        env={
            "BENTOML_HOME": str(tmp_path / "bentoml"),
            "BENTOML_DO_NOT_TRACK": "true",
            **(env or {}),
        },
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.rsplit("PROBE ", 1)[1])


@pytest.mark.parametrize("install_shim", [False, True], ids=["unpatched", "shim"])
def test_real_service_with_service_config(install_shim: bool, tmp_path: Path) -> None:
    probe = _probe_in_subprocess(install_shim, tmp_path)

    # BentoML still wraps every request in its TimeoutMiddleware, with our timeout.
    assert ["TimeoutMiddleware", compat.SERVICE_CONFIG["traffic"]["timeout"]] in probe[
        "middlewares"
    ]
    assert probe["timers"] == 21
    assert probe["cancelled"] == (21 if install_shim else 0)
    assert probe["noop_traced"] is False
    assert probe["traced_traced"] is True
    # No access log by default (SERVICE_CONFIG)...
    assert "AccessLogMiddleware" not in [name for name, _ in probe["middlewares"]]


def test_bentomls_own_option_turns_the_access_log_back_on(tmp_path: Path) -> None:
    option = "services.compat_probe.logging.access.enabled=true"
    probe = _probe_in_subprocess(True, tmp_path, {"BENTOML_CONFIG_OPTIONS": option})

    assert "AccessLogMiddleware" in [name for name, _ in probe["middlewares"]]


def test_the_recommendation_service_installs_the_fix_when_imported():
    import subprocess
    import sys

    from tests.support import PROJECT_ROOT

    check = (
        "import bentos.service\n"
        "from bentoml._internal.server.http import traffic\n"
        "assert getattr(traffic.TimeoutMiddleware.__call__, '__shelfwise_cancels_timer__', False)\n"
        "from _bentoml_sdk.method import APIMethod\n"
        "assert getattr(APIMethod._local_call, '__shelfwise_caches_callers__', False)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", check], cwd=PROJECT_ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]


# A fresh interpreter polls the production model (as the service's upkeep does) while a thread
# imports pandas, as pyarrow does at the impression writer's first batch.
_POLL_DURING_PANDAS_IMPORT = """
import sys, threading
from pathlib import Path
from shelfwise.runtime.registry import production
home = Path(sys.argv[1])
production(home)
assert "pandas" not in sys.modules
importer = threading.Thread(target=__import__, args=("pandas",))
importer.start()
if sys.argv[2] == "poller-imports-too":
    import pandas  # waits for the other thread's import to finish, if it is under way
failed = polls = 0
while importer.is_alive() or polls < 20:
    polls += 1
    try:
        production(home)
    except Exception:
        failed += 1
print(failed, polls)
"""


def test_a_model_poll_fails_while_pandas_is_half_imported_unless_the_poller_imports_it(
    pipeline_run,
):
    """Why the service's upkeep imports pandas before its first model poll
    (`RecommendationService._background`): BentoML's check of a model's metadata looks pandas
    up in `sys.modules` without importing it, and meets a half-initialized module while another
    thread imports it; a thread that imported pandas itself waits on the import lock instead."""
    home = str(pipeline_run.settings.bentoml_home)
    results = {}
    for order in ("concurrent", "poller-imports-too"):
        done = subprocess.run(
            [sys.executable, "-c", _POLL_DURING_PANDAS_IMPORT, home, order],
            cwd=PROJECT_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        results[order] = [int(n) for n in done.stdout.split()]
    assert results["concurrent"][0] > 0, results
    assert results["poller-imports-too"][0] == 0, results


@bentoml.service(name="compat_callers")
class _Callers:
    """A service whose API has a pydantic `Field` default, which BentoML's caller fills in."""

    @bentoml.api(route="/echo")
    def echo(self, user_id: str, k: Annotated[int, Field(ge=1)] = Field(10)) -> dict[str, Any]:
        return {"user_id": user_id, "k": k, "instance": id(self)}


def test_api_method_cache_builds_each_caller_once_per_instance() -> None:
    compat.install_api_method_cache()
    first, second = _Callers.inner(), _Callers.inner()

    caller = first.echo.local

    # What BentoML's caller does (the Field default filled in, bound to the instance), built once.
    assert caller(user_id="u1") == {"user_id": "u1", "k": 10, "instance": id(first)}
    assert caller(user_id="u1", k=3)["k"] == 3
    assert all(first.echo.local is caller for _ in range(5))
    assert second.echo.local is not caller
    assert second.echo.local(user_id="u2")["instance"] == id(second)

    # The callers live on their instance: one that goes takes its callers with it.
    gone = weakref.ref(second)
    del second
    gc.collect()
    assert gone() is None


def test_api_method_cache_answers_requests_as_bentoml_does() -> None:
    from starlette.testclient import TestClient

    compat.install_api_method_cache()
    with TestClient(_Callers.to_asgi()) as client:
        answers = [client.post("/echo", json={"user_id": f"u{n}"}).json() for n in range(20)]
        refused = client.post("/echo", json={"user_id": "u1", "k": 0})

    assert [answer["user_id"] for answer in answers] == [f"u{n}" for n in range(20)]
    assert {answer["k"] for answer in answers} == {10}
    assert len({answer["instance"] for answer in answers}) == 1  # one instance, one caller
    assert refused.status_code == 400


def test_installed_bentoml_is_the_one_the_api_method_cache_knows() -> None:
    compat.check_local_call(compat.APIMethod._local_call.__wrapped__, bentoml.__version__)


def test_api_method_cache_refuses_a_local_call_it_does_not_know(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def _local_call(self: Any, instance: Any) -> Callable[..., Any]:  # an upgrade's own version
        return functools.partial(self.func, instance)

    monkeypatch.setattr(compat.APIMethod, "_local_call", _local_call)

    with pytest.raises(compat.BentoMLCompatError, match="delete install_api_method_cache"):
        compat.install_api_method_cache()
