"""Idempotency across restarts: the seen event ids of the window come back from the log and the
lake (`shelfwise.runtime.feedback.restore_seen_events`), in process and in Redis."""

import os
import time
from datetime import UTC, datetime, timedelta

import pytest

from shelfwise.lake import Lake
from shelfwise.runtime import online_state
from shelfwise.runtime.feedback import (
    FeedbackLog,
    compact_feedback,
    feedback_event_files,
    recent_event_ids,
    restore_seen_events,
)
from shelfwise.runtime.online_state import SEEN_TTL_S, InProcessState, RedisState
from tests.test_feedback_log import make_events


def age_files(lake: Lake, relpaths, age: timedelta) -> None:
    """Makes lake files look published `age` ago (their modification time)."""
    stamp = (datetime.now(UTC) - age).timestamp()
    for relpath in relpaths:
        os.utime(lake.path(relpath), (stamp, stamp))


def log_three_ways(tmp_path):
    """Events compacted long ago, compacted recently, sealed in the log, and in an open segment
    of a writer that never closed it (a killed worker's)."""
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    with FeedbackLog(wal) as log:
        log.append("events", make_events("old-", 5))
    old_files = compact_feedback(wal, lake).files
    age_files(lake, old_files, timedelta(seconds=SEEN_TTL_S + 3600))
    with FeedbackLog(wal) as log:
        log.append("events", make_events("lake-", 5))
    compact_feedback(wal, lake)
    with FeedbackLog(wal) as log:
        log.append("events", make_events("sealed-", 5))
    killed = FeedbackLog(wal)  # left open: its segment stays `.open`, as after a kill -9
    killed.append("events", make_events("open-", 5))
    return wal, lake, killed


def ids(prefix: str) -> list[str]:
    return [f"{prefix}{index}" for index in range(5)]


def test_a_new_in_process_state_knows_the_windows_ids_from_the_lake_and_the_log(tmp_path):
    wal, lake, killed = log_three_ways(tmp_path)
    try:
        state = InProcessState()
        assert all(state.unseen(ids("lake-") + ids("open-")))  # what today's restart knew

        added = restore_seen_events(state, lake, wal)

        assert added == 15
        assert not any(state.unseen(ids("lake-") + ids("sealed-") + ids("open-")))
        # Published before the window: forgotten, as the window promises no more.
        assert all(state.unseen(ids("old-")))
        assert state.unseen(["new-0"]) == [True]
    finally:
        killed.close()


def test_recent_event_ids_are_unique_oldest_first_with_their_publication_time(tmp_path):
    wal, lake, killed = log_three_ways(tmp_path)
    try:
        since = datetime.now(UTC) - timedelta(days=1)
        recent = recent_event_ids(lake, wal, since)
        assert sorted(recent.get_column("event_id")) == sorted(
            ids("lake-") + ids("sealed-") + ids("open-")
        )
        assert recent.get_column("seen_at").is_sorted()
        published = feedback_event_files(lake, since)
        assert recent.get_column("seen_at").min() == min(published.values())
        assert recent_event_ids(lake, None, since).height == 5  # the lake only
    finally:
        killed.close()


def test_in_process_ids_are_forgotten_after_the_window(monkeypatch):
    state = InProcessState()
    now = time.time()
    assert state.remember_seen([("ancient", now - SEEN_TTL_S - 1), ("recent", now - 60)]) == 1
    state.record([{"event_id": "live", "user_id": "u1", "item_id": "i1", "event_type": "view"}])
    assert state.unseen(["ancient", "recent", "live"]) == [True, False, False]
    monkeypatch.setattr(online_state.time, "time", lambda: now + SEEN_TTL_S - 30)
    assert state.unseen(["recent", "live"]) == [True, False]


@pytest.fixture
def redis_state(redis_url):
    return RedisState(redis_url, prefix=f"test-{time.monotonic_ns()}:")


def test_redis_keeps_ids_across_a_service_restart_and_restores_them_after_its_own(
    tmp_path, redis_state, redis_url
):
    import redis

    wal, lake, killed = log_three_ways(tmp_path)
    client = redis.Redis.from_url(redis_url, decode_responses=True)
    prefix = redis_state._prefix  # noqa: SLF001 - the test inspects the keys
    try:
        # Redis empty (first start, or restarted without its data): the whole window.
        assert redis_state.seen_restored_through() is None
        assert restore_seen_events(redis_state, lake, wal) == 15
        assert not any(redis_state.unseen(ids("lake-") + ids("sealed-") + ids("open-")))
        assert all(redis_state.unseen(ids("old-")))
        ttl = client.ttl(f"{prefix}seen:lake-0")
        assert SEEN_TTL_S - 120 < ttl <= SEEN_TTL_S

        # A service restart with Redis up: only files published since the last restore (less a
        # margin for clocks) are read. A file published long before is not read again ...
        killed.close()
        compact_feedback(wal, lake)  # the killed worker's log, compacted by the next start
        earlier = [
            relpath
            for relpath in lake.list_files("events")
            if lake.read_frame(relpath).get_column("event_id")[0].startswith("lake-")
        ]
        age_files(lake, earlier, timedelta(hours=2))
        client.delete(*client.keys(f"{prefix}seen:*"))  # stands for ids Redis could not hold
        restore_seen_events(redis_state, lake, wal)
        assert all(redis_state.unseen(ids("lake-")))
        # ... while ids of files published since (the killed worker's log) are.
        assert not any(redis_state.unseen(ids("open-") + ids("sealed-")))

        # Redis restarted empty: its marker is gone with the ids, and the window comes back.
        client.delete(*client.keys(f"{prefix}*"))
        restore_seen_events(redis_state, lake, wal)
        assert not any(redis_state.unseen(ids("lake-")))
    finally:
        killed.close()
