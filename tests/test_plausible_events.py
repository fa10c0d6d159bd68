"""Implausible events (dated before the earliest plausible time, prices that are not finite or
absurd) never reach `events/`: landing validation rejects them with a reason, the earliest time is
configurable for ingestion, and compaction of the service's log quarantines them."""

import math
from datetime import UTC, datetime, timedelta, timezone

import dagster as dg
import pytest

from orchestration.assets.lake import raw_events
from orchestration.resources import ShelfwiseResource
from shelfwise.contracts import DEFAULT_EARLIEST_EVENT_AT, MAX_PRICE, PRICE_REASON, parse_earliest
from shelfwise.home import prepare_home
from shelfwise.intake.ingest import ingest_landing
from shelfwise.lake import (
    EVENTS,
    LANDING_EVENTS,
    STOCK_UPDATES,
    Lake,
    dataset_file,
    partition_day,
    quarantine_file,
    quarantine_folder,
)
from shelfwise.runtime.feedback import FeedbackLog, compact_feedback
from shelfwise.settings import Settings
from tests.test_feedback_log import make_events
from tests.test_lake_and_ingest import event, events_table

NOW = datetime(2026, 5, 10, 12, tzinfo=UTC)
YEAR_1 = datetime(1, 1, 1, tzinfo=UTC)
EARLY = "occurred_at is before 2000-01-01T00:00:00+00:00"


