"""Operating the service over real HTTP: the ranker's time budget, the token check, body limits,
missing artifacts, and the online state shared through Redis by two workers."""

import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest

from models.business_rules import SERVING_ITEMS
from models.recommender import FALLBACK_CANDIDATE_ORDER, FALLBACK_POPULAR
from shelfwise.lake import SERVING_CANDIDATES, SERVING_NEIGHBOURS, Lake
from tests.support import copy_state, processes_serving, served_copy, served_from_source

TOKEN = "s3cret-token"


def known_user(settings) -> str:
    return Lake(settings.lake_url).read_frame(SERVING_CANDIDATES).get_column("user_id").min()


def view(user_id: str, item_id: str) -> dict:
    return {
        "event_id": uuid.uuid4().hex,
        "user_id": user_id,
        "item_id": item_id,
        "event_type": "view",
    }


@pytest.fixture(scope="module")
def guarded(pipeline_run, tmp_path_factory):
    """A server with a token, a small body limit, a ranker budget no prediction can meet and a
    category cap."""
    assert pipeline_run.result.success, pipeline_run.failures
    env = {
        "SHELFWISE_MAX_PER_CATEGORY": "2",
        "SHELFWISE_API_TOKEN": TOKEN,
        "SHELFWISE_MAX_BODY_BYTES": "4096",
        "SHELFWISE_RANKER_BUDGET_MS": "0.001",
    }
    folder = tmp_path_factory.mktemp("guarded")
    with served_copy(pipeline_run.settings, folder, env) as served:
        yield served


def test_a_late_ranker_serves_the_candidate_order_not_an_error(guarded):
    url, settings = guarded
    user = known_user(settings)
    # A session item: the request is re-ranked, not answered from the user's ranked list.
    item = Lake(settings.lake_url).read_frame(SERVING_ITEMS).get_column("item_id")[0]
    request = {"user_id": user, "context": {"session_item_ids": [item]}}
    response = httpx.post(f"{url}/recommend", json=request, timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert body["fallback_level"] == FALLBACK_CANDIDATE_ORDER
    assert body["strategy"] == "personalized" and len(body["items"]) == 10
    assert body["model_version"] is not None  # the ranker is loaded; it was only too slow
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert 'endpoint="recommend",fallback_level="1",strategy="personalized"' in metrics
    # Without a session its ranked list answers: ranked before, so the ranker's budget is moot.
    listed = httpx.post(f"{url}/recommend", json={"user_id": user}, timeout=10).json()
    assert listed["fallback_level"] == 0 and listed["strategy"] == "personalized"


def test_the_category_cap_holds_over_http(guarded):
    url, settings = guarded
    lake = Lake(settings.lake_url)
    categories = dict(lake.read_frame(SERVING_ITEMS).select("item_id", "category_id").iter_rows())
    for user in lake.read_frame(SERVING_CANDIDATES).get_column("user_id").unique().sort()[:20]:
        body = httpx.post(f"{url}/recommend", json={"user_id": user, "k": 10}, timeout=10).json()
        per_category = Counter(categories[item["item_id"]] for item in body["items"])
        assert len(body["items"]) == 10 and max(per_category.values()) <= 2


def test_writes_need_the_token_reads_do_not(guarded):
    url, settings = guarded
    body = {"events": [view("someone", "i1")]}
    refused = httpx.post(f"{url}/events", json=body, timeout=10)
    assert refused.status_code == 401 and refused.json()["field"] == "Authorization"
    wrong = httpx.post(
        f"{url}/events", json=body, headers={"Authorization": "Bearer nope"}, timeout=10
    )
    assert wrong.status_code == 401
    accepted = httpx.post(
        f"{url}/events", json=body, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10
    )
    assert accepted.status_code == 200 and accepted.json()["accepted"] == 1
    assert httpx.post(f"{url}/recommend", json={"user_id": "x"}, timeout=10).status_code == 200


def test_an_oversized_body_is_refused_before_it_is_read(guarded):
    url, _ = guarded
    big = {"user_id": "x", "filters": {"exclude_item_ids": ["i" * 50] * 200}}
    response = httpx.post(f"{url}/recommend", json=big, timeout=10)
    assert response.status_code == 413 and response.json()["field"] == "body"


def test_missing_serving_artifacts_still_serve_popular_items(pipeline_run, tmp_path):
    assert pipeline_run.result.success, pipeline_run.failures
    settings = copy_state(pipeline_run.settings, tmp_path)
    for artifact in ("candidate_features.parquet", "neighbours.parquet", "items.parquet"):
        (Path(settings.lake_url) / "serving" / artifact).unlink()
    with served_from_source(settings, tmp_path) as url:
        response = httpx.post(f"{url}/recommend", json={"user_id": "u1", "k": 5}, timeout=10)
        assert response.status_code == 200
        body = response.json()
        assert body["fallback_level"] == FALLBACK_POPULAR and len(body["items"]) == 5
        similar = httpx.post(f"{url}/similar", json={"item_id": "i1"}, timeout=10)
        assert similar.status_code == 200 and similar.json()["strategy"] == "popular"


def test_two_workers_share_the_online_state_through_redis(pipeline_run, tmp_path, redis_url):
    assert pipeline_run.result.success, pipeline_run.failures
    env = {
        "SHELFWISE_REDIS_URL": redis_url,
        "BENTOML_CONFIG_OPTIONS": "services.shelfwise.workers=2",
    }
    with served_copy(pipeline_run.settings, tmp_path, env) as (url, settings):
        assert len(processes_serving(settings, b"_bentoml_impl.worker")) == 2
        visitor = f"new-{uuid.uuid4().hex}"
        item = Lake(settings.lake_url).read_frame(SERVING_NEIGHBOURS)["item_id"][0]
        response = httpx.post(f"{url}/events", json={"events": [view(visitor, item)]}, timeout=10)
        assert response.json()["accepted"] == 1
        # Fresh connections, so the kernel spreads them over both workers: all see the view.
        strategies = {
            httpx.post(f"{url}/recommend", json={"user_id": visitor}, timeout=10).json()["strategy"]
            for _ in range(30)
        }
        assert strategies == {"session"}
