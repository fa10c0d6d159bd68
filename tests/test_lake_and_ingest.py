import os
from datetime import UTC, datetime, timedelta

import polars as pl
import pyarrow as pa
import pytest

from shelfwise.contracts import (
    EVENT_TYPES,
    EVENTS_SCHEMA,
    GUEST_REASON,
    RETURN_REASON,
    STOCK_UPDATES_SCHEMA,
    ContractError,
    conform,
)
from shelfwise.home import prepare_home
from shelfwise.intake.ingest import ingest_landing, ingested_dates, lake_has_events
from shelfwise.lake import (
    EVALUATION_REPORT,
    EVENTS,
    ITEMS,
    LANDING_EVENTS,
    LANDING_ITEMS,
    LANDING_USERS,
    SERVING,
    STOCK_UPDATES,
    Lake,
    catalog_file,
    dataset_file,
    feature_table,
    partition_file,
    quarantine_file,
)
from shelfwise.settings import Settings

NOW = datetime(2026, 5, 10, 12, tzinfo=UTC)


def events_table(rows):
    """Rows in the events contract; required columns relaxed where a row leaves them empty."""
    columns = [field.name for field in EVENTS_SCHEMA]
    data = {name: [row.get(name) for row in rows] for name in columns}
    schema = pa.schema([f.with_nullable(f.nullable or None in data[f.name]) for f in EVENTS_SCHEMA])
    return pa.table(data, schema=schema) if rows else None


def event(event_id, when, **overrides):
    return {
        "event_id": event_id,
        "occurred_at": when,
        "user_id": "u1",
        "session_id": "s1",
        "item_id": "i1",
        "event_type": "view",
        "quantity": 1,
        "price": 9.5,
        "rec_id": None,
        "source": "test",
        **overrides,
    }


def test_conform_names_the_missing_column_and_the_file():
    table = pa.table({"event_id": ["e1"], "user_id": ["u1"]})
    with pytest.raises(ContractError, match=r"batch-7\.parquet: required column 'occurred_at'"):
        conform(table, EVENTS_SCHEMA, source="batch-7.parquet")


def test_conform_names_a_column_that_cannot_be_cast():
    rows = events_table([event("e1", NOW)]).to_pylist()
    table = pa.Table.from_pylist([{**rows[0], "quantity": "lots"}])
    with pytest.raises(ContractError, match="column 'quantity'"):
        conform(table, EVENTS_SCHEMA, source="x.parquet")


def test_conform_adds_missing_optional_columns_and_makes_naive_timestamps_utc():
    table = pa.table(
        {
            "event_id": ["e1"],
            "occurred_at": pa.array([datetime(2026, 5, 1, 8)], pa.timestamp("ms")),
            "user_id": ["u1"],
            "session_id": ["s1"],
            "item_id": [7],
            "event_type": ["view"],
            "quantity": [1],
            "source": ["csv"],
        }
    )
    conformed = conform(table, EVENTS_SCHEMA, source="t")
    assert conformed.schema.field("occurred_at").type == pa.timestamp("us", tz="UTC")
    assert conformed.column("item_id").to_pylist() == ["7"]
    assert conformed.column("rec_id").null_count == 1