def test_landing_rejects_events_before_the_earliest_time_and_absurd_prices(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    day = NOW - timedelta(days=1)
    rows = [
        event("ok", day),
        event("at-earliest", DEFAULT_EARLIEST_EVENT_AT),
        event("max-price", day, price=MAX_PRICE),
        event("no-price", day, price=None),
        event("year-1", datetime(1, 1, 1, tzinfo=UTC)),
        event("epoch", datetime(1970, 1, 1, tzinfo=UTC)),
        event("nan", day, price=math.nan),
        event("inf", day, price=math.inf),
        event("minus-inf", day, price=-math.inf),
        event("huge", day, price=1e308),
        event("both", datetime(1999, 12, 31, 23, 59, tzinfo=UTC), price=math.inf),
    ]
    lake.write_parquet(events_table(rows), dataset_file(LANDING_EVENTS, "implausible"))

    report = ingest_landing(lake, now=NOW, max_invalid_share=1.0)

    assert (report.events_landed, report.events_quarantined) == (4, 7)
    landed = lake.read_frame(EVENTS)
    assert sorted(landed.get_column("event_id")) == ["at-earliest", "max-price", "no-price", "ok"]
    assert sorted({partition_day(f) for f in lake.list_files(EVENTS)}) == [
        "2000-01-01",
        str(day.date()),
    ]
    reasons = {
        event_id: set(reason.split("; "))
        for event_id, reason in lake.read_frame(quarantine_file(EVENTS, "implausible"))
        .select("event_id", "reason")
        .rows()
    }
    assert reasons == {
        "year-1": {EARLY},
        "epoch": {EARLY},
        "nan": {PRICE_REASON},
        "inf": {PRICE_REASON},
        "minus-inf": {PRICE_REASON},
        "huge": {PRICE_REASON},
        "both": {PRICE_REASON, EARLY},
    }
    # Each rule shows in the metadata, also the second one of its type on a column.
    assert report.expectations[f"expect_column_values_to_be_between(price): {PRICE_REASON}"] == {
        "success": False,
        "rejected_rows": 5,
    }


def test_the_earliest_time_is_configurable_for_ingestion(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    rows = [event("2015", datetime(2015, 6, 1, tzinfo=UTC)), event("2021", datetime(2021, 1, 1))]
    lake.write_parquet(events_table(rows), dataset_file(LANDING_EVENTS, "old-shop"))
    report = ingest_landing(
        lake, now=NOW, max_invalid_share=1.0, earliest=parse_earliest("2020-01-01")
    )
    assert report.events_landed == 1
    [(event_id, reason)] = (
        lake.read_frame(quarantine_file(EVENTS, "old-shop")).select("event_id", "reason").rows()
    )
    assert (event_id, reason) == ("2015", "occurred_at is before 2020-01-01T00:00:00+00:00")


def test_parse_earliest_takes_iso_dates_and_times_utc_when_naive():
    assert parse_earliest("2000-01-01") == DEFAULT_EARLIEST_EVENT_AT
    assert parse_earliest("2015-06-01T06:00") == datetime(2015, 6, 1, 6, tzinfo=UTC)
    aware = parse_earliest("2015-06-01T00:00:00+02:00")
    assert aware == datetime(2015, 6, 1, tzinfo=timezone(timedelta(hours=2)))
    with pytest.raises(ValueError):
        parse_earliest("last year")


def test_raw_events_takes_the_earliest_time_from_its_config(tmp_path):
    settings = Settings.from_env({"SHELFWISE_HOME": str(tmp_path)})
    prepare_home(settings)
    lake = Lake(settings.lake_url)
    rows = [event("2015", datetime(2015, 6, 1, tzinfo=UTC)), event("2025", datetime(2025, 1, 1))]
    lake.write_parquet(events_table(rows), dataset_file(LANDING_EVENTS, "old-shop"))
    config = {
        "max_invalid_share": 1.0,
        "earliest_event_at": "2020-01-01",
    }
    result = dg.materialize(
        [raw_events],
        resources={
            "shelfwise": ShelfwiseResource(home=str(settings.home), lake_url=settings.lake_url)
        },
        run_config={"ops": {"raw_events": {"config": config}}},
    )
    assert result.success
    assert lake.read_frame(EVENTS).get_column("event_id").to_list() == ["2025"]


def test_compaction_quarantines_implausible_rows_of_the_log_instead_of_absurd_partitions(
    tmp_path,
):
    wal, lake = tmp_path / "wal", Lake(str(tmp_path / "lake"))
    good = make_events("ok-", 3)
    bad = make_events("bad-", 4)
    bad[0]["occurred_at"] = datetime(1, 1, 1, tzinfo=UTC)
    bad[1]["occurred_at"] = datetime(1970, 1, 1, tzinfo=UTC)
    bad[2]["price"] = math.inf
    bad[3]["price"] = math.nan
    with FeedbackLog(wal) as log:  # a log written by a service that let them through
        log.append("events", good + bad)
        log.append(
            STOCK_UPDATES,
            [
                {
                    "item_id": "i1",
                    "is_in_stock": False,
                    "updated_at": datetime(1, 1, 1, tzinfo=UTC),
                },
                {"item_id": "i2", "is_in_stock": False, "updated_at": NOW},
            ],
        )

    result = compact_feedback(wal, lake)

    assert result.events == 3 and result.quarantined == {
        "events": 4,
        "impressions": 0,
        "stock_updates": 1,
        "feature_samples": 0,
    }
    partitions = {
        partition_day(f) for f in lake.list_files(EVENTS) + lake.list_files(STOCK_UPDATES)
    }
    assert all(p >= "2000-01-01" for p in partitions)
    assert sorted(lake.read_frame(EVENTS).get_column("event_id")) == ["ok-0", "ok-1", "ok-2"]
    [quarantined] = lake.list_files(quarantine_folder(EVENTS))
    assert quarantined.rsplit("/", 1)[1].startswith("wal-")
    reasons = dict(lake.read_frame(quarantined).select("event_id", "reason").rows())
    assert reasons == {"bad-0": EARLY, "bad-1": EARLY, "bad-2": PRICE_REASON, "bad-3": PRICE_REASON}
    assert lake.read_frame("quarantine/stock_updates").get_column("item_id").to_list() == ["i1"]
    # A later earliest time, as raw_events passes its configuration.
    with FeedbackLog(wal) as log:
        log.append("events", make_events("late-", 2, start=datetime(2010, 1, 1, tzinfo=UTC)))
    assert (
        compact_feedback(wal, lake, earliest=parse_earliest("2015-01-01")).quarantined["events"]
        == 2
    )
