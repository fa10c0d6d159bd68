"""Stateless replicas: two `bentoml serve` processes sharing one Redis (its own server, so the
test may stop it) answer alike, see each other's events, follow a new version of the online store
without a restart, and degrade instead of failing when Redis goes away."""

import asyncio
import re
import time
import uuid

import httpx
import polars as pl
import pytest
import redis

from models.features import FEATURE_COLUMNS
from models.neighbour_arrays import neighbour_arrays
from models.online_store import snapshot_states, write_from_lake, write_version
from models.recommender import FALLBACK_POPULAR
from models.snapshot import CandidateSnapshot
from shelfwise.lake import (
    SERVING_CANDIDATES,
    SERVING_ITEMS,
    SERVING_NEIGHBOURS,
    SERVING_POPULAR,
)
from shelfwise.runtime import store_keys as keys
from tests.support import redis_server, served_copy


@pytest.fixture(scope="module")
def replicas(pipeline_run, tmp_path_factory):
    """Redis holding the pipeline's serving state (version 1), and two replicas serving it."""
    assert pipeline_run.result.success, pipeline_run.failures
    folder = tmp_path_factory.mktemp("replicas")
    with redis_server(folder) as url:
        client = redis.Redis.from_url(url)
        first = write_from_lake(client, pipeline_run.lake)
        env = {"SHELFWISE_REDIS_URL": url}
        (folder / "a").mkdir()
        (folder / "b").mkdir()
        with served_copy(pipeline_run.settings, folder / "a", env) as (a, _):
            with served_copy(pipeline_run.settings, folder / "b", env) as (b, _):
                yield {"a": a, "b": b, "client": client, "first": first.version, "folder": folder}


def recommend(url: str, user_id: str, k: int = 10) -> dict:
    response = httpx.post(f"{url}/recommend", json={"user_id": user_id, "k": k}, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def answer(body: dict) -> tuple:
    return body["strategy"], body["fallback_level"], [i["item_id"] for i in body["items"]]


def users(pipeline_run) -> list[str]:
    frame = pipeline_run.lake.read_frame(SERVING_CANDIDATES, ["user_id"])
    return sorted(frame["user_id"].unique())


def test_both_replicas_serve_the_store_and_answer_alike(replicas, pipeline_run):
    for name in ("a", "b"):
        log = (replicas["folder"] / name / "bentoml.log").read_text()
        assert f"from online store version {replicas['first']}" in log
    for user in users(pipeline_run)[:25] + ["someone-new"]:
        assert answer(recommend(replicas["a"], user)) == answer(recommend(replicas["b"], user))
    assert recommend(replicas["a"], users(pipeline_run)[0])["strategy"] == "personalized"


def state_reads(url: str) -> tuple[float, float]:
    """The replica's `/recommend` state reads and the Redis round trips they took."""
    metrics = httpx.get(f"{url}/metrics", timeout=10).text

    def total(name: str) -> float:
        found = re.search(rf"^{name}_total(?:{{[^}}]*}})? ([0-9.e+]+)$", metrics, re.M)
        assert found, metrics[-2000:]
        return float(found.group(1))

    return total("shelfwise_state_reads"), total("shelfwise_state_round_trips")


def test_concurrent_requests_share_round_trips_and_answer_as_one_at_a_time(replicas, pipeline_run):
    """Requests waiting on a worker's event loop read Redis together (`ReadBatcher`)."""
    # Eight: the worker's default limit of requests in progress (SHELFWISE_MAX_CONCURRENCY).
    url, known = replicas["a"], users(pipeline_run)[:6]
    crowd = known + [f"someone-new-{n}" for n in range(2)]
    alone = {user: answer(recommend(url, user)) for user in crowd}

    async def burst() -> list[tuple]:
        async with httpx.AsyncClient(timeout=10) as client:

            async def one(user: str) -> tuple:
                response = await client.post(f"{url}/recommend", json={"user_id": user, "k": 10})
                assert response.status_code == 200, response.text
                return answer(response.json())

            return await asyncio.gather(*(one(user) for user in crowd))

    reads_before, trips_before = state_reads(url)
    for _ in range(5):  # concurrent, but not necessarily parsed in one pass of the loop
        assert dict(zip(crowd, asyncio.run(burst()), strict=True)) == alone
        reads, trips = state_reads(url)
        if reads - reads_before > trips - trips_before:
            break
    assert reads - reads_before >= len(crowd)
    assert reads - reads_before > trips - trips_before > 0  # some requests shared a round trip


def test_a_view_posted_to_one_replica_changes_the_next_answer_of_the_other(replicas, pipeline_run):
    visitor = f"new-{uuid.uuid4().hex}"
    item = pipeline_run.lake.read_frame(SERVING_NEIGHBOURS)["item_id"][0]
    before = recommend(replicas["b"], visitor)
    assert before["strategy"] == "popular"
    event = {"event_id": uuid.uuid4().hex, "user_id": visitor, "item_id": item}
    event["event_type"] = "view"
    posted = httpx.post(f"{replicas['a']}/events", json={"events": [event]}, timeout=10)
    assert posted.json()["accepted"] == 1
    after = recommend(replicas["b"], visitor)
    assert after["strategy"] == "session" and answer(after) != answer(before)


def wait_for(check, timeout: float = 15.0, what: str = "the replicas followed the version") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.25)


