"""The online store in Redis: versions, the pointer switch, and exact parity with the serving
snapshot held in process (a real Redis server, the session's real pipeline lake)."""

import dataclasses
import random

import numpy as np
import polars as pl
import pytest
import redis

from models.business_rules import RequestFilters
from models.features import FEATURE_COLUMNS
from models.neighbour_arrays import neighbour_arrays
from models.online_store import (
    OnlineStoreError,
    RedisCandidateStore,
    current_version,
    load_version,
    snapshot_states,
    write_from_lake,
    write_version,
)
from models.ranker import booster_from_text
from models.recommender import FALLBACK_POPULAR, Recommender
from models.segments import SegmentPolicy
from models.session import Session
from models.snapshot import CandidateSnapshot, read_user_states
from shelfwise.lake import (
    SERVING_CANDIDATES,
    SERVING_ITEMS,
    SERVING_NEIGHBOURS,
    SERVING_POPULAR,
    SERVING_PURCHASES,
    SERVING_STATE_DICTIONARY,
)
from shelfwise.runtime import store_keys as keys
from shelfwise.runtime.online_state import StockChange
from shelfwise.runtime.registry import production_path, read_ranker
from tests.support import free_port


@pytest.fixture(scope="module")
def client(redis_url):
    """A database of the session's Redis of this module's own."""
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/5")
    client.flushdb()
    yield client
    client.flushdb()


@pytest.fixture(scope="module")
def ranker(pipeline_run):
    assert pipeline_run.result.success, pipeline_run.failures
    text, info = read_ranker(production_path(pipeline_run.settings.bentoml_home))
    return booster_from_text(text), info["features"], info.get("segment_policy")


def test_without_redis_the_asset_is_a_no_op(pipeline_run):
    assert pipeline_run.result.success, pipeline_run.failures
    [materialization] = pipeline_run.result.asset_materializations_for_node("online_store")
    assert materialization.metadata["mode"].value == "embedded mode"


def test_the_redis_path_answers_exactly_as_the_snapshot_in_process(pipeline_run, client, ranker):
    """Same lake, same ranker: the same items, scores, sources, strategies and fallback levels
    for known and unknown users, with and without a session, purchases and stock changes."""
    booster, features, policy = ranker
    policy = SegmentPolicy.from_dict(policy)
    lake = pipeline_run.lake
    written = write_from_lake(client, lake)
    assert current_version(client) == written.version
    embedded = Recommender.from_lake(lake, booster, features, 2, None, policy)
    version = load_version(client, written.version)
    online = Recommender.from_online_store(version, booster, features, 2, None, policy)
    assert online.known_users == embedded.known_users > 100
    # The service reads a user's candidates in the online state's round trip: a store whose
    # Redis is gone must then answer alike, as it never reads again.
    store = version.store
    gone = redis.Redis(port=free_port(), socket_connect_timeout=0.5)
    prefetched = Recommender.from_online_store(
        dataclasses.replace(
            version,
            store=RedisCandidateStore(
                gone, store.version, store.table, store.known_users, store.snapshot_id
            ),
        ),
        booster,
        features,
        2,
        None,
        policy,
    )

    users = sorted(lake.read_frame(SERVING_CANDIDATES, ["user_id"])["user_id"].unique())
    buyers = sorted(lake.read_frame(SERVING_PURCHASES)["user_id"].unique())
    items = lake.read_frame(SERVING_NEIGHBOURS)["item_id"].unique().sort().to_list()
    rng = random.Random(5)
    requests = [(user, Session()) for user in rng.sample(users, 200)]
    requests += [(f"unknown-{n}", Session()) for n in range(40)]
    # Buyers without candidates (if any) have purchases but no list: the rules still apply.
    requests += [(user, Session()) for user in sorted(set(buyers) - set(users))[:20]]
    for n in range(60):
        user = rng.choice(users) if n % 2 else f"visitor-{n}"
        viewed = tuple(rng.sample(items, 3))
        requests.append((user, Session(viewed, frozenset(viewed[:1]), frozenset(viewed[1:2]))))
    stock = {items[0]: StockChange(False, 2**62), items[1]: StockChange(True, 2**62)}
    for user, session in requests:
        for filters, changes in ((None, None), (RequestFilters(price_max=50.0), stock)):
            expected = embedded.recommend(user, 10, filters, session, None, changes)
            got = online.recommend(user, 10, filters, session, None, changes)
            assert got == expected, user
            value = client.get(online.candidates_key(user))
            assert (
                prefetched.recommend(
                    user,
                    10,
                    filters,
                    session,
                    None,
                    changes,
                    candidates_value=value,
                    candidates_fetched=True,
                )
                == expected
            ), user
    # Without the value read with the online state, that store degrades (its Redis is gone).
    assert prefetched.recommend(users[0], 10).fallback_level == FALLBACK_POPULAR
    assert any(r.strategy == "personalized" for r in [online.recommend(u, 5) for u in users[:20]])


