"""Traces of `/recommend`'s stages (bentos/tracing.py, models/tracing.py): off by default with no
span at all, and with `SHELFWISE_OTLP_ENDPOINT` set, exported over OTLP/HTTP to a real receiver
by a real `bentoml serve`, the stages as children of the request's span."""

import secrets
import uuid

import httpx
import polars as pl
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from bentos.tracing import (
    TRACED_ROUTES,
    RouteTracing,
    request_tracing,
    tracer,
    tracer_provider,
    traces_url,
)
from models.ranker import booster_from_text
from models.recommender import STRATEGY_PERSONALIZED, Recommender
from models.segments import SegmentPolicy
from models.session import Session
from models.tracing import (
    STAGE_CANDIDATES,
    STAGE_FEATURES,
    STAGE_NEIGHBOURS,
    STAGE_RANK,
    STAGE_RULES,
    STAGE_STATE,
    stage,
)
from shelfwise.lake import SERVING_CANDIDATES
from shelfwise.runtime.registry import production_path, read_ranker
from shelfwise.settings import Settings
from tests.support import ReceivedSpan, otlp_receiver, served_copy

SERVER_KIND = 2  # opentelemetry.proto.trace.v1.Span.SpanKind.SPAN_KIND_SERVER
STAGES = {STAGE_STATE, STAGE_CANDIDATES, STAGE_FEATURES, STAGE_RANK, STAGE_RULES}


# --- configuration: off unless an endpoint is set ------------------------------------------------


def test_tracing_is_off_by_default_and_then_builds_nothing():
    settings = Settings.from_env({})
    assert settings.otlp_endpoint is None and settings.trace_sample_rate == 1.0
    assert tracer_provider(settings) is None and tracer(settings) is None
    app = object()
    assert request_tracing(app) is app  # not even a middleware layer
    # Without a tracer a stage is one shared do-nothing context manager, yielding no span.
    assert stage(None, STAGE_RANK) is stage(None, STAGE_RULES)
    with stage(None, STAGE_RANK) as span:
        assert span is None


def test_tracing_settings_come_from_the_environment():
    settings = Settings.from_env(
        {
            "SHELFWISE_OTLP_ENDPOINT": "https://user:pw@collector.internal:4318",
            "SHELFWISE_TRACE_SAMPLE_RATE": "0.25",
        }
    )
    assert settings.otlp_endpoint == "https://user:pw@collector.internal:4318"
    assert settings.trace_sample_rate == 0.25
    assert "pw@" not in repr(settings)
    with pytest.raises(ValueError, match="SHELFWISE_TRACE_SAMPLE_RATE"):
        Settings.from_env({"SHELFWISE_TRACE_SAMPLE_RATE": "1.5"})


def test_a_collectors_base_url_gets_the_traces_path():
    assert traces_url("http://c:4318") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/") == "http://c:4318/v1/traces"
    assert traces_url("http://c:4318/v1/traces") == "http://c:4318/v1/traces"
    assert traces_url("http://gw/otel/v1/traces") == "http://gw/otel/v1/traces"


def test_only_the_read_endpoints_get_a_request_span():
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def ok(request):
        return PlainTextResponse("ok")

    paths = ["/recommend", "/similar", "/events", "/metrics", "/readyz"]
    app = Starlette(routes=[Route(path, ok, methods=["GET", "POST"]) for path in paths])
    with TestClient(RouteTracing(app, provider)) as client:
        for path in paths:
            assert client.post(path).status_code == 200
    names = sorted(span.name for span in exporter.get_finished_spans())
    # The request spans only: the ASGI middleware's send and receive spans are left out.
    assert names == sorted(f"POST {path}" for path in TRACED_ROUTES)


# --- the recommender's stages, in process --------------------------------------------------------


@pytest.fixture(scope="module")
def recommender(pipeline_run) -> Recommender:
    assert pipeline_run.result.success, pipeline_run.failures
    text, info = read_ranker(production_path(pipeline_run.settings.bentoml_home))
    policy = SegmentPolicy.from_dict(info.get("segment_policy"))
    return Recommender.from_lake(
        pipeline_run.lake, booster_from_text(text), info["features"], segment_policy=policy
    )


def personalised_user(recommender: Recommender, users: list[str]) -> str:
    """The first of `users` the ranker serves (not one its segment policy sends to the ladder)."""
    for user in users:
        if recommender.recommend(user, 10).strategy == STRATEGY_PERSONALIZED:
            return user
    raise AssertionError("no personalised user")


