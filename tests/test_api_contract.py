"""The service's HTTP contract against hostile and careless clients, over real HTTP: schemathesis
over the served OpenAPI document (no server error, every answer as documented), and each
reproduction of a probe that once got a 500, an ignored option or a traceback in the log."""

import json
import time
import uuid
from importlib import metadata as package_metadata
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import checks

from bentos.api_models import RecommendResponse
from bentos.contract import document_contract
from shelfwise.settings import Settings
from tests.support import served_copy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def contract_server(pipeline_run, tmp_path_factory):
    """A server on a copy of the pipeline's state (schemathesis posts events to it)."""
    assert pipeline_run.result.success, pipeline_run.failures
    folder = tmp_path_factory.mktemp("contract")
    with served_copy(pipeline_run.settings, folder) as (url, copy):
        yield url, copy, folder / "bentoml.log"


CONTRACT_CHECKS = [
    checks.not_a_server_error,
    checks.response_schema_conformance,
    checks.status_code_conformance,
    checks.content_type_conformance,
]


def test_every_operation_answers_as_documented_and_never_with_a_server_error(contract_server):
    # Each operation's strategy under Hypothesis directly: schemathesis' lazy pytest loader
    # (`from_fixture`) does not run under pytest 9.
    url, _, _ = contract_server
    schema = schemathesis.openapi.from_url(f"{url}/docs.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    routes = {"/recommend", "/similar", "/events", "/history", "/admin/reload"}
    assert {op.path for op in operations} >= routes
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=40,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
        )
        def answers_as_documented(case):
            case.call_and_validate(checks=CONTRACT_CHECKS, timeout=30)

        answers_as_documented()


def post(url: str, route: str, body, **options) -> httpx.Response:
    return httpx.post(f"{url}{route}", json=body, timeout=30, **options)


def error_of(response: httpx.Response) -> tuple[int, str]:
    return response.status_code, response.json()["field"]


def files_holding(folder: Path, text: bytes) -> list[Path]:
    return [path for path in folder.rglob("*") if path.is_file() and text in path.read_bytes()]


def test_a_megabyte_user_id_is_refused_and_writes_nothing(contract_server):
    url, copy, _ = contract_server
    giant = uuid.uuid4().hex * 31_250  # 1 MB
    for route, body in (
        ("/recommend", {"user_id": giant, "k": 100}),
        ("/similar", {"item_id": "i1", "user_id": giant, "k": 100}),
        ("/recommend", {"user_id": "u1", "context": {"session_item_ids": ["i" * 201]}}),
        ("/recommend", {"user_id": "u1", "filters": {"exclude_item_ids": ["i" * 201]}}),
    ):
        response = post(url, route, body)
        assert response.status_code == 400, response.text
        assert response.json()["field"].split(".")[0] in ("user_id", "context", "filters")
    time.sleep(1)  # impressions are flushed every 0.2 s: any would be in the log by now
    assert files_holding(copy.home, giant[:64].encode()) == []


@pytest.mark.parametrize(
    "moment", ["0001-01-01T00:00:00+05:00", "9999-12-31T23:59:59-05:00", "1970-01-01T00:00:00Z"]
)
def test_implausible_times_are_a_400_naming_the_field_and_valid_events_still_land(
    contract_server, moment
):
    url, _, _ = contract_server
    good = {"event_id": uuid.uuid4().hex, "user_id": "u1", "item_id": "i1", "event_type": "view"}
    bad = {**good, "event_id": uuid.uuid4().hex, "occurred_at": moment}
    answer = post(url, "/events", {"events": [good, bad]})
    assert answer.status_code == 200
    body = answer.json()
    assert body["accepted"] == 1 and [r["field"] for r in body["rejected"]] == ["occurred_at"]
    stock = {"item_id": "i1", "is_in_stock": False, "updated_at": moment}
    assert error_of(post(url, "/events", {"stock": [stock]})) == (400, "stock.0.updated_at")


@pytest.mark.parametrize("price", [1e308, float("inf"), float("nan"), -1.0])
def test_absurd_prices_are_refused(contract_server, price):
    url, _, _ = contract_server
    event = {"user_id": "u1", "item_id": "i1", "event_type": "purchase", "price": price}
    # Python's JSON writes inf and nan as `Infinity` and `NaN`, as a careless client would.
    body = json.dumps({"events": [event]}, allow_nan=True)
    answer = httpx.post(
        f"{url}/events", content=body, headers={"Content-Type": "application/json"}, timeout=30
    )
    assert answer.status_code == 400
    assert [r["field"] for r in answer.json()["rejected"]] == ["price"]


