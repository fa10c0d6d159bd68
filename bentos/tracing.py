"""OpenTelemetry traces of the read endpoints, exported over OTLP/HTTP; off unless configured.

Why not BentoML's own tracing (the service config's `tracing` section)? It is fixed when the
service class is decorated, at import, so turning it on would mean reading the environment at
import or asking operators for a second configuration mechanism (`BENTOML_CONFIG_OPTIONS`); its
tracer provider is BentoML's alone (the stage spans could not join it without reaching into
BentoML's container); and its middleware would have to be taken off `/recommend`'s exclusion
(bentos/compat.py `HOT_ROUTES`), which it is for speed. So Shelfwise keeps BentoML's tracing
off the hot routes and traces them itself, from `Settings` read when the worker starts:

- `SHELFWISE_OTLP_ENDPOINT` unset (the default): no tracer provider, no middleware
  (`request_tracing` hands back the app it was given), the recommender's tracer is None and its
  stages create no span (`models.tracing`). Nothing is imported beyond the OpenTelemetry API.
- set: one tracer provider per worker process (`tracer_provider`), sampling
  `SHELFWISE_TRACE_SAMPLE_RATE` of the requests (a caller's W3C `traceparent` decides instead
  when it sends one), exporting in batches over OTLP/HTTP protobuf to the endpoint. Each
  `/recommend` and `/similar` request gets a server span (OpenTelemetry's ASGI middleware: the
  caller's trace context, HTTP method, route and status), and the service's spans of its stages
  become its children. The exporter honours OpenTelemetry's own variables for what Shelfwise does
  not set: `OTEL_EXPORTER_OTLP_HEADERS` (authentication), `OTEL_EXPORTER_OTLP_TIMEOUT`,
  `OTEL_EXPORTER_OTLP_COMPRESSION`, `OTEL_EXPORTER_OTLP_CERTIFICATE`, the batch processor's
  `OTEL_BSP_*`, `OTEL_SERVICE_NAME` and `OTEL_RESOURCE_ATTRIBUTES`.
"""

import logging
import threading
from typing import TYPE_CHECKING, Any

from shelfwise.settings import Settings

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.trace import Tracer

logger = logging.getLogger("bentoml.shelfwise")

# The routes traced when tracing is on (exact paths): the read endpoints, whose stages have spans.
TRACED_ROUTES = frozenset({"/recommend", "/similar"})
# The instrumentation scope of the service's spans.
TRACER_NAME = "shelfwise"
OTLP_TRACES_PATH = "/v1/traces"

# One provider per process and endpoint: the middleware (built when the worker's app starts) and
# the service instance (built in the app's start-up) share it.
_providers: dict[tuple[str, float], "TracerProvider"] = {}
_providers_lock = threading.Lock()


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of an endpoint: a collector's base URL gets `/v1/traces`.

    Args:
        endpoint: `SHELFWISE_OTLP_ENDPOINT`, e.g. `http://collector:4318` or
            `http://collector:4318/v1/traces`.

    Returns:
        The URL spans are posted to.
    """
    if endpoint.rstrip("/").endswith(OTLP_TRACES_PATH):
        return endpoint
    return endpoint.rstrip("/") + OTLP_TRACES_PATH


def tracer_provider(settings: Settings) -> "TracerProvider | None":
    """This process's tracer provider exporting to `settings.otlp_endpoint`; None when unset.

    Args:
        settings: The service's settings (`otlp_endpoint`, `trace_sample_rate`).

    Returns:
        The provider (created on the first call, shared by later ones), or None: tracing off.
    """
    if not settings.otlp_endpoint:
        return None
    key = (traces_url(settings.otlp_endpoint), settings.trace_sample_rate)
    with _providers_lock:
        provider = _providers.get(key)
        if provider is None:
            provider = _providers[key] = _new_provider(*key)
            logger.info(
                "Tracing /recommend and /similar (sample rate %s) to %s",
                settings.trace_sample_rate,
                key[0],
            )
    return provider


def _new_provider(url: str, sample_rate: float) -> "TracerProvider":
    # Imported here: a service without tracing never loads the SDK's exporter.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    # OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override the default name.
    resource = Resource.create({SERVICE_NAME: "shelfwise"})
    provider = TracerProvider(
        sampler=ParentBased(TraceIdRatioBased(sample_rate)), resource=resource
    )
    # Spans are exported in batches from a background thread, never on the request path.
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=url)))
    return provider


def tracer(settings: Settings) -> "Tracer | None":
    """The tracer of the service's stage spans (`models.tracing`), or None when tracing is off."""
    provider = tracer_provider(settings)
    return None if provider is None else provider.get_tracer(TRACER_NAME)


def stop_tracing() -> None:
    """Exports the spans still queued and stops this process's exporters (at shut-down)."""
    with _providers_lock:
        providers = list(_providers.values())
        _providers.clear()
    for provider in providers:
        provider.shutdown()


class RouteTracing:
    """An ASGI middleware tracing the requests of `TRACED_ROUTES`, passing the others through.

    The traced requests go through OpenTelemetry's ASGI middleware (a server span named
    `POST /recommend`, the caller's `traceparent` honoured, HTTP attributes and status) on the
    service's tracer provider; the spans of its `send` and `receive` calls are left out.
    """

    def __init__(self, app: Any, provider: "TracerProvider") -> None:  # noqa: ANN401
        from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware

        self.app = app
        self.traced = OpenTelemetryMiddleware(
            app, tracer_provider=provider, exclude_spans=["receive", "send"]
        )

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:  # noqa: ANN401
        if scope["type"] == "http" and scope["path"] in TRACED_ROUTES:
            await self.traced(scope, receive, send)
        else:
            await self.app(scope, receive, send)


def request_tracing(app: Any) -> Any:  # noqa: ANN401
    """The middleware factory the service installs: `RouteTracing` when tracing is on, else the
    app itself, so a service without tracing has no extra layer at all.

    Starlette calls it when it builds the worker's middleware stack (when the worker's app
    starts, not at import), so the settings are read then.
    """
    provider = tracer_provider(Settings.from_env())
    return app if provider is None else RouteTracing(app, provider)
