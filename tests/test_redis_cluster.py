"""Redis Cluster (`SHELFWISE_REDIS_CLUSTER=true`) on a real cluster of three primaries: the
pipeline's writes spread over every node and read back exactly as the lake holds them, old
versions and rankings go from every node, the online state works whole (pipelines over several
nodes, the binary read in the state's round trip, the stock script, seen ids), and a real
service on the cluster answers as the lake's does and follows a view and a stock update; a primary
stopped degrades its users' answers, not the others'; with replicas, a live service follows a
replica's promotion without a restart; a user's slot moved to another primary under a live
service changes none of its answers."""

import time
import uuid

import httpx
import numpy as np
import pytest
from redis.cluster import key_slot

from models.online_store import (
    current_version,
    load_version,
    open_client,
    ranked_info,
    write_from_lake,
    write_ranked_from_lake,
)
from models.recommender import FALLBACK_POPULAR, Recommender
from models.snapshot import CandidateSnapshot
from shelfwise.lake import SERVING_NEIGHBOURS
from shelfwise.runtime import store_keys as keys
from shelfwise.runtime.online_state import RedisState, StockChange, open_state
from tests.support import cluster_ready, redis_cluster, served_copy

CLUSTER_ENV = {"SHELFWISE_REDIS_CLUSTER": "true"}


@pytest.fixture(scope="module")
def cluster(redis_cluster_url):
    """The session's cluster, emptied for this module, through the online store's client."""
    client = open_client(redis_cluster_url, cluster=True)
    client.flushall()  # every primary
    yield client
    client.flushall()


@pytest.fixture(scope="module")
def held(pipeline_run) -> CandidateSnapshot:
    """The lake's serving snapshot as a worker without Redis holds it."""
    assert pipeline_run.result.success, pipeline_run.failures
    return Recommender.from_lake(pipeline_run.lake, None).store


def keys_per_node(client, pattern: str) -> dict[str, int]:
    """How many keys matching `pattern` each primary holds (asked of each node alone)."""
    return {
        node.name: sum(1 for _ in node.redis_connection.scan_iter(match=pattern, count=1000))
        for node in client.get_primaries()
    }


def assert_same_candidates(got, expected) -> None:
    assert (got is None) == (expected is None)
    if expected is None:
        return
    np.testing.assert_array_equal(got.matrix, expected.matrix)  # NaN equals NaN here
    np.testing.assert_array_equal(got.item_ids, expected.item_ids)
    np.testing.assert_array_equal(got.ranks, expected.ranks)
    assert (got.events, got.bought) == (expected.events, expected.bought)


def test_the_online_store_spreads_over_every_node_and_reads_back_as_the_lake(
    pipeline_run, cluster, held
):
    lake = pipeline_run.lake
    assert len(cluster.get_primaries()) == 3
    first = write_from_lake(cluster, lake)
    version, ranking = write_ranked_from_lake(cluster, lake)
    assert version == first.version == current_version(cluster) and ranking is not None

    # Each user's keys sit in the slot of its hash tag: spread over all three nodes.
    users = keys_per_node(cluster, keys.version_prefix(first.version) + "u:*")
    assert sum(users.values()) == first.users and min(users.values()) > first.users / 6, users
    lists = keys_per_node(cluster, keys.ranking_prefix(first.version, ranking.ranking) + "*")
    with_list = sum(1 for row in range(len(held.states)) if held.ranked.at(row))
    assert sum(lists.values()) == with_list and min(lists.values()) > 0, lists

    served = load_version(cluster, first.version)
    store = served.store
    assert store.ranked_lists == ranking == ranked_info(cluster, first.version)
    assert store.known_users == held.known_users > 100
    assert store.snapshot_id == held.snapshot_id
    np.testing.assert_array_equal(store.table.ids, held.table.ids)
    for user_id in list(held.states) + ["nobody-at-all"]:
        assert_same_candidates(store.candidates_of(user_id), held.candidates_of(user_id))
        assert store.ranked_of(user_id) == held.ranked_of(user_id), user_id

    # A new ranking replaces the old one on every node.
    _, again = write_ranked_from_lake(cluster, lake)
    assert again.ranking == ranking.ranking + 1
    gone = keys_per_node(cluster, keys.ranking_prefix(first.version, ranking.ranking) + "*")
    assert set(gone.values()) == {0}

    # The second switch after it removes its keys from every node; the two newest stay whole.
    second = write_from_lake(cluster, lake)
    assert second.previous == first.version and not second.removed
    third = write_from_lake(cluster, lake)
    assert third.removed == [first.version]
    assert set(keys_per_node(cluster, keys.version_prefix(first.version) + "*").values()) == {0}
    for kept in (second.version, third.version):
        assert sum(keys_per_node(cluster, keys.version_prefix(kept) + "u:*").values()) == (
            first.users
        )
    assert {int(v) for v in cluster.smembers(keys.VERSIONS)} == {second.version, third.version}


