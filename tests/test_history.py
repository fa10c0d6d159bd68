"""`POST /history`: a user's recent history from the live session and the serving snapshot.

`models.history.user_history` on hand-made user states, then the endpoint over real HTTP on a copy
of the pipeline's state: the snapshot's recent items as the candidates record them, a session
posted to `/events` in front, validation, and the token."""

import math
import uuid

import httpx
import numpy as np
import polars as pl
import pytest

from models.business_rules import SERVING_ITEMS, ItemFacts
from models.features import FEATURE_COLUMNS
from models.history import user_history
from models.online_store import load_version, write_from_lake
from models.recommender import Recommender
from models.session import Session
from models.user_state import UserCandidates
from shelfwise.lake import SERVING_CANDIDATES, SERVING_PURCHASES, Lake
from tests.support import served_copy

COLUMN = {name: n for n, name in enumerate(FEATURE_COLUMNS)}
TOKEN = "history-token"


def candidates(rows: dict[str, dict[str, float]], bought: frozenset[str] = frozenset()):
    """A user's snapshot state: the given features per candidate, NaN elsewhere."""
    matrix = np.full((len(rows), len(FEATURE_COLUMNS)), np.nan, np.float32)
    for n, features in enumerate(rows.values()):
        for name, value in features.items():
            matrix[n, COLUMN[name]] = value
    ids = np.array(list(rows), dtype=object)
    return UserCandidates(matrix, ids, np.arange(1, len(rows) + 1), 10.0, bought)


FACTS = {
    "i1": ItemFacts("c1", 9.5, True, False),
    "i2": ItemFacts("c2", float("nan"), True, False),
    "i9": ItemFacts("c9", 1.0, True, True),
}


def test_the_session_comes_first_then_the_snapshot_by_recency():
    state = candidates(
        {
            # A neighbour the user never touched: not history.
            "n1": {"covisit_score": 0.5, "history_score": 0.0},
            "i1": {"history_score": 0.5, "user_item_views": 3, "user_item_days_since_last": 4},
            "i2": {"history_score": 1.0, "user_item_carts": 1, "user_item_days_since_last": 1},
            # Bought long ago, outside the recent items, proposed again by buy_again.
            "i3": {
                "buy_again_score": 0.2,
                "user_item_purchases": 2,
                "user_item_days_since_last": 30,
            },
            # One of the recent items whose counts are all zero.
            "i4": {"history_score": 1 / 3, "user_item_days_since_last": 4},
        },
        bought=frozenset({"i3", "old"}),
    )
    session = Session(("i9", "i1"), carted_ids=frozenset({"i1"}), purchased_ids=frozenset({"p"}))
    found = user_history(state, session, FACTS, limit=50)
    assert found.known
    rows = [(e.item_id, e.event, e.live, e.days_before_snapshot) for e in found.entries]
    assert rows == [
        ("i9", "view", True, None),
        ("i1", "cart", True, None),
        ("p", "purchase", True, None),
        ("i2", "cart", False, 1.0),
        # Same age: the recency rank decides (i1 is the 2nd most recent item, i4 the 3rd).
        ("i1", "view", False, 4.0),
        ("i4", "history", False, 4.0),
        ("i3", "purchase", False, 30.0),
        ("old", "purchase", False, None),  # bought, no longer a candidate: no date
    ]
    facts = {e.item_id: (e.category_id, e.price) for e in found.entries}
    assert facts["i1"] == ("c1", 9.5)
    assert facts["i2"] == ("c2", None)  # an unknown price is null, not NaN
    assert facts["p"] == (None, None)  # not in the catalog facts
    assert [e.item_id for e in user_history(state, session, FACTS, 4).entries] == [
        "i9",
        "i1",
        "p",
        "i2",
    ]


def test_an_unknown_user_has_only_the_session():
    found = user_history(None, Session(("i1",)), FACTS, limit=20)
    assert not found.known
    assert [(e.item_id, e.event, e.live) for e in found.entries] == [("i1", "view", True)]
    assert user_history(None, Session(), FACTS, limit=20).entries == []


def test_a_purchase_in_the_session_is_a_purchase_even_when_viewed():
    session = Session(("i1",), carted_ids=frozenset(), purchased_ids=frozenset({"i1"}))
    [entry] = user_history(None, session, FACTS, limit=20).entries
    assert (entry.item_id, entry.event, entry.live) == ("i1", "purchase", True)


