"""The served bento over real HTTP: the response contract and the 4xx cases."""

import httpx
import polars as pl
import pytest

from models.candidates import GENERATORS
from shelfwise.lake import SERVING_CANDIDATES, SERVING_ITEMS, SERVING_POPULAR, SERVING_PURCHASES
from shelfwise.runtime.registry import list_rankers


def recommend(server, body, **kwargs):
    return httpx.post(f"{server.url}/recommend", timeout=10, **({"json": body} | kwargs))


@pytest.fixture(scope="module")
def known_user(pipeline_run):
    snapshot = pipeline_run.lake.read_frame(SERVING_CANDIDATES)
    sizes = snapshot.group_by("user_id").len().sort("len", "user_id", descending=[True, False])
    return sizes.get_column("user_id")[0]


def test_known_user_gets_k_distinct_items_reranked_by_the_ranker(
    bento_server, pipeline_run, known_user
):
    response = recommend(bento_server, {"user_id": known_user, "k": 10})
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "rec_id",
        "items",
        "strategy",
        "fallback_level",
        "model_version",
        "experiment",
        "arm",
    }
    # No experiment runs: production answers, as without experiments.
    assert body["experiment"] is None and body["arm"] is None
    assert all(item["arm"] is None for item in body["items"])
    assert body["fallback_level"] == 0 and len(body["rec_id"]) == 32
    items = body["items"]
    assert len(items) == 10
    assert len({item["item_id"] for item in items}) == 10
    assert all(item["source"] in GENERATORS for item in items)
    scores = [item["score"] for item in items]
    assert scores == sorted(scores, reverse=True)
    assert body["strategy"] == "personalized"
    assert body["model_version"] == list_rankers(pipeline_run.settings.bentoml_home)[0]
    # The items come from the user's own precomputed candidates.
    snapshot = pipeline_run.lake.read_frame(SERVING_CANDIDATES)
    candidates = set(snapshot.filter(pl.col("user_id") == known_user).get_column("item_id"))
    assert {item["item_id"] for item in items} <= candidates


def test_the_ranker_reorders_the_candidate_generators_order(bento_server, pipeline_run):
    snapshot = pipeline_run.lake.read_frame(SERVING_CANDIDATES)
    users = snapshot.get_column("user_id").unique().sort().head(20).to_list()
    reordered = 0
    for user_id in users:
        served = [
            i["item_id"]
            for i in recommend(bento_server, {"user_id": user_id, "k": 10}).json()["items"]
        ]
        generators = (
            snapshot.filter(pl.col("user_id") == user_id)
            .sort("candidate_rank")
            .get_column("item_id")
            .head(10)
            .to_list()
        )
        reordered += served != generators
    assert reordered > 0


def test_unknown_user_gets_popular_items_not_an_error(bento_server, pipeline_run):
    response = recommend(bento_server, {"user_id": "someone-new", "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["strategy"] == "popular"
    popular = pipeline_run.lake.read_frame(SERVING_POPULAR)
    assert [i["item_id"] for i in body["items"]] == popular.get_column("item_id").head(5).to_list()
    assert {i["source"] for i in body["items"]} == {"popular"}


def test_k_defaults_to_ten(bento_server, known_user):
    assert len(recommend(bento_server, {"user_id": known_user}).json()["items"]) == 10


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"k": 10}, "user_id"),
        ({"user_id": 12, "k": 10}, "user_id"),
        ({"user_id": "", "k": 10}, "user_id"),
        ({"user_id": "u1", "k": 0}, "k"),
        ({"user_id": "u1", "k": 101}, "k"),
        ({"user_id": "u1", "k": "ten"}, "k"),
    ],
)
def test_invalid_bodies_get_a_4xx_naming_the_field(bento_server, body, field):
    response = recommend(bento_server, body)
    assert response.status_code == 400
    assert response.json()["field"] == field and response.json()["error"]


def test_a_body_that_is_not_json_gets_a_4xx(bento_server):
    response = recommend(
        bento_server, None, content=b"user_id=u1", headers={"Content-Type": "application/json"}
    )
    assert 400 <= response.status_code < 500
    assert "JSON" in response.text


def test_health_and_metrics_endpoints(bento_server):
    assert httpx.get(f"{bento_server.url}/livez").status_code == 200
    assert httpx.get(f"{bento_server.url}/readyz").status_code == 200
    metrics = httpx.get(f"{bento_server.url}/metrics").text
    assert "bentoml_service_request" in metrics


def test_filters_and_business_rules_hold_over_http(bento_server, pipeline_run):
    lake = pipeline_run.lake
    items = {row["item_id"]: row for row in lake.read_frame(SERVING_ITEMS).iter_rows(named=True)}
    purchases = lake.read_frame(SERVING_PURCHASES)
    buyer = purchases.group_by("user_id").len().sort("len", descending=True)["user_id"][0]
    bought = set(purchases.filter(pl.col("user_id") == buyer)["item_id"])

    plain = recommend(bento_server, {"user_id": buyer, "k": 20}).json()["items"]
    for item in plain:
        facts = items[item["item_id"]]
        assert facts["is_in_stock"]
        assert item["item_id"] not in bought or facts["is_repeatable"]

    category = items[plain[0]["item_id"]]["category_id"]
    price_max = 50.0
    body = {
        "user_id": buyer,
        "k": 10,
        "filters": {
            "category_ids": [category],
            "price_max": price_max,
            "exclude_item_ids": [plain[0]["item_id"]],
        },
    }
    filtered = recommend(bento_server, body).json()["items"]
    assert filtered, "the category has cheap items to show"
    for item in filtered:
        assert items[item["item_id"]]["category_id"] == category
        assert items[item["item_id"]]["price"] <= price_max
        assert item["item_id"] != plain[0]["item_id"]


def test_invalid_filters_get_a_4xx_naming_the_field(bento_server):
    response = recommend(bento_server, {"user_id": "u1", "filters": {"price_max": -1}})
    assert response.status_code == 400
    assert response.json()["field"] == "filters.price_max"
    response = recommend(bento_server, {"user_id": "u1", "filters": {"colour": "red"}})
    assert response.status_code == 400
    assert response.json()["field"] == "filters.colour"
