"""The impressions path is bounded: a full queue drops (and counts) instead of blocking or
growing, batches are cut, and the log refuses an oversized record before writing it."""

import threading
import time
from datetime import UTC, datetime

import pytest
from prometheus_client import REGISTRY

from bentos.impressions import ImpressionLog, ShownItems
from shelfwise.lake import IMPRESSIONS, Lake
from shelfwise.runtime.feedback import (
    OPEN_SUFFIX,
    SEALED_SUFFIX,
    FeedbackLog,
    RecordTooLargeError,
    compact_feedback,
    read_segment,
)
from tests.test_feedback_log import lake_rows, make_events, make_impressions


def dropped(reason: str) -> float:
    return REGISTRY.get_sample_value("shelfwise_impressions_dropped_total", {"reason": reason}) or 0


class StalledLog:
    """A feedback log whose appends wait until released (a disk that stopped answering)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.entered = threading.Event()
        self.appended: list[list[dict]] = []

    def append_columns(self, stream: str, columns: dict[str, list], rows: int) -> None:
        self.entered.set()
        self.release.wait()
        self.appended.append(
            [dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)]
        )


def test_a_full_queue_drops_a_responses_impressions_and_counts_them_without_blocking():
    log = StalledLog()
    impressions = ImpressionLog(log, max_queued_rows=40, max_batch_rows=15)
    before = dropped("queue_full")
    try:
        assert impressions.add(make_impressions("r0", 10))
        assert log.entered.wait(10)  # the writer took r0 and hangs in its append
        outcomes: list[bool] = []

        def flood() -> None:
            outcomes.extend(impressions.add(make_impressions(f"r{n}", 10)) for n in range(1, 8))

        adder = threading.Thread(target=flood)
        adder.start()
        adder.join(10)
        assert not adder.is_alive(), "add blocked behind a stalled log"
        # r0 (being written) and r1-r3 fill the 40 rows; r4-r7 are dropped whole.
        assert outcomes == [True, True, True, False, False, False, False]
        assert impressions.dropped == 40
        assert dropped("queue_full") - before == 40
    finally:
        log.release.set()
        impressions.close()
    written = [row["rec_id"] for batch in log.appended for row in batch]
    assert written == [f"r{n}" for n in range(4) for _ in range(10)]
    assert max(len(batch) for batch in log.appended) <= 15
    # Once the writer caught up, the queue takes responses again.
    assert ImpressionLog(StalledLog(), max_queued_rows=40).add(make_impressions("r8", 10))


def test_a_record_over_the_limit_is_refused_at_write_time_leaving_nothing_torn(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    with FeedbackLog(wal, max_record_bytes=4096) as log:
        with pytest.raises(RecordTooLargeError, match="over the log's limit of 4,096 bytes"):
            log.append("events", make_events("big-", 200))
        huge = make_events("huge-", 1)
        huge[0]["user_id"] = "u" * 100_000  # one row alone over the limit
        with pytest.raises(RecordTooLargeError):
            log.append("events", huge)
        assert not [p for p in wal.iterdir() if p.suffix in (OPEN_SUFFIX, SEALED_SUFFIX)]
        log.append("events", make_events("small-", 3))
    (segment,) = [p for p in wal.iterdir() if p.suffix == SEALED_SUFFIX]
    contents = read_segment(segment.read_bytes())
    assert contents.torn_bytes == 0
    assert sum(batch.num_rows for batch in contents.batches["events"]) == 3
    result = compact_feedback(wal, lake)
    assert result.events == 3 and result.torn_bytes == 0
    with pytest.raises(ValueError, match="max_record_bytes"):
        FeedbackLog(wal, max_record_bytes=2 << 30)


def test_impressions_are_cut_to_fit_the_record_limit_and_an_oversized_row_is_dropped(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    before = dropped("too_large")
    rows = make_impressions("r1", 60)
    rows[17]["user_id"] = "u" * 20_000  # over the limit on its own
    with FeedbackLog(wal, max_record_bytes=8192) as log:
        impressions = ImpressionLog(log, max_batch_rows=1000)
        assert impressions.add(rows)
        impressions.close()
    compact_feedback(wal, lake)
    logged = lake_rows(lake, IMPRESSIONS, "position")
    assert sorted(row["position"] for row in logged) == [p for p in range(60) if p != 17]
    assert impressions.dropped == 1 and dropped("too_large") - before == 1


def test_a_responses_shown_items_become_one_impression_row_per_item(tmp_path):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    shown_at = datetime(2026, 11, 2, 23, 59, 59, 999_999, tzinfo=UTC)
    first = ShownItems(
        rec_id="r1",
        shown_at=shown_at,
        user_id="u1",
        item_ids=["i7", "i3", "i9"],
        model_versions=["ranker:a", "ranker:b", "ranker:a"],
        strategy="recommend:ranker",
        fallback_level=0,
        experiment="e1",
        arm="blend",
        drafted_by=["control", "treatment", "control"],
    )
    second = ShownItems(
        "r2", shown_at, "u2", ["i1"], [None], "similar:popular", 3, None, None, [None]
    )
    with FeedbackLog(wal) as log:
        impressions = ImpressionLog(log, max_batch_rows=2)  # cut inside the first response
        assert impressions.add(first) and impressions.add(second)
        impressions.close()
    compact_feedback(wal, lake)
    logged = sorted(
        lake_rows(lake, IMPRESSIONS, "rec_id"), key=lambda row: (row["rec_id"], row["position"])
    )
    assert [
        (row["rec_id"], row["position"], row["item_id"], row["model_version"], row["drafted_by"])
        for row in logged
    ] == [
        ("r1", 1, "i7", "ranker:a", "control"),
        ("r1", 2, "i3", "ranker:b", "treatment"),
        ("r1", 3, "i9", "ranker:a", "control"),
        ("r2", 1, "i1", None, None),
    ]
    assert {row["shown_at"].astimezone(UTC) for row in logged} == {shown_at}  # to the microsecond
    assert [(row["user_id"], row["strategy"], row["fallback_level"]) for row in logged] == [
        ("u1", "recommend:ranker", 0)
    ] * 3 + [("u2", "similar:popular", 3)]
    assert [(row["experiment"], row["arm"]) for row in logged] == [("e1", "blend")] * 3 + [
        (None, None)
    ]


class GatedLog:
    """A real feedback log whose first append waits until released (and, with `gate_second`, the
    second one until `release_second`); records every append's size."""

    def __init__(self, log: FeedbackLog, gate_second: bool = False) -> None:
        self.log = log
        self.release, self.release_second = threading.Event(), threading.Event()
        self.entered, self.entered_second = threading.Event(), threading.Event()
        self.gate_second = gate_second
        self.sizes: list[int] = []

    def append_columns(self, stream: str, columns: dict[str, list], rows: int) -> None:
        if not self.entered.is_set():
            self.entered.set()
            assert self.release.wait(10)
        elif self.gate_second and not self.entered_second.is_set():
            self.entered_second.set()
            assert self.release_second.wait(10)
        self.sizes.append(rows)
        self.log.append_columns(stream, columns, rows)