@pytest.mark.parametrize(
    ("route", "body", "field"),
    [
        ("/recommend", {"user_id": "u1", "filter": {"in_stock_only": False}}, "filter"),
        ("/recommend", {"user_id": "u1", "k": True}, "k"),
        ("/recommend", {"user_id": "u1", "k": 1.5}, "k"),
        ("/recommend", {"user_id": "u1", "filters": {"in_stock_only": 0}}, "filters.in_stock_only"),
        ("/similar", {"item_id": "i1", "k": 101}, "k"),
        ("/history", {"user_id": "u1", "limit": True}, "limit"),
        ("/history", {"user_id": "u1", "k": 5}, "k"),
        ("/events", {"event": []}, "event"),
        ("/events", {"stock": [{"item_id": "i1", "is_in_stock": 1}]}, "stock.0.is_in_stock"),
        ("/admin/reload", {"now": True}, "now"),
    ],
)
def test_typos_and_loose_types_are_a_400_not_silently_read(contract_server, route, body, field):
    url, _, _ = contract_server
    answer = post(url, route, body)
    assert error_of(answer) == (400, field)
    assert answer.json()["error"]


@pytest.mark.parametrize(
    "content_type",
    ["multipart/form-data", "application/x-www-form-urlencoded", "text/plain", None],
)
def test_anything_but_json_is_a_415_before_it_is_parsed(contract_server, content_type):
    url, _, _ = contract_server
    headers = {"Content-Type": content_type} if content_type else {}
    for route in ("/recommend", "/similar", "/events", "/history"):
        answer = httpx.post(f"{url}{route}", content=b"x=1", headers=headers, timeout=30)
        assert error_of(answer) == (415, "Content-Type")


def test_a_client_error_is_one_log_line_without_a_traceback(contract_server):
    url, _, log = contract_server
    marker = uuid.uuid4().hex
    for _ in range(5):
        post(url, "/recommend", {"user_id": "u1", marker: "x" * 100_000})
    httpx.post(f"{url}/events", content=b"{", headers={"Content-Type": "application/json"})
    lines = [line for line in log.read_text().splitlines() if marker in line]
    assert len(lines) == 5 and all("[INFO]" in line and len(line) < 600 for line in lines)
    assert "Traceback" not in log.read_text()


def test_the_document_declares_nullable_fields_and_every_error_status(contract_server):
    url, _, _ = contract_server
    document = httpx.get(f"{url}/docs.json", timeout=30).json()
    # Shelfwise's API, not BentoML's boilerplate (served from source: the package's version).
    assert document["info"]["title"] == "Shelfwise"
    assert document["info"]["version"] == package_metadata.version("shelfwise")
    assert "contact" not in document["info"] and "BentoML" not in document["info"]["description"]
    schemas = document["components"]["schemas"]
    assert schemas["RecommendResponse"]["properties"]["model_version"]["nullable"] is True
    assert schemas["RecommendRequest"]["additionalProperties"] is False
    for route in ("/recommend", "/similar", "/events", "/history", "/admin/reload"):
        responses = document["paths"][route]["post"]["responses"]
        assert {"200", "400", "411", "413", "415", "429", "503"} <= set(responses)
    assert "401" in document["paths"]["/events"]["post"]["responses"]
    assert "401" in document["paths"]["/history"]["post"]["responses"]
    assert "401" not in document["paths"]["/recommend"]["post"]["responses"]


def test_the_document_rewrites_every_null_alternative_for_openapi_3_0():
    spec = {
        "paths": {
            "/recommend": {
                "post": {"responses": {"200": {}, "400": {}, "404": {}}, "requestBody": {}}
            }
        },
        "components": {"schemas": {}},
    }
    from bentos.api_models import RecommendRequest

    document = document_contract(spec, {"/recommend": (RecommendRequest, RecommendResponse)})
    assert '{"type": "null"}' not in json.dumps(document)
    assert "404" not in document["paths"]["/recommend"]["post"]["responses"]


def test_bearer_is_case_insensitive_and_tokens_are_utf8(pipeline_run, tmp_path):
    token = "clé-secrète-🔑"
    env = {"SHELFWISE_API_TOKEN": token}
    with served_copy(pipeline_run.settings, tmp_path, env) as (url, _):
        body = {"events": [{"user_id": "u1", "item_id": "i1", "event_type": "view"}]}
        for scheme in ("Bearer", "bearer", "BEARER"):
            header = f"{scheme} {token}".encode()
            answer = post(url, "/events", body, headers={"Authorization": header})
            assert answer.status_code == 200, (scheme, answer.text)
        wrong = post(url, "/events", body, headers={"Authorization": b"Bearer cl\xe9"})
        assert error_of(wrong) == (401, "Authorization")
    assert token not in repr(Settings.from_env({"SHELFWISE_API_TOKEN": token}))
    assert token not in (tmp_path / "bentoml.log").read_text()
