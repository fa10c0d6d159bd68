"""Real-time serving over real HTTP: events change the next answer, the cold-start ladder, /similar
and the /events contract. The server runs from source on a copy of the pipeline's state."""

import itertools
import uuid
from datetime import UTC, datetime, timedelta

import httpx
import numpy as np
import polars as pl
import pytest

from models.business_rules import SERVING_ITEMS
from models.features import FEATURE_COLUMNS
from models.recommender import _apply_session_purchases
from models.session import Session
from shelfwise.lake import SERVING_CANDIDATES, SERVING_NEIGHBOURS, Lake
from tests.support import served_copy

_ids = itertools.count()


@pytest.fixture(scope="module")
def realtime(pipeline_run, tmp_path_factory):
    assert pipeline_run.result.success, pipeline_run.failures
    with served_copy(pipeline_run.settings, tmp_path_factory.mktemp("realtime")) as served:
        yield served


@pytest.fixture(scope="module")
def shop(realtime):
    """The serving snapshot's facts the tests choose their users and items from."""
    lake = Lake(realtime[1].lake_url)
    return {
        "candidates": lake.read_frame(SERVING_CANDIDATES),
        "neighbours": lake.read_frame(SERVING_NEIGHBOURS),
        "items": lake.read_frame(SERVING_ITEMS),
    }


def users(shop, n: int) -> list[str]:
    """Known users, a different slice for every call (tests must not share a user's state)."""
    known = shop["candidates"].get_column("user_id").unique().sort().to_list()
    start = next(_ids) * n
    return known[start : start + n]


def post(url: str, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=10, **kwargs)


def recommend(url: str, user_id: str, k: int = 10, **body) -> dict:
    response = post(url, "/recommend", {"user_id": user_id, "k": k, **body})
    assert response.status_code == 200, response.text
    return response.json()


def event(user_id: str, item_id: str, event_type: str = "view", **fields) -> dict:
    return {
        "event_id": uuid.uuid4().hex,
        "user_id": user_id,
        "item_id": item_id,
        "event_type": event_type,
        **fields,
    }


def item_ids(answer: dict) -> list[str]:
    return [item["item_id"] for item in answer["items"]]


def covisit_neighbours(shop, item_id: str) -> set[str]:
    frame = shop["neighbours"].filter(
        (pl.col("kind") == "covisit") & (pl.col("item_id") == item_id)
    )
    return set(frame.get_column("neighbour_item_id"))


def neighbours_of(shop, item_id: str) -> set[str]:
    """The item's neighbours of every kind (co-visitation, bought together, collaborative)."""
    frame = shop["neighbours"].filter(pl.col("item_id") == item_id)
    return set(frame.get_column("neighbour_item_id"))


def in_stock_items_with_neighbours(shop, minimum: int = 5) -> list[str]:
    counts = (
        shop["neighbours"]
        .filter(pl.col("kind") == "covisit")
        .group_by("item_id")
        .len()
        .filter(pl.col("len") >= minimum)
        .join(shop["items"].filter(pl.col("is_in_stock")), on="item_id", how="semi")
        .sort("len", "item_id", descending=[True, False])
    )
    return counts.get_column("item_id").to_list()


def test_a_view_changes_the_next_recommendation(realtime, shop):
    url, _ = realtime
    [user] = users(shop, 1)
    before = recommend(url, user, k=20)
    item = next(i for i in in_stock_items_with_neighbours(shop) if i not in item_ids(before))
    response = post(url, "/events", {"events": [event(user, item)]})
    assert response.status_code == 200 and response.json()["accepted"] == 1
    after = recommend(url, user, k=20)
    assert after["strategy"] == "personalized" and after["fallback_level"] == 0
    assert item_ids(after) != item_ids(before)
    # The viewed item and its co-visitation neighbours now compete for the list.
    assert set(item_ids(after)) & (covisit_neighbours(shop, item) | {item})


def test_a_purchase_removes_the_item_unless_its_category_is_repeatable(realtime, shop):
    url, _ = realtime
    repeatable = set(shop["items"].filter(pl.col("is_repeatable")).get_column("item_id"))
    for user in users(shop, 40):
        top = [i for i in item_ids(recommend(url, user)) if i not in repeatable]
        if top:
            break
    else:
        pytest.fail("no user has a non-repeatable item in their list")
    bought = top[0]
    response = post(url, "/events", {"events": [event(user, bought, "purchase", price=9.5)]})
    assert response.json()["accepted"] == 1
    after = recommend(url, user)
    assert bought not in item_ids(after)
    assert len(item_ids(after)) == 10


def test_a_stock_update_hides_the_item_for_everyone(realtime, shop):
    url, _ = realtime
    [user] = users(shop, 1)
    first = item_ids(recommend(url, user))[0]
    # The snapshot's stock is as of its catalog delivery; the update is newer, so it wins.
    [catalog_at] = shop["items"].filter(pl.col("item_id") == first)["stock_updated_at"]
    assert catalog_at < datetime.now(UTC)
    response = post(url, "/events", {"stock": [{"item_id": first, "is_in_stock": False}]})
    assert response.status_code == 200 and response.json()["stock_updates"] == 1
    assert first not in item_ids(recommend(url, user))
    # The request may still ask for items out of stock.
    with_sold_out = recommend(url, user, filters={"in_stock_only": False})
    assert first in item_ids(with_sold_out)