def test_a_new_version_is_served_without_restart_and_old_keys_go(replicas, pipeline_run):
    client, lake = replicas["client"], pipeline_run.lake
    user = users(pipeline_run)[1]
    assert recommend(replicas["a"], user)["strategy"] == "personalized"
    # Version 2: the same state without this user's candidates.
    frame = lake.read_frame(SERVING_CANDIDATES).filter(pl.col("user_id") != user)
    snapshot = CandidateSnapshot.from_frame(frame)
    second = write_version(
        client,
        snapshot.table,
        snapshot_states(snapshot),
        popular=lake.read_frame(SERVING_POPULAR),
        neighbours=neighbour_arrays(snapshot.table, lake.read_frame(SERVING_NEIGHBOURS)),
        facts=lake.read_frame(SERVING_ITEMS),
        columns=FEATURE_COLUMNS,
    )
    assert second.previous == replicas["first"]
    for replica in ("a", "b"):
        wait_for(lambda r=replica: recommend(replicas[r], user)["strategy"] != "personalized")
    # Version 1 is kept until the next switch (a replica might not have polled yet), then goes.
    assert client.exists(keys.meta_key(replicas["first"]))
    third = write_from_lake(client, lake)
    assert replicas["first"] in third.removed
    assert not list(client.scan_iter(match=keys.version_prefix(replicas["first"]) + "*"))
    assert client.exists(keys.meta_key(second.version))
    for replica in ("a", "b"):
        wait_for(lambda r=replica: recommend(replicas[r], user)["strategy"] == "personalized")


def test_a_version_of_another_release_is_refused_and_the_held_one_served(replicas, pipeline_run):
    """A pipeline of another release wrote the current version: the replicas keep theirs, say
    why once (not that Redis is unreachable), and follow the pointer again once it is back."""
    client = replicas["client"]
    held = int(client.get(keys.CURRENT))
    other = int(client.incr(keys.NEXT_VERSION))
    client.set(keys.meta_key(other), b'{"layout": "shelfwise-user-v0"}')
    client.set(keys.CURRENT, other)
    user = users(pipeline_run)[0]
    try:
        for name in ("a", "b"):
            log = replicas["folder"] / name / "bentoml.log"
            wait_for(lambda log=log: "Online store version refused" in log.read_text())
            assert recommend(replicas[name], user)["strategy"] == "personalized"
        time.sleep(1.5)  # a few more polls: still one message, and never "unreachable"
        for name in ("a", "b"):
            text = (replicas["folder"] / name / "bentoml.log").read_text()
            assert text.count("Online store version refused") == 1
            assert "Online store unreachable" not in text
    finally:
        client.set(keys.CURRENT, held)
        client.delete(keys.meta_key(other))


