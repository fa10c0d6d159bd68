"""The feedback write-ahead log and its compactor, on real files (and a real S3 API on moto)."""

import os
import shutil
import signal
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from shelfwise.cli import main
from shelfwise.contracts import EVENTS_SCHEMA, IMPRESSIONS_SCHEMA, ContractError
from shelfwise.lake import (
    EVENTS,
    FEATURE_SAMPLES,
    IMPRESSIONS,
    STOCK_UPDATES,
    Lake,
    partition_day,
)
from shelfwise.runtime.feedback import (
    NEW_SUFFIX,
    OPEN_SUFFIX,
    SEALED_SUFFIX,
    FeedbackLog,
    compact_feedback,
    latest_stock_updates,
    read_segment,
)
from shelfwise.runtime.online_state import StockChange, open_state
from shelfwise.settings import Settings
from tests.support import PROJECT_ROOT

DAY = datetime(2026, 11, 1, tzinfo=UTC)
WRITER = PROJECT_ROOT / "tests" / "feedback_writer.py"


def make_events(prefix: str, count: int, start: datetime = DAY) -> list[dict]:
    return [
        {
            "event_id": f"{prefix}{index}",
            "occurred_at": start + timedelta(hours=7 * index),
            "user_id": f"u{index % 3}",
            "session_id": f"s{index % 2}",
            "item_id": f"i{index}",
            "event_type": ("view", "add_to_cart", "remove_from_cart", "purchase")[index % 4],
            "quantity": 1 + index % 3,
            "price": None if index % 5 == 0 else 10.0 + index,
            "rec_id": f"r{index}" if index % 2 else None,
            "source": "web",
        }
        for index in range(count)
    ]


def make_impressions(rec_id: str, count: int) -> list[dict]:
    shown = datetime(2026, 11, 2, 23, 59, 59, 999_999, tzinfo=UTC)
    return [
        {
            "rec_id": rec_id,
            "shown_at": shown,
            "user_id": "u1",
            "item_id": f"i{position}",
            "position": position,
            "model_version": "shelfwise_ranker:v1" if position % 2 else None,
            "strategy": "ranker",
            "fallback_level": 0,
            "experiment": None,
            "arm": None,
            "drafted_by": None,
        }
        for position in range(count)
    ]


def lake_rows(lake: Lake, dataset: str, key: str) -> list[dict]:
    """Every row of a dataset (one dict per row, without the partition column), sorted by `key`."""
    rows = [row for path in lake.list_files(dataset) for row in read_file(lake, path).to_pylist()]
    return sorted(rows, key=lambda row: (row[key], str(row.get("position"))))


def read_file(lake: Lake, relpath: str) -> pa.Table:
    with lake.fs.open(lake.path(relpath), "rb") as handle:
        return pq.read_table(handle)


def utc(rows: list[dict], column: str) -> list[dict]:
    return [{**row, column: row[column].astimezone(UTC)} for row in rows]


def segments(directory: Path, suffix: str) -> list[Path]:
    return sorted(directory.glob(f"*{suffix}"))