def test_the_online_state_works_whole_on_the_cluster(redis_cluster_url, cluster):
    state = open_state(redis_cluster_url, cluster=True)
    other = open_state(redis_cluster_url, cluster=True)  # another worker
    user = f"shopper-{uuid.uuid4().hex}"
    ids = [uuid.uuid4().hex for _ in range(5)]
    events = [
        {"event_id": ids[0], "user_id": user, "item_id": "i1", "event_type": "view"},
        {"event_id": ids[1], "user_id": user, "item_id": "i2", "event_type": "add_to_cart"},
        {"event_id": ids[2], "user_id": user, "item_id": "i3", "event_type": "add_to_cart"},
        {"event_id": ids[3], "user_id": user, "item_id": "i3", "event_type": "purchase"},
    ]
    assert state.unseen(ids) == [True] * 5
    state.record(events)
    assert state.unseen(ids) == [False] * 4 + [True]
    # A re-sent view is recognised by its id and changes nothing.
    other.record([{**events[0], "item_id": "i9"}])
    activity = other.activity(user)
    assert activity.item_ids == ("i3", "i2", "i1")
    assert (activity.carted_ids, activity.purchased_ids) == ({"i2"}, {"i3"})

    # A user's online state shares the slot of the user's keys in the online store.
    slots = {
        key_slot(key.encode())
        for key in (
            f"shelfwise:session:{{{user}}}",
            f"shelfwise:cart:{{{user}}}",
            f"shelfwise:bought:{{{user}}}",
            keys.user_key(1, user),
            keys.ranked_key(1, 1, user),
        )
    }
    assert len(slots) == 1 and cluster.exists(f"shelfwise:session:{{{user}}}") == 1

    # The stock script: two keys of one slot; the newer change wins in any order.
    late, early = StockChange(False, 2_000), StockChange(True, 1_000)
    item = f"item-{uuid.uuid4().hex}"
    state.update_stock({item: late})
    other.update_stock({item: early})
    _, stock = other.activity_and_stock(user)
    assert stock[item] == late
    state.update_stock({item: StockChange(True, 3_000)})
    assert other.activity_and_stock(user)[1][item] == StockChange(True, 3_000)

    # The binary value read in the state's round trip (NEVER_DECODE through the cluster
    # pipeline), also on another node than the user's, and a missing one.
    binary = bytes(range(256)) * 4
    ranked = keys.ranked_key(1, 1, user)
    elsewhere = next(
        key
        for n in range(100)
        if cluster.get_node_from_key(key := f"sw:test:{n}") != cluster.get_node_from_key(ranked)
    )
    for key in (ranked, elsewhere):
        cluster.set(key, binary)
        activity, stock, value = state.activity_stock_and_value(user, key)
        assert value == binary and activity.item_ids == ("i3", "i2", "i1")
        assert stock[item] == StockChange(True, 3_000)
    assert state.activity_stock_and_value(user, keys.ranked_key(1, 1, "nobody"))[2] is None

    # Seen ids restored in chunks, spread over the nodes.
    restored = [(uuid.uuid4().hex, 0.0) for _ in range(30)]
    now = time.time()
    assert state.remember_seen([(i, now) for i, _ in restored] + [(ids[0], now)]) == 30
    assert other.unseen([i for i, _ in restored]) == [False] * 30
    state.mark_seen_restored(now)
    assert other.seen_restored_through() == now


def test_a_service_on_the_cluster_answers_as_the_lake_and_follows_events(
    pipeline_run, redis_cluster_url, cluster, held, tmp_path
):
    lake = pipeline_run.lake
    written = write_from_lake(cluster, lake)
    assert write_ranked_from_lake(cluster, lake)[1] is not None
    env = {"SHELFWISE_REDIS_URL": redis_cluster_url, **CLUSTER_ENV}
    (tmp_path / "cluster").mkdir()
    (tmp_path / "lake").mkdir()
    with (
        served_copy(pipeline_run.settings, tmp_path / "cluster", env) as (on_cluster, _),
        served_copy(pipeline_run.settings, tmp_path / "lake") as (on_lake, _),
    ):
        log = (tmp_path / "cluster" / "bentoml.log").read_text()
        assert f"from online store version {written.version}, online state in Redis" in log
        users = sorted(held.states)[:20] + ["someone-new"]
        for user in users:
            assert answer(recommend(on_cluster, user)) == answer(recommend(on_lake, user)), user
        assert recommend(on_cluster, users[0])["strategy"] == "personalized"

        # A view changes the next answer (the session in the cluster).
        visitor = f"new-{uuid.uuid4().hex}"
        before = recommend(on_cluster, visitor)
        assert before["strategy"] == "popular"
        item = lake.read_frame(SERVING_NEIGHBOURS)["item_id"][0]
        event = {"event_id": uuid.uuid4().hex, "user_id": visitor, "item_id": item}
        posted = post(on_cluster, {"events": [{**event, "event_type": "view"}]})
        assert posted["accepted"] == 1
        after = recommend(on_cluster, visitor)
        assert after["strategy"] == "session" and answer(after) != answer(before)
        # A stock update (the script on the cluster) hides the item for everyone.
        first = answer(after)[2][0]
        assert (
            post(on_cluster, {"stock": [{"item_id": first, "is_in_stock": False}]})["stock_updates"]
            == 1
        )
        assert first not in answer(recommend(on_cluster, visitor))[2]
        log = (tmp_path / "cluster" / "bentoml.log").read_text()
        assert "unavailable" not in log and "unreachable" not in log and "Traceback" not in log