def test_of_dated_stock_updates_the_newest_wins(realtime, shop):
    url, _ = realtime
    [user] = users(shop, 1)
    item = item_ids(recommend(url, user))[0]
    [catalog_at] = shop["items"].filter(pl.col("item_id") == item)["stock_updated_at"]

    def update(in_stock: bool, at: datetime) -> None:
        body = {"stock": [{"item_id": item, "is_in_stock": in_stock, "updated_at": at.isoformat()}]}
        response = post(url, "/events", body)
        assert response.status_code == 200 and response.json()["stock_updates"] == 1

    # Older than the catalog's stock: the catalog is the newer word, the item stays.
    update(False, catalog_at - timedelta(days=1))
    assert item in item_ids(recommend(url, user))
    # A sell-out after it hides the item; a late restock dated before the sell-out does not undo it.
    now = datetime.now(UTC)
    update(False, now - timedelta(seconds=1))
    update(True, now - timedelta(seconds=2))
    assert item not in item_ids(recommend(url, user))
    # A time in the future is refused, naming the field.
    future = {"item_id": item, "is_in_stock": True, "updated_at": "2999-01-01T00:00:00Z"}
    response = post(url, "/events", {"stock": [future]})
    assert response.status_code == 400 and "updated_at" in response.text


def test_the_cold_start_ladder(realtime, shop):
    url, _ = realtime
    [known] = users(shop, 1)
    assert recommend(url, known)["strategy"] == "personalized"

    nobody = f"new-{uuid.uuid4().hex}"
    popular = recommend(url, nobody)
    assert popular["strategy"] == "popular" and popular["fallback_level"] == 0
    assert {item["source"] for item in popular["items"]} == {"popular"}

    # Unknown user, but the page shows an item: its neighbours.
    page_item = in_stock_items_with_neighbours(shop)[0]
    session = recommend(url, f"new-{uuid.uuid4().hex}", context={"item_id": page_item})
    assert session["strategy"] == "session"
    assert page_item not in item_ids(session)
    assert item_ids(session)[0] in neighbours_of(shop, page_item)

    # Unknown user whose only activity came through /events: the same rung.
    visitor = f"new-{uuid.uuid4().hex}"
    post(url, "/events", {"events": [event(visitor, page_item)]})
    assert recommend(url, visitor)["strategy"] == "session"

    # A new item nobody co-visited yet: what trends in its category.
    with_neighbours = set(shop["neighbours"].get_column("item_id"))
    new_items = shop["items"].filter(~pl.col("item_id").is_in(list(with_neighbours)))
    assert new_items.height, "the test shop has no item without neighbours"
    new_item, category = new_items.select("item_id", "category_id").row(0)
    trending = recommend(url, f"new-{uuid.uuid4().hex}", context={"item_id": new_item})
    assert trending["strategy"] == "category_trending"
    first = trending["items"][0]
    assert first["source"] == "trending"
    categories = dict(shop["items"].select("item_id", "category_id").iter_rows())
    assert categories[first["item_id"]] == category


def test_similar_items_come_from_neighbours_then_content(realtime, shop):
    url, _ = realtime
    item = in_stock_items_with_neighbours(shop)[0]
    response = post(url, "/similar", {"item_id": item, "k": 5})
    assert response.status_code == 200
    body = response.json()
    assert body["strategy"] == "neighbours" and len(body["items"]) == 5
    assert item not in item_ids(body)
    assert item_ids(body)[0] in neighbours_of(shop, item)
    assert {i["source"] for i in body["items"]} <= {
        "covisit",
        "bought_together",
        "collaborative",
        "content",
    }

    with_neighbours = set(shop["neighbours"].get_column("item_id"))
    new_item, category = (
        shop["items"]
        .filter(~pl.col("item_id").is_in(list(with_neighbours)))
        .select("item_id", "category_id")
        .row(0)
    )
    content = post(url, "/similar", {"item_id": new_item, "k": 3}).json()
    assert content["strategy"] == "content"
    categories = dict(shop["items"].select("item_id", "category_id").iter_rows())
    assert {categories[i] for i in item_ids(content)} == {category}

    unknown = post(url, "/similar", {"item_id": "no-such-item", "k": 3}).json()
    assert unknown["strategy"] == "popular" and len(unknown["items"]) == 3


def test_events_are_validated_one_by_one(realtime, shop):
    url, _ = realtime
    [user] = users(shop, 1)
    item = in_stock_items_with_neighbours(shop)[0]
    future = (datetime.now(UTC) + timedelta(days=2)).isoformat()
    batch = [
        event(user, item),
        event(user, item, "teleport"),
        event(user, item, "purchase", price=-1),
        event(user, item, occurred_at=future),
        {"user_id": user, "event_type": "view"},
    ]
    response = post(url, "/events", {"events": batch})
    assert response.status_code == 200
    body = response.json()
    assert body["accepted"] == 1 and body["duplicates"] == 0
    assert [(r["index"], r["field"]) for r in body["rejected"]] == [
        (1, "event_type"),
        (2, "price"),
        (3, "occurred_at"),
        (4, "item_id"),
    ]
    # Sent again (an at-least-once client): the valid event is recognised, not added twice.
    again = post(url, "/events", {"events": batch[:1]}).json()
    assert again["accepted"] == 0 and again["duplicates"] == 1