@pytest.fixture(scope="module")
def shop(pipeline_run):
    snapshot = pipeline_run.lake.read_frame(SERVING_CANDIDATES)
    sizes = snapshot.group_by("user_id").len().sort("len", "user_id", descending=[True, False])
    return {"users": sizes.get_column("user_id").to_list(), "snapshot": snapshot}


def candidate_items(shop, user_id: str, n: int) -> list[str]:
    rows = shop["snapshot"].filter(pl.col("user_id") == user_id).sort("candidate_rank")
    return rows.get_column("item_id").head(n).to_list()


def traced(recommender: Recommender):
    """The recommender with a real SDK tracer whose spans are kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return recommender.with_tracer(provider.get_tracer("test")), provider, exporter


def test_a_known_users_stages_are_children_of_the_request(recommender, shop):
    user = personalised_user(recommender, shop["users"])
    session = Session(tuple(candidate_items(shop, user, 2)))
    tracing, provider, exporter = traced(recommender)
    with provider.get_tracer("test").start_as_current_span("request") as request:
        answer = tracing.recommend(user, 10, session=session)
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"request", STAGE_CANDIDATES, STAGE_FEATURES, STAGE_RANK, STAGE_RULES}
    request_id = request.get_span_context().span_id
    for name in (STAGE_CANDIDATES, STAGE_FEATURES, STAGE_RANK, STAGE_RULES):
        assert spans[name].parent.span_id == request_id, name
    candidates = spans[STAGE_CANDIDATES].attributes
    assert candidates["shelfwise.user.known"] is True
    assert candidates["shelfwise.candidates"] == len(candidate_items(shop, user, 10_000))
    features = spans[STAGE_FEATURES].attributes
    assert features["shelfwise.session.items"] == 2
    assert features["shelfwise.rows"] >= candidates["shelfwise.candidates"]
    assert dict(spans[STAGE_RULES].attributes) == {
        "shelfwise.source": STRATEGY_PERSONALIZED,
        "shelfwise.picked": 10,
    }
    # Tracing changes nothing in the answer.
    untraced = recommender.recommend(user, 10, session=session)
    assert (answer.items, answer.strategy, answer.fallback_level) == (
        untraced.items,
        untraced.strategy,
        untraced.fallback_level,
    )


def test_an_unknown_users_neighbours_are_traced(recommender, shop):
    user = f"never-seen-{uuid.uuid4().hex}"
    session = Session(tuple(candidate_items(shop, shop["users"][0], 2)))
    tracing, _, exporter = traced(recommender)
    answer = tracing.recommend(user, 10, session=session)
    assert answer.strategy == "session"
    spans = exporter.get_finished_spans()
    by_name = {span.name: span for span in spans}
    assert by_name[STAGE_CANDIDATES].attributes["shelfwise.user.known"] is False
    assert by_name[STAGE_CANDIDATES].attributes["shelfwise.candidates"] == 0
    assert STAGE_FEATURES not in by_name and STAGE_RANK not in by_name
    neighbours = by_name[STAGE_NEIGHBOURS].get_span_context().span_id
    rules = [span for span in spans if span.name == STAGE_RULES]
    assert rules[0].attributes["shelfwise.source"] == "neighbours"
    assert rules[0].parent.span_id == neighbours
    assert sum(span.attributes["shelfwise.picked"] for span in rules) == len(answer.items)


# --- a real server exporting to a real OTLP receiver ---------------------------------------------


def traceparent() -> tuple[str, str, str]:
    """A caller's W3C trace context: (header, trace id, span id), sampled."""
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def of_trace(spans: list[ReceivedSpan], trace_id: str) -> list[ReceivedSpan]:
    return [span for span in spans if span.trace_id == trace_id]


@pytest.fixture(scope="module")
def receiver():
    with otlp_receiver() as received:
        yield received


@pytest.fixture(scope="module")
def tracing_server(pipeline_run, receiver, tmp_path_factory):
    assert pipeline_run.result.success, pipeline_run.failures
    env = {
        "SHELFWISE_OTLP_ENDPOINT": receiver.url,
        # Export every 100 ms rather than every 5 s, so the test need not wait.
        "OTEL_BSP_SCHEDULE_DELAY": "100",
    }
    with served_copy(pipeline_run.settings, tmp_path_factory.mktemp("traced"), env) as served:
        yield served