def test_a_primary_stopped_degrades_its_users_and_serves_the_others(pipeline_run, held, tmp_path):
    """Without a replica to take over: users whose keys were on the stopped node get popular
    items (no error), the others their own list, until the cluster marks the node failed (a
    minute here)."""
    with redis_cluster(tmp_path, node_timeout_ms=60_000) as url:
        client = open_client(url, cluster=True)
        version = load_version(client, write_from_lake(client, pipeline_run.lake).version)
        recommender = Recommender.from_online_store(version, None)
        # A node that does not hold the stock (every state read needs it), so that the online
        # state's users on the other nodes are still read.
        stock_node = client.get_node_from_key("shelfwise:{stock}")
        stopped = next(
            node
            for node in (
                client.get_node_from_key(keys.user_key(version.version, f"any-{n}"))
                for n in range(100)
            )
            if node != stock_node
        )
        state = RedisState(url, cluster=True)
        users = [
            user
            for user in sorted(held.states)[:60]
            if recommender.recommend(user, 5).fallback_level != FALLBACK_POPULAR
        ]
        on_stopped = [
            user
            for user in users
            if client.get_node_from_key(keys.user_key(version.version, user)) == stopped
        ]
        elsewhere = [user for user in users if user not in on_stopped]
        assert on_stopped and elsewhere
        stopped.redis_connection.shutdown(nosave=True)
        for user in elsewhere[:5]:
            assert recommender.recommend(user, 5).fallback_level != FALLBACK_POPULAR
        for user in on_stopped[:5]:
            answer = recommender.recommend(user, 5)
            assert answer.fallback_level == FALLBACK_POPULAR and len(answer.items) == 5
        # Several requests' state read together: a failed pipeline is read again request by
        # request, so only the users on the stopped node lose their session.
        mixed = elsewhere[:3] + on_stopped[:3]
        reads = state.read_requests([(user, ()) for user in mixed])
        assert [isinstance(read, Exception) for read in reads] == [False] * 3 + [True] * 3


def test_a_replica_takes_over_a_stopped_primary_and_the_service_follows(
    pipeline_run, held, tmp_path
):
    """With a replica per primary (`cluster-node-timeout` 1 s): a primary stopped under a live
    service costs its users their own list only until its replica is promoted; then the same
    service, not restarted, answers them as before and writes their sessions to the new
    primary. Every request meanwhile is answered 200."""
    with redis_cluster(tmp_path / "redis", node_timeout_ms=1000, replicas=1) as url:
        client = open_client(url, cluster=True)
        version = write_from_lake(client, pipeline_run.lake).version
        assert write_ranked_from_lake(client, pipeline_run.lake)[1] is not None
        # A primary holding neither the stock nor the version pointer, which every request
        # and the store poll read: only its users' reads fail while it is away.
        busy = {client.get_node_from_key(key).name for key in ("shelfwise:{stock}", keys.CURRENT)}
        stopped = next(node for node in client.get_primaries() if node.name not in busy)
        (tmp_path / "service").mkdir()
        env = {"SHELFWISE_REDIS_URL": url, **CLUSTER_ENV}
        with served_copy(pipeline_run.settings, tmp_path / "service", env) as (service, _):
            on_stopped = {
                user: answer(recommend(service, user))
                for user in sorted(held.states)[:200]
                if client.get_node_from_key(keys.user_key(version, user)) == stopped
            }
            on_stopped = {u: a for u, a in on_stopped.items() if a[0] == "personalized"}
            assert len(on_stopped) >= 3
            users = sorted(on_stopped)[:3]
            # Everything written has reached the replica before its primary goes.
            assert stopped.redis_connection.execute_command("WAIT", 1, 5000) == 1
            stopped.redis_connection.shutdown(nosave=True)

            degraded = {user: recommend(service, user) for user in users}
            assert all(body["items"] for body in degraded.values())
            assert any(answer(degraded[user]) != on_stopped[user] for user in users)
            deadline = time.monotonic() + 30
            while [answer(recommend(service, user)) for user in users] != [
                on_stopped[user] for user in users
            ]:
                assert time.monotonic() < deadline, "the service did not follow the failover"
                time.sleep(0.2)
            client.nodes_manager.initialize()  # this test's client saw no failure: asked anew
            promoted = client.get_node_from_key(keys.user_key(version, users[0]))
            assert promoted.name != stopped.name
            # The failover is over once every live node says so (state ok, every slot served,
            # the 6 nodes known, the stopped one as failed): until then a node may still answer
            # CLUSTERDOWN (seen once, after the users' answers had come back).
            live = [node for node in client.get_nodes() if node.name != stopped.name]
            while not all(cluster_ready(node.redis_connection, nodes=6) for node in live):
                assert time.monotonic() < deadline, "the cluster did not settle after the failover"
                time.sleep(0.2)

            # A session written after the failover lands on the promoted replica and is read.
            visitor = next(
                f"new-{n}"
                for n in range(10_000)
                if client.get_node_from_key(keys.user_key(version, f"new-{n}")) == promoted
            )
            item = pipeline_run.lake.read_frame(SERVING_NEIGHBOURS)["item_id"][0]
            event = {"event_id": uuid.uuid4().hex, "user_id": visitor, "item_id": item}
            assert post(service, {"events": [{**event, "event_type": "view"}]})["accepted"] == 1
            assert recommend(service, visitor)["strategy"] == "session"