def test_append_and_compact_round_trip_with_the_exact_contract_schema(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    berlin = timezone(timedelta(hours=1))
    events = make_events("e", 12, start=datetime(2026, 11, 1, 0, 30, tzinfo=berlin))
    impressions = make_impressions("r1", 5)
    with FeedbackLog(wal) as log:
        log.append(EVENTS, events[:7])
        log.append(IMPRESSIONS, impressions)
        log.append(EVENTS, events[7:])
        log.append(EVENTS, [])  # nothing to do

    result = compact_feedback(wal, lake)

    assert (result.events, result.impressions, result.segments) == (12, 5, 1)
    assert result.torn_bytes == 0 and result.live == 0
    assert os.listdir(wal) == ["compact.lock"]
    for relpath in result.files:
        schema = pq.read_schema(lake.fs.open(lake.path(relpath), "rb"))
        expected = EVENTS_SCHEMA if relpath.startswith(EVENTS) else IMPRESSIONS_SCHEMA
        assert schema.equals(expected), relpath
    # Hive partitions by the UTC date: 00:30 at +01:00 is still October 31st in UTC.
    event_dates = sorted({partition_day(path) for path in lake.list_files(EVENTS)})
    expected_dates = {str(row["occurred_at"].astimezone(UTC).date()) for row in events}
    assert event_dates[0] == "2026-10-31" and event_dates == sorted(expected_dates)
    assert lake.list_files(IMPRESSIONS) == [f for f in result.files if f.startswith(IMPRESSIONS)]
    assert [partition_day(f) for f in lake.list_files(IMPRESSIONS)] == ["2026-11-02"]
    for relpath in lake.list_files(EVENTS):
        day = partition_day(relpath)
        assert {
            r["occurred_at"].date().isoformat() for r in read_file(lake, relpath).to_pylist()
        } == {day}
    assert lake_rows(lake, EVENTS, "event_id") == sorted(
        utc(events, "occurred_at"), key=lambda row: row["event_id"]
    )
    assert lake_rows(lake, IMPRESSIONS, "rec_id") == impressions
    # The pipeline's reader sees the partition as a column.
    assert lake.read_frame(EVENTS).height == 12
    assert compact_feedback(wal, lake).segments == 0  # nothing left


def test_duplicate_event_ids_are_published_once(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    events = make_events("e", 6)
    with FeedbackLog(wal) as log:
        log.append(EVENTS, events[:4])
        log.append(EVENTS, events[2:6])  # a client retry: e2 and e3 again
        log.rotate()
        log.append(EVENTS, events[5:6])  # and again, in the next segment
        log.append(IMPRESSIONS, make_impressions("r1", 3))
        log.append(IMPRESSIONS, make_impressions("r1", 3))

    result = compact_feedback(wal, lake)

    assert result.segments == 2
    assert result.rows == {EVENTS: 6, IMPRESSIONS: 3, STOCK_UPDATES: 0, FEATURE_SAMPLES: 0}
    assert result.duplicates == {EVENTS: 3, IMPRESSIONS: 3, STOCK_UPDATES: 0, FEATURE_SAMPLES: 0}
    assert [row["event_id"] for row in lake_rows(lake, EVENTS, "event_id")] == [
        f"e{n}" for n in range(6)
    ]


def test_rows_that_break_the_contract_are_refused_before_anything_is_written(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    good = make_events("e", 3)
    with FeedbackLog(wal) as log:
        with pytest.raises(ContractError, match="'user_id'"):
            log.append(EVENTS, [*good, {**good[0], "user_id": None}])
        with pytest.raises(ContractError, match="'item_id'"):
            log.append(EVENTS, [{k: v for k, v in good[0].items() if k != "item_id"}])
        with pytest.raises(ContractError, match="'quantity'"):
            log.append(EVENTS, [{**good[0], "quantity": "two"}])
        with pytest.raises(ContractError, match="'occurred_at'"):
            log.append(EVENTS, [{**good[0], "occurred_at": "yesterday"}])
        with pytest.raises(ContractError, match="'event_type'"):
            log.append(EVENTS, [{**good[0], "event_type": "click"}])
        with pytest.raises(ContractError, match="'position'"):
            log.append(IMPRESSIONS, [{**make_impressions("r", 1)[0], "position": None}])
        with pytest.raises(ValueError, match="unknown feedback stream"):
            log.append("clicks", good)
        log.append(EVENTS, good)
    with pytest.raises(RuntimeError, match="closed"):
        log.append(EVENTS, good)

    assert compact_feedback(wal, lake).rows == {
        EVENTS: 3,
        IMPRESSIONS: 0,
        STOCK_UPDATES: 0,
        FEATURE_SAMPLES: 0,
    }


def test_columns_are_held_to_the_same_contract_as_rows(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    rows = make_impressions("r", 4)
    columns = {name: [row[name] for row in rows] for name in rows[0]}
    with FeedbackLog(wal) as log:
        with pytest.raises(ContractError, match="'position'"):
            log.append_columns(IMPRESSIONS, {**columns, "position": [1, None, 3, 4]}, 4)
        with pytest.raises(ContractError, match="'item_id' has 3 values, not 4"):
            log.append_columns(IMPRESSIONS, {**columns, "item_id": ["a", "b", "c"]}, 4)
        with pytest.raises(ContractError, match="'shown_at'"):
            log.append_columns(IMPRESSIONS, {**columns, "shown_at": ["today"] * 4}, 4)
        with pytest.raises(ContractError, match="'user_id'"):  # required, and missing
            log.append_columns(IMPRESSIONS, {k: v for k, v in columns.items() if k != "user_id"}, 4)
        optional_missing = {k: v for k, v in columns.items() if k != "model_version"}
        log.append_columns(IMPRESSIONS, optional_missing, 4)
    compact_feedback(wal, lake)
    logged = lake_rows(lake, IMPRESSIONS, "position")
    assert logged == utc([{**row, "model_version": None} for row in rows], "shown_at")


@pytest.mark.parametrize("damage", ["cut", "zeros", "garbage", "flipped"])
def test_a_torn_trailing_record_is_skipped(tmp_path, damage):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    with FeedbackLog(wal) as log:
        log.append(EVENTS, make_events("a", 5))
        log.append(EVENTS, make_events("b", 5))
    (segment,) = segments(wal, SEALED_SUFFIX)
    data = segment.read_bytes()
    whole = read_segment(data)
    assert whole.torn_bytes == 0 and len(whole.batches[EVENTS]) == 2
    # A third batch whose write a crash cut short: it was never acknowledged.
    with FeedbackLog(tmp_path / "other") as other:
        other.append(EVENTS, make_events("c", 5))
    third = next((tmp_path / "other").glob("*.sealed")).read_bytes()
    # Skip its file magic (16 bytes) and schema record (10-byte header + payload): the batch record.
    last = third[16 + 10 + struct.unpack_from("<I", third, 16 + 2)[0] :]
    torn = {
        "cut": data + last[:-7],
        "zeros": data + bytes(4096),
        "garbage": data + os.urandom(333),
        "flipped": data + last[:-1] + bytes([last[-1] ^ 0xFF]),
    }[damage]
    segment.write_bytes(torn)

    result = compact_feedback(wal, lake)

    assert result.torn_bytes == len(torn) - whole.valid_bytes > 0
    assert result.events == 10
    assert {row["event_id"][0] for row in lake_rows(lake, EVENTS, "event_id")} == {"a", "b"}
    assert list(wal.iterdir()) == [wal / "compact.lock"]


def test_compaction_is_idempotent_when_removing_the_segment_was_interrupted(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    with FeedbackLog(wal) as log:
        log.append(EVENTS, make_events("e", 10))
        log.append(IMPRESSIONS, make_impressions("r1", 4))
    (segment,) = segments(wal, SEALED_SUFFIX)
    copy = tmp_path / "copy"
    shutil.copy2(segment, copy)

    first = compact_feedback(wal, lake)
    files = lake.list_files("")
    # As if the compactor had died after publishing and before removing the segment.
    shutil.copy2(copy, segment)
    second = compact_feedback(wal, lake)

    assert second.files == first.files and len(first.files) == 4  # 3 days of events
    assert lake.list_files("") == files  # no second copy, no temporary left behind
    assert [row["event_id"] for row in lake_rows(lake, EVENTS, "event_id")] == sorted(
        f"e{n}" for n in range(10)
    )
    assert len(lake_rows(lake, IMPRESSIONS, "rec_id")) == 4


def test_open_segments_of_live_writers_wait_and_orphans_of_dead_ones_are_taken(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    # A writer that exits without closing its log: its segment stays `.open`, unlocked.
    script = (
        "import sys; from pathlib import Path;"
        "from shelfwise.runtime.feedback import FeedbackLog;"
        "from tests.test_feedback_log import make_events;"
        "log = FeedbackLog(Path(sys.argv[1])); log.append('events', make_events('dead', 4));"
        "import os; os._exit(0)"
    )
    subprocess.run([sys.executable, "-c", script, str(wal)], cwd=PROJECT_ROOT, check=True)
    assert len(segments(wal, OPEN_SUFFIX)) == 1
    log = FeedbackLog(wal)
    log.append(EVENTS, make_events("live", 3))

    during = compact_feedback(wal, lake)

    assert (during.orphaned, during.live, during.events) == (1, 1, 4)
    assert len(segments(wal, OPEN_SUFFIX)) == 1  # the live writer's, untouched
    log.append(EVENTS, make_events("more", 2))
    log.close()
    after = compact_feedback(wal, lake)
    assert (after.orphaned, after.live, after.events) == (0, 0, 5)
    assert len(lake_rows(lake, EVENTS, "event_id")) == 9


def test_segments_rotate_by_size_and_age_while_threads_append(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    log = FeedbackLog(wal, max_segment_bytes=16 * 1024, max_segment_seconds=0.3)

    def append(thread: int) -> None:
        for batch in range(30):
            log.append(EVENTS, make_events(f"t{thread}b{batch}-", 20))

    threads = [threading.Thread(target=append, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(segments(wal, SEALED_SUFFIX)) > 2  # sealed by size
    deadline = time.monotonic() + 10
    while segments(wal, OPEN_SUFFIX) and time.monotonic() < deadline:
        time.sleep(0.05)  # the idle one is sealed by age, without a close
    assert segments(wal, OPEN_SUFFIX) == []

    result = compact_feedback(wal, lake)
    log.close()

    assert result.events == 4 * 30 * 20 and result.duplicates[EVENTS] == 0
    ids = Counter(row["event_id"] for row in lake_rows(lake, EVENTS, "event_id"))
    assert len(ids) == 2400 and set(ids.values()) == {1}


def test_a_segment_that_does_not_fit_the_contract_is_set_aside_not_blocking(tmp_path):
    from shelfwise.runtime import feedback

    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    # A segment of another version, whose events had no `source`.
    older = EVENTS_SCHEMA.remove(EVENTS_SCHEMA.get_field_index("source"))
    batch = pa.RecordBatch.from_pylist(make_events("old", 3), schema=older)
    stream = feedback._STREAMS[EVENTS]
    wal.mkdir()
    stale = wal / f"20200101T000000000000Z-1-000000000000-000001{SEALED_SUFFIX}"
    stale.write_bytes(
        feedback.FILE_MAGIC
        + feedback._record(feedback._KIND_SCHEMA, stream, older.serialize().to_pybytes())
        + feedback._record(feedback._KIND_BATCH, stream, batch.serialize().to_pybytes())
    )
    with FeedbackLog(wal) as log:
        log.append(EVENTS, make_events("new", 2))

    result = compact_feedback(wal, lake)

    assert result.failed == [stale.name] and result.events == 2
    assert (wal / "failed" / stale.name).exists() and not stale.exists()
    assert compact_feedback(wal, lake).failed == []  # set aside once, not retried each run


# Each round kills one writer that rotates segments often (it may die between two of them) and
# one whose segment never fills (it surely dies with an open one, for the orphan assertions).
ROTATING, NEVER_FULL = 256 * 1024, 256 * 1024 * 1024


def _start_writers(wal: Path, segment_bytes: list[int]) -> list:
    writers = []
    for size in segment_bytes:
        process = subprocess.Popen(
            [sys.executable, str(WRITER), str(wal), "--threads", "2", "--segment-bytes", str(size)],
            cwd=PROJECT_ROOT,
            stdout=subprocess.PIPE,
        )
        lines: list[str] = []
        reader = threading.Thread(
            target=lambda out=process.stdout, got=lines: got.extend(line.decode() for line in out),
            daemon=True,
        )
        reader.start()
        writers.append((process, lines, reader))
    return writers


def _wait_for_acks(writers, at_least: int) -> None:
    deadline = time.monotonic() + 60
    while any(len(lines) < at_least for _, lines, _ in writers):
        assert time.monotonic() < deadline, "the writers acknowledged too little"
        assert all(process.poll() is None for process, _, _ in writers), "a writer died"
        time.sleep(0.02)


def _kill(writers) -> set[str]:
    """SIGKILLs the writers mid-flight; returns the event ids they acknowledged."""
    for process, _, _ in writers:
        process.send_signal(signal.SIGKILL)
    acknowledged: set[str] = set()
    for process, lines, reader in writers:
        assert process.wait(timeout=30) == -signal.SIGKILL
        reader.join(timeout=30)
        for line in lines:
            if line.endswith("\n"):  # a line cut by the kill promises nothing
                acknowledged.update(line.split()[1:])
    return acknowledged


def test_kill_9_loses_no_acknowledged_event_and_duplicates_none(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    # Round 1: two writer processes on one folder (like BentoML workers), compacted while live.
    first = _start_writers(wal, [ROTATING, NEVER_FULL])
    _wait_for_acks(first, 100)
    during = compact_feedback(wal, lake)
    assert during.live >= 1 and during.segments > 0  # a writer may be between two segments
    _wait_for_acks(first, 200)
    acknowledged = _kill(first)
    # Round 2: new writers start next to the dead ones' orphans; a compaction takes the orphans.
    second = _start_writers(wal, [ROTATING, NEVER_FULL])
    _wait_for_acks(second, 50)
    recovering = compact_feedback(wal, lake)
    assert recovering.orphaned >= 1 and recovering.live >= 1
    _wait_for_acks(second, 150)
    acknowledged |= _kill(second)

    final = compact_feedback(wal, lake)

    assert final.live == 0 and final.orphaned >= 1
    # A writer killed while creating a segment may leave a `.new` file: it holds no record, and
    # it is removed once it is older than STALE_NEW_SECONDS (a live writer may be locking it).
    left = sorted(p.name for p in wal.iterdir() if not p.name.endswith(NEW_SUFFIX))
    assert left == ["compact.lock"]
    published = Counter(
        event_id
        for relpath in lake.list_files(EVENTS)
        for event_id in read_file(lake, relpath).column("event_id").to_pylist()
    )
    assert len(acknowledged) >= 4 * 100 * 100
    assert not acknowledged - published.keys(), "acknowledged events were lost"
    assert max(published.values()) == 1, "events were published twice"
    assert lake.list_files(EVENTS, suffix="") == lake.list_files(EVENTS)  # no temporaries


def test_round_trip_and_idempotent_recompaction_on_s3(s3_lake_url, tmp_path):
    wal, lake = tmp_path / "wal", Lake(s3_lake_url)
    events = make_events("e", 9)
    with FeedbackLog(wal) as log:
        log.append(EVENTS, events)
        log.append(IMPRESSIONS, make_impressions("r9", 4))
    (segment,) = segments(wal, SEALED_SUFFIX)
    copy = tmp_path / "copy"
    shutil.copy2(segment, copy)

    first = compact_feedback(wal, lake)
    shutil.copy2(copy, segment)
    second = compact_feedback(wal, lake)

    assert (first.events, first.impressions) == (9, 4)
    assert second.files == first.files
    assert lake.list_files("", suffix="") == sorted(first.files)  # unique keys, no temporaries
    for relpath in first.files:
        expected = EVENTS_SCHEMA if relpath.startswith(EVENTS) else IMPRESSIONS_SCHEMA
        assert read_file(lake, relpath).schema.equals(expected)
    assert lake_rows(lake, EVENTS, "event_id") == sorted(
        utc(events, "occurred_at"), key=lambda row: row["event_id"]
    )
    assert lake_rows(lake, IMPRESSIONS, "rec_id") == make_impressions("r9", 4)


def test_cli_compact_publishes_the_log_of_shelfwise_home(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHELFWISE_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SHELFWISE_LAKE", raising=False)
    settings = Settings.from_env()
    with FeedbackLog(settings.wal_dir) as log:
        log.append(EVENTS, make_events("e", 4))
        log.append(EVENTS, make_events("e", 2))

    assert main(["compact"]) == 0

    output = capsys.readouterr().out
    assert "Compacted 1 log segment(s)" in output and "4 events, 0 impressions" in output
    assert "Dropped 2 duplicate row(s)" in output
    assert len(Lake(settings.lake_url).read_table(EVENTS)) == 4


def test_stock_updates_are_logged_compacted_and_the_latest_per_item_restored(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    assert latest_stock_updates(lake) == {}
    with FeedbackLog(wal) as log:
        log.append(
            STOCK_UPDATES,
            [
                {"item_id": "i1", "is_in_stock": False, "updated_at": DAY + timedelta(hours=2)},
                {"item_id": "i2", "is_in_stock": False, "updated_at": DAY},
            ],
        )
        # An older update of i1 logged later (another worker) does not win; a newer one of i2
        # on the next day does.
        log.append(
            STOCK_UPDATES,
            [
                {"item_id": "i1", "is_in_stock": True, "updated_at": DAY + timedelta(hours=1)},
                {"item_id": "i2", "is_in_stock": True, "updated_at": DAY + timedelta(days=1)},
            ],
        )
        with pytest.raises(ContractError, match="is_in_stock"):
            log.append(STOCK_UPDATES, [{"item_id": "i3", "updated_at": DAY}])
    result = compact_feedback(wal, lake)
    assert result.rows[STOCK_UPDATES] == 4
    assert [partition_day(f) for f in lake.list_files(STOCK_UPDATES)] == [
        "2026-11-01",
        "2026-11-02",
    ]
    assert in_stock(latest_stock_updates(lake)) == {"i1": False, "i2": True}
    assert latest_stock_updates(lake)["i2"] == StockChange.at(True, DAY + timedelta(days=1))


def test_stock_updates_still_in_the_log_are_restored_too(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    with FeedbackLog(wal) as log:
        log.append(STOCK_UPDATES, [{"item_id": "i1", "is_in_stock": False, "updated_at": DAY}])
    compact_feedback(wal, lake)
    assert in_stock(latest_stock_updates(lake, wal)) == {"i1": False}

    # Not compacted: one sealed segment, and one still open by a live writer. The newest update
    # of an item wins across the lake and the log.
    with FeedbackLog(wal) as log:
        log.append(
            STOCK_UPDATES,
            [{"item_id": "i1", "is_in_stock": True, "updated_at": DAY + timedelta(hours=1)}],
        )
    with FeedbackLog(wal) as live:
        live.append(STOCK_UPDATES, [{"item_id": "i2", "is_in_stock": False, "updated_at": DAY}])
        live.append(
            STOCK_UPDATES,
            [{"item_id": "i1", "is_in_stock": False, "updated_at": DAY - timedelta(hours=1)}],
        )
        assert sorted(p.suffix for p in wal.iterdir() if p.suffix in (".open", ".sealed")) == [
            ".open",
            ".sealed",
        ]
        assert in_stock(latest_stock_updates(lake)) == {"i1": False}
        assert in_stock(latest_stock_updates(lake, wal)) == {"i1": True, "i2": False}
    assert latest_stock_updates(Lake(str(tmp_path / "empty")), tmp_path / "no-log") == {}


@pytest.mark.parametrize("backend", ["in_process", "redis"])
def test_the_newest_stock_change_wins_in_any_arrival_order(backend, request):
    state = open_state(request.getfixturevalue("redis_url") if backend == "redis" else None)
    item, other = f"item-{backend}-{time.monotonic_ns()}", f"other-{time.monotonic_ns()}"
    newer, older = StockChange.at(True, DAY + timedelta(hours=1)), StockChange.at(False, DAY)
    state.update_stock({item: newer})
    # A restart restoring the log, or another worker's late request: older, so it loses.
    state.update_stock({item: older, other: older})
    assert stock(state)[item] == newer and stock(state)[other] == older
    later = StockChange.at(False, DAY + timedelta(hours=2))
    state.update_stock({item: later})
    assert stock(state)[item] == later


def test_activity_and_stock_in_one_read_see_another_workers_stock_change(redis_url):
    worker, other = open_state(redis_url), open_state(redis_url)
    item = f"item-{time.monotonic_ns()}"
    activity, stock = worker.activity_and_stock("nobody")
    assert activity.item_ids == () and item not in stock
    other.update_stock({item: StockChange.at(False, DAY)})
    assert worker.activity_and_stock("nobody")[1][item] == StockChange.at(False, DAY)


@pytest.mark.parametrize("backend", ["in_process", "redis"])
def test_several_requests_read_in_one_call_what_each_would_read_alone(backend, request):
    redis_url = request.getfixturevalue("redis_url") if backend == "redis" else None
    state, tag = open_state(redis_url), time.monotonic_ns()
    viewer, buyer, stranger = f"viewer-{tag}", f"buyer-{tag}", f"stranger-{tag}"
    events = [
        {"event_id": f"{tag}-1", "user_id": viewer, "item_id": "i1", "event_type": "view"},
        {"event_id": f"{tag}-2", "user_id": viewer, "item_id": "i2", "event_type": "add_to_cart"},
        {"event_id": f"{tag}-3", "user_id": buyer, "item_id": "i3", "event_type": "purchase"},
    ]
    state.record(events)
    state.update_stock({f"item-{tag}": StockChange.at(False, DAY)})
    value_key = f"shelfwise:value:{{{buyer}}}"
    if redis_url is not None:
        import redis

        redis.Redis.from_url(redis_url).set(value_key, b"\x00ranked\xff")
    missing = f"shelfwise:none:{{{tag}}}"
    requests = [(viewer, ()), (buyer, (value_key, missing)), (stranger, (missing,))]
    reads = state.read_requests(requests)
    alone = [state.read_requests([one])[0] for one in requests]
    assert reads == alone
    assert reads[0].activity.item_ids == ("i2", "i1") and reads[0].activity.carted_ids == {"i2"}
    assert reads[1].activity.purchased_ids == {"i3"} and reads[2].activity.item_ids == ()
    assert all(read.stock[f"item-{tag}"] == StockChange.at(False, DAY) for read in reads)
    # In process a value is never read: None for each key.
    assert [read.values for read in reads] == [
        (),
        (b"\x00ranked\xff" if redis_url else None, None),
        (None,),
    ]
    assert state.activity_stock_and_value(buyer, value_key)[2] == reads[1].values[0]


def test_a_failed_read_leaves_no_reply_behind_and_a_dropped_connection_is_reopened(redis_url):
    import redis

    state, tag = open_state(redis_url), time.monotonic_ns()
    broken, viewer = f"broken-{tag}", f"viewer-{tag}"
    state.record(
        [{"event_id": f"{tag}-1", "user_id": viewer, "item_id": "i1", "event_type": "view"}]
    )
    client = redis.Redis.from_url(redis_url)
    client.set(f"shelfwise:session:{{{broken}}}", "not a list")
    with pytest.raises(redis.ResponseError, match="WRONGTYPE"):
        state.read_requests([(broken, ()), (viewer, ())])
    # The viewer's replies, unread after the error, are not taken for the next read's.
    assert state.read_requests([(viewer, ())])[0].activity.item_ids == ("i1",)
    # Redis closed the connection (a restart, a timeout): the read opens another and succeeds.
    assert client.client_kill_filter(_type="normal", skipme=True) >= 1
    assert state.read_requests([(viewer, ())])[0].activity.item_ids == ("i1",)


def test_a_stock_value_of_an_earlier_version_in_redis_counts_as_oldest(redis_url):
    import redis

    state, item = open_state(redis_url), f"item-{time.monotonic_ns()}"
    client = redis.Redis.from_url(redis_url)
    client.hset("shelfwise:{stock}", item, "1")  # written without a time, before stock times
    client.incr("shelfwise:{stock}:version")
    assert stock(state)[item] == StockChange(True, 0)
    state.update_stock({item: StockChange.at(False, DAY)})
    assert stock(state)[item] == StockChange.at(False, DAY)


def stock(state) -> dict[str, StockChange]:
    """The stock changes the state holds, as a recommendation reads them."""
    return state.activity_and_stock("nobody")[1]


def in_stock(changes: dict[str, StockChange]) -> dict[str, bool]:
    return {item: change.in_stock for item, change in changes.items()}