def test_recommend_exports_its_stages_as_children_of_the_request_span(
    tracing_server, receiver, shop
):
    url, _ = tracing_server
    header, trace_id, caller_span = traceparent()
    for user in shop["users"]:  # the first the ranker serves (the segment policy may not)
        body = {
            "user_id": user,
            "k": 10,
            "context": {"session_item_ids": candidate_items(shop, user, 2)},
        }
        response = httpx.post(
            f"{url}/recommend", json=body, headers={"traceparent": header}, timeout=10
        )
        assert response.status_code == 200, response.text
        if response.json()["strategy"] == STRATEGY_PERSONALIZED:
            break
    answer = response.json()
    assert answer["strategy"] == STRATEGY_PERSONALIZED

    def complete(spans):
        names = {span.name for span in of_trace(spans, trace_id)}
        return {"POST /recommend", *STAGES} <= names

    spans = of_trace(receiver.wait_for(complete), trace_id)
    # One request span per /recommend of this trace: the last is the personalised one.
    requests = [span for span in spans if span.name == "POST /recommend"]
    request = next(s for s in requests if s.attributes["shelfwise.rec_id"] == answer["rec_id"])
    assert request.kind == SERVER_KIND
    assert request.parent_span_id == caller_span  # the caller's trace continues
    assert request.service_name == "shelfwise"
    assert request.attributes["shelfwise.strategy"] == STRATEGY_PERSONALIZED
    assert request.attributes["shelfwise.fallback_level"] == answer["fallback_level"] == 0
    assert request.attributes["shelfwise.model_version"] == answer["model_version"]
    assert request.attributes["shelfwise.ranker_engine"] in {"compiled", "lightgbm"}
    assert request.attributes["shelfwise.items"] == 10
    stages = {s.name: s for s in spans if s.parent_span_id == request.span_id}
    assert STAGES <= set(stages)
    assert stages[STAGE_CANDIDATES].attributes["shelfwise.user.known"] is True
    assert stages[STAGE_CANDIDATES].attributes["shelfwise.candidates"] > 0
    assert stages[STAGE_FEATURES].attributes["shelfwise.session.items"] == 2
    assert stages[STAGE_RULES].attributes["shelfwise.picked"] == 10


def test_an_unknown_user_and_similar_are_traced_events_are_not(tracing_server, receiver, shop):
    url, _ = tracing_server
    header, trace_id, _ = traceparent()
    headers = {"traceparent": header}
    event = {
        "event_id": uuid.uuid4().hex,
        "user_id": "someone",
        "item_id": candidate_items(shop, shop["users"][0], 1)[0],
        "event_type": "view",
    }
    assert httpx.post(f"{url}/events", json={"events": [event]}, headers=headers).is_success
    stranger = {"user_id": f"stranger-{uuid.uuid4().hex}", "k": 5}
    answer = httpx.post(f"{url}/recommend", json=stranger, headers=headers)
    assert answer.status_code == 200
    similar = {"item_id": event["item_id"], "k": 5}
    assert httpx.post(f"{url}/similar", json=similar, headers=headers).is_success

    def complete(spans):
        names = {span.name for span in of_trace(spans, trace_id)}
        return {"POST /recommend", "POST /similar"} <= names

    spans = of_trace(receiver.wait_for(complete), trace_id)
    assert not [span for span in spans if "/events" in span.name]
    request = next(span for span in spans if span.name == "POST /recommend")
    assert request.attributes["shelfwise.strategy"] == answer.json()["strategy"]
    stages = {s.name: s for s in spans if s.parent_span_id == request.span_id}
    assert stages[STAGE_CANDIDATES].attributes["shelfwise.user.known"] is False
    assert STAGE_RANK not in stages and STAGE_STATE in stages
    similar_span = next(span for span in spans if span.name == "POST /similar")
    rules = [s for s in spans if s.parent_span_id == similar_span.span_id]
    assert rules and {s.name for s in rules} == {STAGE_RULES}


def test_without_an_endpoint_nothing_is_exported(pipeline_run, tmp_path):
    """OpenTelemetry's own variables pointing at a receiver do not turn tracing on."""
    assert pipeline_run.result.success, pipeline_run.failures
    known = pipeline_run.lake.read_frame(SERVING_CANDIDATES).get_column("user_id").head(3)
    with otlp_receiver() as received:
        env = {
            "SHELFWISE_OTLP_ENDPOINT": "",
            "OTEL_EXPORTER_OTLP_ENDPOINT": received.url,
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }
        with served_copy(pipeline_run.settings, tmp_path, env) as (url, _):
            header, _, _ = traceparent()
            for user in ("u-anyone", *known.to_list()):
                response = httpx.post(
                    f"{url}/recommend", json={"user_id": user}, headers={"traceparent": header}
                )
                assert response.status_code == 200
        # Had the server an exporter, its shut-down (the block's end) would have flushed it.
        log = (tmp_path / "bentoml.log").read_text()
    assert received.exports == 0 and received.spans == []
    assert "Tracing /recommend" not in log