def test_an_events_batch_with_nothing_valid_is_a_4xx(realtime, shop):
    url, _ = realtime
    response = post(url, "/events", {"events": [{"user_id": "u1"}]})
    assert response.status_code == 400
    assert response.json()["rejected"][0]["field"] in {"item_id", "event_type"}


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"events": [{}] * 1001}, "events"),
        ({"events": "not a list"}, "events"),
        ({"stock": [{"item_id": "i1"}]}, "is_in_stock"),
    ],
)
def test_malformed_events_requests_get_a_4xx_naming_the_field(realtime, body, field):
    url, _ = realtime
    response = post(url, "/events", body)
    assert 400 <= response.status_code < 500
    assert field in response.text


def test_context_and_k_limits_are_enforced(realtime):
    url, _ = realtime
    too_many = {"user_id": "u", "context": {"session_item_ids": [str(n) for n in range(51)]}}
    response = post(url, "/recommend", too_many)
    assert response.status_code == 400 and "session_item_ids" in response.text
    response = post(url, "/similar", {"item_id": "i1", "k": 101})
    assert response.status_code == 400 and "k" in response.text


def test_metrics_count_strategies_and_fallbacks_and_name_the_model(realtime):
    url, _ = realtime
    recommend(url, f"new-{uuid.uuid4().hex}")
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert (
        'shelfwise_responses_total{endpoint="recommend",fallback_level="0",strategy="popular"}'
        in (metrics)
    )
    assert "shelfwise_model_info{model_version=" in metrics
    assert 'bentoml_service_request_duration_seconds_bucket{endpoint="/recommend"' in metrics


def test_the_page_item_is_not_recommended_on_its_own_page(realtime, shop):
    url, _ = realtime
    [user] = users(shop, 1)
    top = item_ids(recommend(url, user))[0]
    on_its_page = recommend(url, user, context={"item_id": top})
    assert on_its_page["strategy"] == "personalized"
    assert top not in item_ids(on_its_page) and len(on_its_page["items"]) == 10


def test_a_purchase_in_the_session_updates_the_pairs_repeat_features():
    """A purchase since the snapshot is one more occasion at age 0: the item no longer looks due."""
    col = {name: n for n, name in enumerate(FEATURE_COLUMNS)}
    rows = np.full((3, len(FEATURE_COLUMNS)), np.nan, dtype=np.float32)
    # "again": bought on 2 occasions 20 days apart, last 30 days ago (due ratio 1.5).
    # "first": never bought, the item's median gap is 10 days. "other": not bought in the session.
    for n, (purchases, occasions, last, own, item_gap) in enumerate(
        [(3, 2, 30.0, 20.0, 12.0), (np.nan, 0, np.nan, np.nan, 10.0), (1, 1, 8.0, np.nan, np.nan)]
    ):
        rows[n, col["user_item_purchases"]] = purchases
        rows[n, col["user_item_purchases_decayed_30d"]] = 0.5 if n == 0 else np.nan
        rows[n, col["user_item_purchase_occasions"]] = occasions
        rows[n, col["user_item_days_since_last_purchase"]] = last
        rows[n, col["user_item_own_repurchase_interval_days"]] = own
        rows[n, col["item_repurchase_interval_days"]] = item_gap
        rows[n, col["user_item_repurchase_due_ratio"]] = last / own if own == own else np.nan
        # "again": in 2 of the 4 baskets since its first purchase.
        rows[n, col["user_item_purchase_basket_share"]] = 0.5 if n == 0 else np.nan
    before = rows.copy()
    session = Session(("first",), frozenset(), frozenset({"again", "first"}))
    _apply_session_purchases(
        rows, np.array(["again", "first", "other"], dtype=object), session, col
    )

    again, first, other = rows
    assert (
        again[col["user_item_purchases"]] == 4 and again[col["user_item_purchase_occasions"]] == 3
    )
    assert again[col["user_item_purchases_decayed_30d"]] == pytest.approx(1.5)
    assert again[col["user_item_own_repurchase_interval_days"]] == pytest.approx(25.0)
    assert again[col["user_item_days_since_last_purchase"]] == 0.0
    assert again[col["user_item_repurchase_due_ratio"]] == 0.0
    assert again[col["user_item_purchase_basket_share"]] == pytest.approx(3 / 5)
    assert first[col["user_item_purchase_basket_share"]] == 1.0
    assert (
        first[col["user_item_purchases"]] == 1 and first[col["user_item_purchase_occasions"]] == 1
    )
    assert np.isnan(first[col["user_item_own_repurchase_interval_days"]])
    assert first[col["user_item_repurchase_due_ratio"]] == 0.0  # the item's own gap is known
    np.testing.assert_array_equal(other, before[2])