def test_ingestion_partitions_by_date_and_quarantines_bad_rows_with_reasons(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    day1, day2 = NOW - timedelta(days=2), NOW - timedelta(days=1)
    rows = [
        event("e1", day1),
        event("e2", day2, event_type="purchase"),
        event("e2", day2, event_type="purchase"),  # the same delivery twice: collapsed
        event("e3", day2, event_type="teleport"),
        event("e4", day2, price=-1.0),
        event("e5", NOW + timedelta(days=1)),
        event("e6", day1),
        event("e6", day2),  # one event_id, two different rows: both rejected
    ]
    lake.write_parquet(events_table(rows), dataset_file(LANDING_EVENTS, "batch-1"))
    report = ingest_landing(lake, now=NOW, max_invalid_share=1.0)
    assert (report.events_landed, report.events_quarantined) == (2, 5)
    assert report.duplicates_collapsed == 1
    assert report.quarantined_share == pytest.approx(5 / 7)
    assert lake.list_files(EVENTS) == [
        partition_file(EVENTS, "2026-05-08", "batch-1"),
        partition_file(EVENTS, "2026-05-09", "batch-1"),
    ]
    assert ingested_dates(lake) == [day1.date(), day2.date()]
    landed = lake.read_frame(EVENTS)
    assert sorted(landed.get_column("event_id").to_list()) == ["e1", "e2"]
    quarantined = dict(
        lake.read_frame(quarantine_file(EVENTS, "batch-1")).select("event_id", "reason").rows()
    )
    assert quarantined["e3"].startswith("event_type not in")
    assert quarantined["e4"] == "price is negative"
    assert quarantined["e5"] == "occurred_at is in the future"
    assert quarantined["e6"] == "event_id shared by different rows in the batch"
    assert lake.list_files("landing") == []
    assert report.expectations["expect_column_values_to_be_in_set(event_type)"] == {
        "success": False,
        "rejected_rows": 1,
    }


def broken_batch(n_rows: int, n_broken: int) -> pa.Table:
    rows = [event(f"e{i}", NOW - timedelta(hours=1)) for i in range(n_rows - n_broken)]
    rows += [event(f"bad{i}", NOW - timedelta(hours=1), quantity=-1) for i in range(n_broken)]
    return events_table(rows)


def test_a_batch_within_the_threshold_lands_its_valid_rows(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_parquet(broken_batch(100, 5), dataset_file(LANDING_EVENTS, "five-percent"))
    report = ingest_landing(lake, now=NOW, max_invalid_share=0.10)
    assert (report.events_landed, report.events_quarantined, report.held) == (95, 5, [])
    assert lake.read_frame(EVENTS).height == 95
    reasons = lake.read_frame(quarantine_file(EVENTS, "five-percent")).get_column("reason")
    assert reasons.to_list() == ["quantity is negative"] * 5


def test_a_batch_above_the_threshold_is_held_in_landing_and_publishes_nothing(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    lake.write_parquet(broken_batch(100, 30), dataset_file(LANDING_EVENTS, "thirty-percent"))
    report = ingest_landing(lake, now=NOW, max_invalid_share=0.10)
    [held] = report.held
    assert held.path == dataset_file(LANDING_EVENTS, "thirty-percent")
    assert held.invalid_share == pytest.approx(0.30)
    assert held.reasons == ["quantity is negative"]
    assert report.events_landed == 0 and lake.list_files(EVENTS) == []
    assert lake.list_files("landing") == [dataset_file(LANDING_EVENTS, "thirty-percent")]
    assert lake.read_frame(quarantine_file(EVENTS, "thirty-percent")).height == 30
    # The default threshold (1%) holds even the 5% batch.
    lake.write_parquet(broken_batch(100, 5), dataset_file(LANDING_EVENTS, "five-percent"))
    assert len(ingest_landing(lake, now=NOW).held) == 2


def test_guest_checkouts_and_returns_are_set_aside_and_never_count_as_invalid(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    hour_ago = NOW - timedelta(hours=1)
    rows = [event(f"e{i}", hour_ago, event_type="purchase") for i in range(60)]
    rows += [event(f"guest{i}", hour_ago, user_id=None, session_id=None) for i in range(30)]
    rows += [event(f"return{i}", hour_ago, event_type="purchase", quantity=-2) for i in range(9)]
    rows += [event("bad", hour_ago, event_type="teleport")]  # corruption: 2 of 62 judged rows
    rows += [event("minus", hour_ago, quantity=-1)]  # a negative view is no return: corruption
    lake.write_parquet(events_table(rows), dataset_file(LANDING_EVENTS, "orders"))
    report = ingest_landing(lake, now=NOW, max_invalid_share=0.04)
    assert report.held == []
    assert (report.events_landed, report.events_quarantined, report.events_set_aside) == (60, 2, 39)
    assert report.set_aside_by_reason == {GUEST_REASON: 30, RETURN_REASON: 9}
    reasons = lake.read_frame(quarantine_file(EVENTS, "orders")).get_column("reason")
    assert sorted(reasons.value_counts().rows()) == sorted(
        [
            (GUEST_REASON, 30),
            (RETURN_REASON, 9),
            (f"event_type not in {list(EVENT_TYPES)}", 1),
            ("quantity is negative", 1),
        ]
    )


def test_a_held_delivery_says_why_and_how_to_go_on_and_holds_its_catalog(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    hour_ago = NOW - timedelta(hours=1)
    rows = [event(f"e{i}", hour_ago) for i in range(95)]
    rows += [event(f"late{i}", NOW + timedelta(days=2)) for i in range(4)]
    rows += [event("mistyped", hour_ago, event_type="teleport")]
    prefix = "import-generic-orders-0a1b2c3d"
    lake.write_parquet(events_table(rows), dataset_file(LANDING_EVENTS, f"{prefix}-b00000"))
    item = {"item_id": "i1", "category_id": "c1", "is_in_stock": True, "title": "Mug"}
    lake.write_parquet(pa.Table.from_pylist([item]), dataset_file(LANDING_ITEMS, f"{prefix}-items"))
    lake.write_parquet(
        pa.Table.from_pylist([{"user_id": "u1"}]), dataset_file(LANDING_USERS, f"{prefix}-users")
    )

    report = ingest_landing(lake, now=NOW)
    [held] = report.held
    assert held.invalid_share == pytest.approx(0.05) and held.rows_judged == 100
    assert [(r.reason, r.rows) for r in held.top_reasons] == [
        ("occurred_at is in the future", 4),
        (f"event_type not in {list(EVENT_TYPES)}", 1),
    ]
    assert held.top_reasons[0].example["event_id"] == "late0"
    assert held.command == "make pipeline MAX_INVALID_SHARE=0.05"
    message = held.message()
    batch = dataset_file(LANDING_EVENTS, f"{prefix}-b00000")
    assert f"{batch}: held, 5.0% of 100 rows invalid" in message
    assert "occurred_at is in the future: 4 rows, e.g. event_id=late0" in message
    assert message.rstrip().endswith("make pipeline MAX_INVALID_SHARE=0.05")
    # All or nothing: the delivery's catalog rows wait with its events.
    assert report.catalog_files_held == 2 and report.items_upserted == 0
    assert not lake.exists(catalog_file(ITEMS))
    assert len(lake.list_files("landing")) == 3

    report = ingest_landing(lake, now=NOW, max_invalid_share=held.accepting_share)
    assert (report.held, report.events_landed, report.items_upserted) == ([], 95, 1)
    assert lake.list_files("landing") == []


def test_a_delivery_that_leaves_an_attribute_empty_keeps_the_catalogs_value(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    first = {"item_id": "i1", "title": "Mug", "category_id": "c1", "price": 3.5}
    lake.write_parquet(
        pa.Table.from_pylist([{**first, "is_in_stock": True, "is_recommendable": False}]),
        dataset_file(LANDING_ITEMS, "shop"),
    )
    ingest_landing(lake, now=NOW)
    # An events-only import describes the item with a placeholder category and nothing else.
    placeholder = {"item_id": "i1", "category_id": "unknown", "is_in_stock": True, "price": 4.0}
    lake.write_parquet(
        pa.Table.from_pylist([placeholder]), dataset_file(LANDING_ITEMS, "events-only")
    )
    ingest_landing(lake, now=NOW)
    [row] = lake.read_frame(ITEMS).rows(named=True)
    assert (row["title"], row["category_id"], row["price"]) == ("Mug", "c1", 4.0)
    assert row["is_recommendable"] is False


def test_ingesting_the_same_delivery_twice_adds_nothing(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    table = events_table(
        [event("e1", NOW - timedelta(hours=3)), event("e2", NOW - timedelta(hours=2))]
    )
    lake.write_parquet(table, dataset_file(LANDING_EVENTS, "delivery"))
    ingest_landing(lake, now=NOW)
    lake.write_parquet(table, dataset_file(LANDING_EVENTS, "delivery"))
    ingest_landing(lake, now=NOW)
    assert lake.read_frame(EVENTS).height == 2


def test_a_new_day_is_ingested_without_rewriting_history(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    history = events_table(
        [event(f"h{i}", NOW - timedelta(days=2, hours=10 * i)) for i in range(3)]
    )
    lake.write_parquet(history, dataset_file(LANDING_EVENTS, "history"))
    first = ingest_landing(lake, now=NOW)
    assert first.rows_by_date == {"2026-05-07": 1, "2026-05-08": 2}
    published = lake.list_modified(EVENTS)

    today = events_table([event("t1", NOW - timedelta(hours=1))])
    lake.write_parquet(today, dataset_file(LANDING_EVENTS, "today"))
    second = ingest_landing(lake, now=NOW)
    assert second.rows_by_date == {"2026-05-10": 1}
    after = lake.list_modified(EVENTS)
    # The earlier days' files are untouched (same names, same modification times).
    assert {path: after[path] for path in published} == published
    assert sorted(set(after) - set(published)) == [partition_file(EVENTS, "2026-05-10", "today")]
    assert lake.read_frame(EVENTS).height == 4


def test_catalog_deliveries_are_upserted_by_key(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    base = {
        "title": "t",
        "category_id": "c1",
        "category_path": "A > B",
        "brand": "b",
        "created_at": NOW,
    }
    lake.write_parquet(
        pa.Table.from_pylist(
            [
                {**base, "item_id": "i1", "price": 5.0, "is_in_stock": True},
                {**base, "item_id": "i2", "price": 6.0, "is_in_stock": True},
            ]
        ),
        dataset_file(LANDING_ITEMS, "first"),
    )
    ingest_landing(lake, now=NOW)
    lake.write_parquet(
        pa.Table.from_pylist(
            [
                {**base, "item_id": "i2", "price": 7.0, "is_in_stock": False},
                {**base, "item_id": None, "price": 1.0, "is_in_stock": True},
            ]
        ),
        dataset_file(LANDING_ITEMS, "second"),
    )
    report = ingest_landing(lake, now=NOW)
    catalog = lake.read_frame(ITEMS).sort("item_id")
    assert catalog.select("item_id", "price", "is_in_stock").rows() == [
        ("i1", 5.0, True),
        ("i2", 7.0, False),
    ]
    assert report.catalog_rows_quarantined == 1
    assert lake.read_frame(quarantine_file(ITEMS, "second")).get_column("reason")[0] == (
        "item_id is null"
    )


def test_lake_writes_are_atomic_and_listed_relative_to_the_root(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    assert not lake_has_events(lake)
    written = partition_file(EVENTS, "2026-01-01", "a")
    lake.write_parquet(pa.table({"x": [1]}), written)
    lake.write_json({"a": 1}, EVALUATION_REPORT)
    assert lake.list_files(EVENTS) == [written]
    assert lake.read_json(EVALUATION_REPORT) == {"a": 1}
    assert not [p for p in (tmp_path / "lake").rglob("_tmp-*")]
    assert lake_has_events(lake)
    with pytest.raises(FileNotFoundError, match="nothing in the lake"):
        lake.read_table(feature_table("missing"))
    assert isinstance(lake.read_frame(EVENTS), pl.DataFrame)


def check_streamed_parquet(lake: Lake, leftovers) -> None:
    """Shared by the local and the S3 test: streamed writes, batched reads, atomicity."""
    big, cast_file = dataset_file(SERVING, "big"), dataset_file(SERVING, "cast")
    empty, nothing = dataset_file(SERVING, "empty"), dataset_file(SERVING, "nothing")
    tables = [pa.table({"k": [i, i], "v": [0.5 * i, 1.0]}) for i in range(5)]
    assert lake.write_parquet_tables(iter(tables), big) == 10
    assert lake.read_table(big).equals(pa.concat_tables(tables))
    batches = list(lake.iter_parquet(big, batch_rows=3, columns=["k"]))
    assert max(batch.num_rows for batch in batches) <= 3
    assert pa.concat_tables(batches).column("k").to_pylist() == [i for i in range(5) for _ in "ab"]
    # A table that can be cast to the schema is cast; nothing at all needs a schema.
    cast = pa.table({"k": pa.array([9], pa.int32()), "v": [9.0]})
    assert lake.write_parquet_tables([tables[0], cast], cast_file) == 3
    assert lake.read_table(cast_file).schema == tables[0].schema
    schema = pa.schema({"k": pa.int64()})
    assert lake.write_parquet_tables([], empty, schema=schema) == 0
    assert lake.read_table(empty).schema == schema
    with pytest.raises(ValueError, match="no table and no schema"):
        lake.write_parquet_tables([], nothing)
    assert not lake.exists(nothing)

    # A failure half-way leaves the previous file as it was, and no temporary file.
    def failing():
        yield pa.table({"k": [7], "v": [7.0]})
        raise RuntimeError("the generator failed")

    with pytest.raises(RuntimeError, match="the generator failed"):
        lake.write_parquet_tables(failing(), big)
    assert lake.read_table(big).num_rows == 10
    assert leftovers() == []


def test_parquet_streams_are_written_atomically_and_read_in_batches(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    check_streamed_parquet(lake, lambda: list((tmp_path / "lake").rglob("_tmp-*")))


def test_settings_default_to_data_and_prepare_home_turns_dagster_telemetry_off(tmp_path):
    settings = Settings.from_env({"SHELFWISE_HOME": str(tmp_path / "home")})
    assert settings.home == (tmp_path / "home").resolve()
    assert settings.lake_url == str(settings.home / "lake")
    assert settings.dagster_home == settings.home / "dagster"
    assert settings.api_token is None
    prepare_home(settings)
    assert "enabled: false" in (settings.dagster_home / "dagster.yaml").read_text()
    assert (settings.home / "lake" / "features").is_dir()
    assert Settings.from_env({}).home.name == "data"
    custom = Settings.from_env({"SHELFWISE_HOME": "x", "SHELFWISE_LAKE": "s3://b/p"})
    assert custom.lake_url == "s3://b/p"


def test_the_newest_word_on_stock_wins_between_catalog_deliveries_and_service_updates(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    catalog = pa.table(
        {"item_id": ["i1", "i2", "i3"], "category_id": ["c"] * 3, "is_in_stock": [True] * 3}
    )

    def deliver(name: str, at: datetime) -> None:
        # A delivery without stock times is as of when it landed (the file's modification time).
        delivery = dataset_file(LANDING_ITEMS, name)
        lake.write_parquet(catalog, delivery)
        os.utime(lake.path(delivery), (at.timestamp(),) * 2)

    def stock() -> dict[str, tuple[bool, datetime]]:
        rows = lake.read_frame(ITEMS).select("item_id", "is_in_stock", "stock_updated_at")
        return {item: (in_stock, at) for item, in_stock, at in rows.rows()}

    deliver("monday", NOW - timedelta(days=1))
    assert ingest_landing(lake, now=NOW).stock_overrides == 0
    assert stock()["i1"] == (True, NOW - timedelta(days=1))
    updates = [
        {"item_id": "i1", "is_in_stock": False, "updated_at": NOW - timedelta(hours=2)},
        {"item_id": "i1", "is_in_stock": True, "updated_at": NOW - timedelta(hours=3)},
        {"item_id": "i2", "is_in_stock": True, "updated_at": NOW - timedelta(hours=1)},
        {"item_id": "i3", "is_in_stock": False, "updated_at": NOW - timedelta(days=2)},
        {"item_id": "unknown", "is_in_stock": False, "updated_at": NOW},
    ]
    lake.write_parquet(
        pa.Table.from_pylist(updates, schema=STOCK_UPDATES_SCHEMA),
        partition_file(STOCK_UPDATES, "2026-05-10", "wal-a"),
    )
    # i1's latest update sells it out; i2's keeps it in stock (a newer time, the same answer);
    # i3's is older than the delivery; an unknown item is no catalog row. Applied once only.
    assert ingest_landing(lake, now=NOW).stock_overrides == 1
    assert stock() == {
        "i1": (False, NOW - timedelta(hours=2)),
        "i2": (True, NOW - timedelta(hours=1)),
        "i3": (True, NOW - timedelta(days=1)),
    }
    assert ingest_landing(lake, now=NOW).stock_overrides == 0

    # A catalog delivered late, older than the updates, does not undo them; one delivered after
    # them wins (restocked).
    deliver("tuesday-late", NOW - timedelta(hours=4))
    assert ingest_landing(lake, now=NOW).stock_overrides == 1  # i1 sold out again
    assert stock()["i1"] == (False, NOW - timedelta(hours=2))
    deliver("tuesday", NOW)
    assert ingest_landing(lake, now=NOW).stock_overrides == 0
    assert stock()["i1"] == (True, NOW)


def test_a_catalog_published_before_stock_times_gets_the_column(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    old = pa.table({"item_id": ["i1"], "category_id": ["c"], "is_in_stock": [True]})
    lake.write_parquet(old, catalog_file(ITEMS))
    ingest_landing(lake, now=NOW)
    catalog = lake.read_table(catalog_file(ITEMS))
    assert "stock_updated_at" in catalog.schema.names
    assert catalog.num_rows == 1