def test_redis_restarted_empty_is_restored_and_followed_without_a_restart(replicas, pipeline_run):
    """Redis loses everything (a restart without persistence, a flush): the replicas put back
    the stock updates and seen event ids from the lake and their logs (the one update only
    replica a's log holds included, though b may have restored first), say that the version is
    gone, and serve the pipeline's next version when it comes, even under the same number."""
    client, lake = replicas["client"], pipeline_run.lake
    user = users(pipeline_run)[2]
    held = int(client.get(keys.CURRENT))
    hidden = recommend(replicas["a"], "someone-new")["items"][0]["item_id"]
    event = {"event_id": uuid.uuid4().hex, "user_id": "u1", "item_id": hidden}
    body = {"events": [{**event, "event_type": "view"}], "stock": [{"item_id": hidden}]}
    body["stock"][0]["is_in_stock"] = False
    posted = httpx.post(f"{replicas['a']}/events", json=body, timeout=10).json()
    assert (posted["accepted"], posted["stock_updates"]) == (1, 1)
    for name in ("a", "b"):
        assert hidden not in answer(recommend(replicas[name], "someone-new"))[2]

    client.flushall()
    for name in ("a", "b"):
        log = replicas["folder"] / name / "bentoml.log"
        wait_for(lambda log=log: "Online state restored" in log.read_text(), what="restored")
        text = log.read_text()
        assert text.count("The online state lost its data") == 1
        assert text.count("The online store holds no version any more") == 1
        assert hidden not in answer(recommend(replicas[name], "someone-new"))[2]
        resent = httpx.post(f"{replicas[name]}/events", json={"events": body["events"]}, timeout=10)
        assert (resent.json()["accepted"], resent.json()["duplicates"]) == (0, 1)
        # As a new user, and saying that its candidates are missing, not that all is well.
        lost = recommend(replicas[name], user)
        assert lost["strategy"] != "personalized" and lost["fallback_level"] == FALLBACK_POPULAR

    client.set(keys.NEXT_VERSION, held - 1)  # the next version takes the number held
    assert write_from_lake(client, lake).version == held
    # Its shared parts loaded anew: the ones held were another snapshot's for all it knew.
    switched = f"Online store version {held} replaces {held}"
    for name in ("a", "b"):
        log = replicas["folder"] / name / "bentoml.log"
        wait_for(lambda log=log: switched in log.read_text(), what=switched)
        again = recommend(replicas[name], user)
        assert again["strategy"] == "personalized" and again["fallback_level"] == 0


def test_without_redis_the_replicas_degrade_and_never_fail(replicas, pipeline_run):
    """Last in the module: it stops the module's Redis."""
    replicas["client"].shutdown(nosave=True)
    for replica in ("a", "b"):
        body = recommend(replicas[replica], users(pipeline_run)[0], k=5)
        assert body["fallback_level"] == FALLBACK_POPULAR and len(body["items"]) == 5
        similar = httpx.post(f"{replicas[replica]}/similar", json={"item_id": "i1"}, timeout=10)
        assert similar.status_code == 200
        # The history says it is not the whole story, rather than that the user is unknown.
        found = httpx.post(
            f"{replicas[replica]}/history", json={"user_id": users(pipeline_run)[0]}, timeout=10
        )
        assert found.status_code == 200
        assert found.json()["complete"] is False and found.json()["known"] is False
        # Events are still acknowledged once durable in the log (their real-time effect waits).
        event = {"event_id": uuid.uuid4().hex, "user_id": "u1", "item_id": "i1"}
        event["event_type"] = "view"
        body = {"events": [event], "stock": [{"item_id": "i2", "is_in_stock": False}]}
        posted = httpx.post(f"{replicas[replica]}/events", json=body, timeout=10)
        assert posted.status_code == 200 and posted.json()["accepted"] == 1