def test_a_users_slot_moved_to_another_primary_while_serving_changes_no_answer(
    pipeline_run, held, tmp_path
):
    """Resharding by hand as `redis-cli --cluster reshard` does it (IMPORTING / MIGRATING, the
    keys moved in two `MIGRATE`s, then `SETSLOT NODE`) under a live service: the user's answer
    is the same at every step, and a view posted while the slot is half moved is written, read
    back in the history and kept."""
    with redis_cluster(tmp_path / "redis") as url:
        client = open_client(url, cluster=True)
        version = write_from_lake(client, pipeline_run.lake).version
        assert write_ranked_from_lake(client, pipeline_run.lake)[1] is not None
        (tmp_path / "service").mkdir()
        env = {"SHELFWISE_REDIS_URL": url, **CLUSTER_ENV}
        with served_copy(pipeline_run.settings, tmp_path / "service", env) as (service, _):
            user = next(
                user
                for user in sorted(held.states)
                if recommend(service, user)["strategy"] == "personalized"
            )
            before = answer(recommend(service, user))
            slot = key_slot(user.encode())
            source = client.get_node_from_key(keys.user_key(version, user))
            target = next(node for node in client.get_primaries() if node.name != source.name)
            old, new = source.redis_connection, target.redis_connection
            new.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", old.cluster("MYID"))
            old.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", new.cluster("MYID"))
            moving = sorted(old.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000))
            candidates_key = keys.user_key(version, user)
            assert candidates_key in moving and len(moving) >= 2  # and the user's ranked list
            assert answer(recommend(service, user)) == before

            def migrate(batch: list[str]) -> None:
                old.execute_command(
                    "MIGRATE", target.host, target.port, "", 0, 5000, "KEYS", *batch
                )

            # All but the user's candidates: the user's keys are on both nodes now.
            migrate([key for key in moving if key != candidates_key])
            assert answer(recommend(service, user)) == before
            item = pipeline_run.lake.read_frame(SERVING_NEIGHBOURS)["item_id"][0]
            event = {"event_id": uuid.uuid4().hex, "user_id": user, "item_id": item}
            assert post(service, {"events": [{**event, "event_type": "view"}]})["accepted"] == 1
            after_view = answer(recommend(service, user))
            assert after_view != before

            migrate(sorted(old.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000)))
            for node in client.get_primaries():
                node.redis_connection.execute_command(
                    "CLUSTER SETSLOT", slot, "NODE", new.cluster("MYID")
                )
            assert old.execute_command("CLUSTER GETKEYSINSLOT", slot, 1000) == []
            assert answer(recommend(service, user)) == after_view
            found = httpx.post(f"{service}/history", json={"user_id": user}, timeout=10).json()
            assert (found["items"][0]["item_id"], found["items"][0]["live"]) == (item, True)
            log = (tmp_path / "service" / "bentoml.log").read_text()
            assert "unavailable" not in log and "Traceback" not in log


def recommend(url: str, user_id: str, k: int = 10) -> dict:
    response = httpx.post(f"{url}/recommend", json={"user_id": user_id, "k": k}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def post(url: str, body: dict) -> dict:
    response = httpx.post(f"{url}/events", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def answer(body: dict) -> tuple:
    return body["strategy"], body["fallback_level"], [i["item_id"] for i in body["items"]]