@pytest.mark.parametrize(
    ("responses", "max_batch_rows", "sizes"),
    [
        (10, 1000, [30, 30, 30, 10]),  # a short queue: appends of `append_rows`
        (40, 1000, [100, 100, 100, 100]),  # a long one: `max_appends_per_flush` larger appends
        (40, 80, [80, 80, 80, 80, 80]),  # never over `max_batch_rows`
    ],
)
def test_the_writer_appends_in_small_appends_and_in_few_larger_ones_when_behind(
    tmp_path, responses, max_batch_rows, sizes
):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    with FeedbackLog(wal) as log:
        gated = GatedLog(log)
        impressions = ImpressionLog(
            gated, max_batch_rows=max_batch_rows, append_rows=30, max_appends_per_flush=4
        )
        assert impressions.add(make_impressions("r00", 10))
        assert gated.entered.wait(10)  # the writer holds r00 in its append
        for n in range(1, responses + 1):  # queued meanwhile: the next flush's backlog
            assert impressions.add(make_impressions(f"r{n:02d}", 10))
        gated.release.set()
        impressions.close()
    assert gated.sizes == [10, *sizes]
    compact_feedback(wal, lake)
    logged = lake_rows(lake, IMPRESSIONS, "rec_id")
    assert [row["rec_id"] for row in logged] == [
        f"r{n:02d}" for n in range(responses + 1) for _ in range(10)
    ]


def test_rows_queued_during_a_flush_wait_for_the_next_which_sizes_its_appends_by_them(tmp_path):
    with FeedbackLog(tmp_path / "wal") as log:
        gated = GatedLog(log, gate_second=True)
        impressions = ImpressionLog(
            gated, max_batch_rows=1000, append_rows=30, max_appends_per_flush=4
        )
        assert impressions.add(make_impressions("r00", 10))
        assert gated.entered.wait(10)
        for n in range(1, 11):  # the second flush's backlog: 100 rows
            assert impressions.add(make_impressions(f"r{n:02d}", 10))
        gated.release.set()
        assert gated.entered_second.wait(10)  # the second flush's first append of 30
        for n in range(11, 51):  # 400 rows more, queued while that flush runs
            assert impressions.add(make_impressions(f"r{n:02d}", 10))
        gated.release_second.set()
        deadline = time.monotonic() + 10
        while sum(gated.sizes) < 110 and time.monotonic() < deadline:  # the second flush's end
            time.sleep(0.01)
        impressions.close()
    # The second flush appends its own 100 rows; the 400 that came meanwhile go in 4 appends of
    # 100, not in a dozen more appends of 30.
    assert gated.sizes == [10, 30, 30, 30, 10, 100, 100, 100, 100]