def test_the_history_is_the_same_from_redis_as_in_process(pipeline_run, redis_url):
    """The online store's users' states (Redis) hold what the lake's snapshot does."""
    import redis

    assert pipeline_run.result.success, pipeline_run.failures
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/6")
    client.flushdb()
    try:
        lake = pipeline_run.lake
        version = load_version(client, write_from_lake(client, lake).version)
        embedded = Recommender.from_lake(lake, None)
        online = Recommender.from_online_store(version, None)
        users = sorted(lake.read_frame(SERVING_CANDIDATES, ["user_id"])["user_id"].unique())
        buyers = sorted(lake.read_frame(SERVING_PURCHASES)["user_id"].unique())
        session = Session(("i1", "i2"), frozenset({"i2"}), frozenset({"i3"}))
        histories = 0
        for user in [*users[:150], *sorted(set(buyers) - set(users))[:20], "nobody"]:
            for live in (Session(), session):
                expected = embedded.history(user, live, 100)
                assert online.history(user, live, 100) == expected, user
                histories += any(not entry.live for entry in expected.entries)
        assert histories > 100
    finally:
        client.flushdb()


@pytest.fixture(scope="module")
def served(pipeline_run, tmp_path_factory):
    assert pipeline_run.result.success, pipeline_run.failures
    folder = tmp_path_factory.mktemp("history")
    with served_copy(pipeline_run.settings, folder, {"SHELFWISE_API_TOKEN": TOKEN}) as served:
        yield served


def history(url: str, body: dict, token: str | None = TOKEN) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{url}/history", json=body, headers=headers, timeout=10)


def test_a_known_users_history_is_what_the_snapshot_records(served):
    url, settings = served
    lake = Lake(settings.lake_url)
    snapshot = lake.read_frame(SERVING_CANDIDATES)
    user = (
        snapshot.filter(pl.col("history_score") > 0)
        .group_by("user_id")
        .len()
        .sort("len", "user_id", descending=[True, False])
        .get_column("user_id")[0]
    )
    response = history(url, {"user_id": user, "limit": 100})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["user_id"] == user and body["known"] is True and body["complete"] is True
    entries = body["items"]
    assert entries and not any(entry["live"] for entry in entries)
    # Every recent item of the snapshot is there, most recent first.
    recent = (
        snapshot.filter((pl.col("user_id") == user) & (pl.col("history_score") > 0))
        .sort("user_item_days_since_last", pl.col("history_score"), descending=[False, True])
        .get_column("item_id")
        .to_list()
    )
    listed = [entry["item_id"] for entry in entries]
    assert set(recent) <= set(listed)
    assert [item for item in listed if item in set(recent)] == recent
    ages = [e["days_before_snapshot"] for e in entries if e["days_before_snapshot"] is not None]
    assert ages == sorted(ages)
    # Category and price as the catalog facts have them.
    items = lake.read_frame(SERVING_ITEMS).select("item_id", "category_id", "price")
    catalog = {row[0]: row[1:] for row in items.iter_rows()}
    for entry in entries:
        category, price = catalog[entry["item_id"]]
        assert entry["category_id"] == category
        assert entry["price"] == pytest.approx(price) or (price is None or math.isnan(price))


def test_a_session_posted_to_events_comes_first(served):
    url, settings = served
    items = Lake(settings.lake_url).read_frame(SERVING_ITEMS).get_column("item_id").sort()
    first, second, bought = items[0], items[1], items[2]
    user = f"new-{uuid.uuid4().hex[:8]}"
    events = [
        {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item, "event_type": kind}
        for item, kind in [(first, "view"), (second, "add_to_cart"), (bought, "purchase")]
    ]
    posted = httpx.post(
        f"{url}/events",
        json={"events": events},
        headers={"Authorization": f"Bearer {TOKEN}"},
        timeout=10,
    )
    assert posted.status_code == 200 and posted.json()["accepted"] == 3
    body = history(url, {"user_id": user}).json()
    assert body["known"] is False
    assert [(e["item_id"], e["event"], e["live"]) for e in body["items"]] == [
        (second, "cart", True),
        (first, "view", True),
        (bought, "purchase", True),
    ]


def test_history_needs_the_token_and_is_validated(served):
    url, _ = served
    refused = history(url, {"user_id": "u1"}, token=None)
    assert refused.status_code == 401 and refused.json()["field"] == "Authorization"
    for body, field in [
        ({"user_id": "u1", "limit": 0}, "limit"),
        ({"user_id": "u1", "limit": 101}, "limit"),
        ({"user_id": "u1", "limit": True}, "limit"),
        ({"user_id": ""}, "user_id"),
        ({"user_id": "u1", "limits": 5}, "limits"),
        ({}, "user_id"),
    ]:
        answer = history(url, body)
        assert (answer.status_code, answer.json()["field"]) == (400, field), body
    unknown = history(url, {"user_id": "nobody-at-all"})
    assert unknown.status_code == 200
    assert unknown.json() == {
        "user_id": "nobody-at-all",
        "known": False,
        "complete": True,
        "items": [],
    }