def test_versions_switch_whole_and_old_ones_are_removed_after_the_next_switch(pipeline_run, client):
    lake = pipeline_run.lake
    first = write_from_lake(client, lake)
    held = load_version(client, first.version)
    user = sorted(held.store.client.scan_iter(match=keys.version_prefix(first.version) + "u:*"))[0]
    user_id = user.decode().split("{", 1)[1].rstrip("}")
    second = write_from_lake(client, lake)
    assert second.previous == first.version and current_version(client) == second.version
    # The replaced version stays whole: a worker that has not polled yet still reads it.
    assert held.store.candidates_of(user_id) is not None
    third = write_from_lake(client, lake)
    assert first.version in third.removed
    assert not list(client.scan_iter(match=keys.version_prefix(first.version) + "*"))
    assert client.exists(keys.meta_key(second.version), keys.meta_key(third.version)) == 2
    assert {int(v) for v in client.smembers(keys.VERSIONS)} == {second.version, third.version}


def test_an_unreachable_redis_degrades_to_popular_items_not_an_error(pipeline_run, client):
    version = load_version(client, write_from_lake(client, pipeline_run.lake).version)
    recommender = Recommender.from_online_store(version, None)
    user = sorted(pipeline_run.lake.read_frame(SERVING_CANDIDATES, ["user_id"])["user_id"])[0]
    assert recommender.recommend(user, 5).fallback_level != FALLBACK_POPULAR
    # The worker's client now points at a port nothing listens on.
    version.store.client = redis.Redis(port=free_port(), socket_connect_timeout=1)
    answer = recommender.recommend(user, 5)
    assert answer.fallback_level == FALLBACK_POPULAR and answer.strategy == "popular"
    assert len(answer.items) == 5
    assert recommender.recommend("someone", 3).items  # unknown users too


def test_an_incomplete_version_is_refused(client):
    with pytest.raises(OnlineStoreError):
        load_version(client, 10_000)


def same_candidates(a, b) -> bool:
    return (
        a.item_ids.tolist() == b.item_ids.tolist()
        and np.array_equal(a.ranks, b.ranks)
        and bool(((a.matrix == b.matrix) | (np.isnan(a.matrix) & np.isnan(b.matrix))).all())
        and a.bought == b.bought
    )


def test_a_version_holds_the_lakes_dictionary_and_decodes_every_user_as_the_lake(
    pipeline_run, client
):
    """The values are compressed with the dictionary trained for the snapshot: a version holds
    it as a shared part beside the lake's very bytes, and a worker reading Redis decodes every
    user as one reading the lake."""
    lake = pipeline_run.lake
    dictionary = lake.read_bytes(SERVING_STATE_DICTIONARY)
    assert dictionary
    written = write_from_lake(client, lake)
    assert client.get(keys.shared_key(written.version, keys.SHARED_DICTIONARY)) == dictionary
    version = load_version(client, written.version)
    in_process = read_user_states(lake)
    assert written.users == len(in_process.states) > 100
    for user_id, value in in_process.states.items():
        assert client.get(keys.user_key(written.version, user_id)) == value
        online = version.store.candidates_of(user_id)
        assert same_candidates(online, in_process.candidates_of(user_id)), user_id


def test_a_tiny_shop_without_a_dictionary_is_served_from_redis(pipeline_run, client):
    """Two users are too few values to train a dictionary on: the version holds an empty one
    (a part present, not missing) and its users decode to their rows."""
    lake = pipeline_run.lake
    rows = lake.read_frame(SERVING_CANDIDATES)
    two = rows["user_id"].unique(maintain_order=True).head(2).to_list()
    snapshot = CandidateSnapshot.from_frame(rows.filter(pl.col("user_id").is_in(two)))
    assert snapshot.table.codec.dictionary == b""
    written = write_version(
        client,
        snapshot.table,
        snapshot_states(snapshot),
        popular=lake.read_frame(SERVING_POPULAR),
        neighbours=neighbour_arrays(snapshot.table, lake.read_frame(SERVING_NEIGHBOURS)),
        facts=lake.read_frame(SERVING_ITEMS),
        columns=FEATURE_COLUMNS,
    )
    assert written.users == written.known_users == 2
    version = load_version(client, written.version)
    for user_id in two:
        online = version.store.candidates_of(user_id)
        assert same_candidates(online, snapshot.candidates_of(user_id)), user_id
        expected = rows.filter(user_id=user_id).sort("candidate_rank")
        assert online.item_ids.tolist() == expected["item_id"].to_list()
