"""Importers: real-data formats into contract-valid landing files (hand-made fixtures plus the
shared YooChoose sample), idempotent re-imports, streaming, and clear errors."""

import gzip
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest

from shelfwise import cli
from shelfwise import lake as paths
from shelfwise.contracts import (
    EVENTS_SCHEMA,
    GUEST_REASON,
    ITEMS_SCHEMA,
    RETURN_REASON,
    USERS_SCHEMA,
    ContractError,
    conform,
)
from shelfwise.intake.importers import import_file, import_files, normalize_ids
from shelfwise.intake.ingest import ingest_landing
from shelfwise.lake import Lake

FIXTURES = Path(__file__).parent / "fixtures" / "importers"
RETAILROCKET = [
    str(FIXTURES / "retailrocket" / name)
    for name in (
        "events.csv",
        "item_properties_part1.csv",
        "item_properties_part2.csv",
        "category_tree.csv",
    )
]
REES46 = str(FIXTURES / "rees46" / "2019-Oct-sample.csv")
GENERIC = str(FIXTURES / "generic" / "clicks.csv")
GENERIC_MAPPING = {
    "user_id": "visitor",
    "item_id": "product",
    "occurred_at": "ts",
    "event_type": "action",
    "quantity": "qty",
    "price": "amount",
}
YOOCHOOSE_TEST = Path("/work/shared/datasets/yoochoose_rsc15_sample/yoochoose-clicks-100k_test.txt")
NOW = datetime(2026, 5, 10, tzinfo=UTC)


def landing(lake: Lake, folder: str = paths.LANDING_EVENTS) -> pl.DataFrame:
    """Every landing file of a folder, in name order, checked against its contract."""
    schema = {
        paths.LANDING_EVENTS: EVENTS_SCHEMA,
        paths.LANDING_ITEMS: ITEMS_SCHEMA,
        paths.LANDING_USERS: USERS_SCHEMA,
    }[folder]
    frames = []
    for relpath in lake.list_files(folder):
        table = lake.read_table(relpath)
        conformed = conform(table, schema, source=relpath)
        assert table.schema.names == schema.names
        assert [f.type for f in table.schema] == [f.type for f in schema]
        assert all(conformed.column(n).equals(table.column(n)) for n in schema.names)
        frames.append(pl.from_arrow(conformed))
    return pl.concat(frames)


def utc(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=UTC)


def test_generic_maps_columns_time_zones_event_types_and_defaults(tmp_path):
    lake = Lake(str(tmp_path))
    report = import_file(
        lake,
        GENERIC,
        "generic",
        mapping=GENERIC_MAPPING,
        event_types={"checkout": "purchase"},
        timezone="Europe/Berlin",
    )
    events = landing(lake)
    assert report.rows_read == 24 and report.rows_malformed == 1
    assert "v4;012;2024-06-03 09:00:00;view;1;1;c;extra" in report.malformed_rows[0]
    assert report.events_written == events.height == 23
    assert report.unknown_event_types == {"wishlist": 1}
    assert report.unreadable_values == {"occurred_at": 1, "quantity": 1}
    rows = events.rows(named=True)
    # Naive times are Berlin time: CET before the DST switch, CEST after it.
    assert rows[0]["occurred_at"] == utc(2024, 3, 30, 22, 30)
    assert rows[1]["occurred_at"] == utc(2024, 3, 31, 1, 15)
    # An explicit `Z` or offset wins over the time zone option; minutes-only and date-only work.
    assert rows[3]["occurred_at"] == rows[4]["occurred_at"] == utc(2024, 6, 1, 12)
    assert rows[6]["occurred_at"] == utc(2024, 6, 2, 8)
    assert rows[7]["occurred_at"] == utc(2024, 6, 2, 8, 5, 0, 250_000)
    assert rows[8]["occurred_at"] == utc(2024, 6, 2, 22)
    assert rows[5]["occurred_at"] is None  # "yesterday": lands null, ingestion quarantines it
    # Event types: default synonyms, case-insensitive, an explicit mapping, unknown kept raw.
    assert [r["event_type"] for r in rows[:8]] == [
        "view",
        "add_to_cart",
        "purchase",
        "view",
        "wishlist",
        "view",
        "view",
        "view",
    ]
    # Ids stay text (leading zeros kept); quantity defaults to 1, "2.5" is unreadable.
    assert rows[0]["item_id"] == "007" and rows[0]["user_id"] == "v1"
    assert [r["quantity"] for r in rows[:3]] == [1, 2, 2] and rows[7]["quantity"] is None
    assert rows[4]["price"] is None and rows[0]["price"] == 9.99
    assert set(events.get_column("source")) == {"import:generic"}
    assert events.get_column("rec_id").null_count() == events.height
    assert events.get_column("event_id").n_unique() == events.height
    # Sessions were derived (no session column): v4 has a 40-minute pause.
    v4 = events.filter(pl.col("user_id") == "v4").get_column("session_id").to_list()
    assert v4 == ["v4@20240602T220000", "v4@20240603T071000", *["v4@20240603T075000"] * 2]
    items = landing(lake, paths.LANDING_ITEMS)
    assert items.get_column("item_id").to_list() == [f"0{n:02d}" for n in range(7, 16)]
    assert set(items.get_column("category_id")) == {"unknown"}
    assert items.get_column("is_in_stock").all()
    assert landing(lake, paths.LANDING_USERS).get_column("user_id").to_list() == [
        f"v{n}" for n in range(1, 9)
    ]

    report = ingest_landing(lake, now=NOW, max_invalid_share=1.0)
    assert (report.events_landed, report.events_quarantined) == (20, 3)
    quarantined = lake.read_frame(paths.quarantine_folder(paths.EVENTS))
    reasons = dict(zip(quarantined["event_type"], quarantined["reason"], strict=True))
    assert "event_type not in" in reasons["wishlist"]


@pytest.mark.parametrize(("name", "unit"), [("epoch_seconds.csv", "s"), ("epoch_millis.tsv", "ms")])
def test_generic_reads_epoch_seconds_and_milliseconds(tmp_path, name, unit):
    lake = Lake(str(tmp_path))
    mapping = {"user_id": "user", "item_id": "item", "occurred_at": "t"}
    import_file(
        lake,
        str(FIXTURES / "generic" / name),
        "generic",
        mapping=mapping,
        event_type="view",
        timestamp_unit=unit,
    )
    times = landing(lake).get_column("occurred_at").to_list()
    assert times[:2] == [utc(2024, 6, 1, 12), utc(2024, 6, 1, 12, 0, 0, 250_000)]
    assert times[2] == utc(2024, 6, 1, 13, 0, 0, 0 if unit == "s" else 500)
    assert times[3:] == ([None] if unit == "s" else [])


def test_generic_reads_typed_parquet(tmp_path):
    source = tmp_path / "shop.parquet"
    pl.DataFrame(
        {
            "user_id": [7, 8],
            "item_id": [1.0, 2.0],  # what pandas leaves behind for an integer column with gaps
            "occurred_at": [datetime(2024, 1, 15, 10), datetime(2024, 7, 15, 10)],
            "event_type": ["purchase", "cart"],
            "brand": ["acme", None],
        }
    ).write_parquet(source)
    lake = Lake(str(tmp_path / "lake"))
    report = import_file(lake, str(source), "generic", timezone="America/New_York")
    events = landing(lake)
    assert events.get_column("user_id").to_list() == ["7", "8"]
    assert events.get_column("item_id").to_list() == ["1", "2"]
    assert events.get_column("occurred_at").to_list() == [
        utc(2024, 1, 15, 15),
        utc(2024, 7, 15, 14),
    ]
    assert events.get_column("event_type").to_list() == ["purchase", "add_to_cart"]
    items = landing(lake, paths.LANDING_ITEMS)
    assert items.get_column("brand").to_list() == ["acme", None]
    assert report.items_written == 2


def test_retailrocket_derives_sessions_and_reads_item_properties(tmp_path):
    lake = Lake(str(tmp_path))
    report = import_files(lake, RETAILROCKET, "retailrocket")
    events = landing(lake)
    assert report.rows_malformed == 2 and report.events_written == events.height == 28
    assert report.rows_read == 30 + 8 + 4 + 6
    assert report.unknown_event_types == {"wishlist": 1}
    assert report.sessions_derived
    assert events.filter(pl.col("user_id") == "100").sort("occurred_at").select(
        "item_id", "event_type", "session_id"
    ).rows() == [
        ("11", "view", "100@20150602T050000"),
        ("12", "view", "100@20150602T050000"),
        ("13", "view", "100@20150602T050000"),  # exactly 30 minutes later: same session
        ("14", "view", "100@20150602T061100"),  # 31 minutes later (and earlier in the file)
        ("14", "add_to_cart", "100@20150602T061100"),
        ("14", "purchase", "100@20150602T061100"),
    ]
    sessions = events.group_by("user_id").agg(pl.col("session_id").n_unique()).sort("user_id")
    assert dict(sessions.rows()) == {
        "100": 2,
        "200": 3,
        "300": 1,
        "400": 1,
        "600": 1,  # its only event has an unreadable time: no session, quarantined later
        "800": 1,
        "900": 1,
    }
    assert events.filter(pl.col("user_id") == "600").get_column("session_id").to_list() == [None]
    # The exact duplicate row (visitor 800) stays two events.
    assert events.filter(pl.col("user_id") == "800").get_column("event_id").n_unique() == 2
    items = {
        row["item_id"]: row for row in landing(lake, paths.LANDING_ITEMS).iter_rows(named=True)
    }
    assert set(items) == {"11", "12", "13", "14", "15", "16", "17", "18", "19", "99"}
    # Latest value by time, not by file: part2's older categoryid 200 does not win.
    assert (items["11"]["category_id"], items["11"]["category_path"]) == ("1338", "213 > 1338")
    assert (items["12"]["category_path"], items["12"]["is_in_stock"]) == ("250 > 809", False)
    assert (items["13"]["category_id"], items["13"]["is_in_stock"]) == ("unknown", True)
    assert items["99"]["category_path"] == "213 > 1016"
    assert items["14"]["category_id"] == "unknown" and items["14"]["is_in_stock"]
    # The stock is as of its `available` row (1433826000000 ms); without one, ingestion dates it.
    assert items["12"]["stock_updated_at"] == datetime(2015, 6, 9, 5, tzinfo=UTC)
    assert items["14"]["stock_updated_at"] is None
    # Visitor 600's only event will be quarantined (its time is unreadable): no catalog row.
    assert report.users_written == 6


def test_rees46_events_and_items(tmp_path):
    lake = Lake(str(tmp_path))
    report = import_file(lake, REES46, "rees46")
    events = landing(lake)
    assert (report.rows_read, report.rows_malformed, events.height) == (28, 1, 27)
    assert report.unknown_event_types == {"wishlist": 1}
    assert report.unreadable_values == {"price": 1}
    cart = events.filter(pl.col("user_id") == "535871217", pl.col("item_id") == "1004237")
    assert cart.get_column("event_type").to_list() == [
        "view",
        "add_to_cart",
        "remove_from_cart",
        "add_to_cart",
        "purchase",
    ]
    assert cart.get_column("occurred_at")[0] == utc(2019, 10, 1, 0, 0, 4)
    assert set(cart.get_column("session_id")) == {"c6bd7419-2748-4c56-95b4-8cec9ff8b80d"}
    no_session = events.filter(pl.col("item_id") == "1306631")
    assert no_session.get_column("session_id").to_list() == ["550050854@20191001"]
    items = {
        row["item_id"]: row for row in landing(lake, paths.LANDING_ITEMS).iter_rows(named=True)
    }
    # 31500053 appears only in the `wishlist` row, which ingestion will reject: no catalog row.
    assert len(items) == report.items_written == 18 and "31500053" not in items
    heater = items["3900821"]
    assert heater["category_id"] == "2053013552326770905"
    assert heater["category_path"] == "appliances > environment > water_heater"
    assert (heater["brand"], heater["price"]) == ("aqua", 35.0)  # latest by time, not file order
    assert items["1005135"]["price"] == 1747.79
    assert items["23100006"]["category_path"] is None and items["23100006"]["brand"] is None


def test_importing_twice_writes_identical_files_and_adds_no_rows(tmp_path):
    lake = Lake(str(tmp_path))

    def snapshot() -> dict[str, bytes]:
        return {p: Path(lake.path(p)).read_bytes() for p in lake.list_files("landing")}

    first = import_files(lake, RETAILROCKET, "retailrocket", batch_rows=10)
    before = snapshot()
    second = import_files(lake, RETAILROCKET, "retailrocket", batch_rows=10)
    assert snapshot() == before and second.files_written == first.files_written
    assert [p.rsplit("/", 1)[1] for p in lake.list_files(paths.LANDING_EVENTS)] == [
        f"import-retailrocket-events-{first.files_written[0].split('-')[-2]}-b0000{n}.parquet"
        for n in range(3)
    ]
    ingest_landing(lake, now=NOW, max_invalid_share=1.0)
    landed = lake.read_frame(paths.EVENTS)
    import_files(lake, RETAILROCKET, "retailrocket", batch_rows=10)
    # The catalog is known now: the re-import adds no placeholder rows that could overwrite it.
    assert lake.list_files(paths.LANDING_ITEMS) == [first.files_written[-2]]
    ingest_landing(lake, now=NOW, max_invalid_share=1.0)
    again = lake.read_frame(paths.EVENTS)
    assert again.height == landed.height == 26
    assert again.get_column("event_id").n_unique() == again.height
    catalog = lake.read_frame(paths.catalog_file(paths.ITEMS))
    assert catalog.filter(pl.col("item_id") == "11").get_column("category_id").item() == "1338"


def test_events_only_reimport_never_overwrites_known_catalog_rows(tmp_path):
    lake = Lake(str(tmp_path))
    import_files(lake, RETAILROCKET, "retailrocket")
    ingest_landing(lake, now=NOW, max_invalid_share=1.0)
    report = import_files(lake, RETAILROCKET[:1], "retailrocket")
    assert report.items_written == 0 and report.users_written == 0
    assert lake.list_files(paths.LANDING_ITEMS) == lake.list_files(paths.LANDING_USERS) == []


@pytest.mark.parametrize(
    ("fmt", "paths_", "options"),
    [
        ("retailrocket", RETAILROCKET[:1], {}),
        ("rees46", [REES46], {}),
        ("generic", [GENERIC], {"mapping": GENERIC_MAPPING, "timezone": "Europe/Berlin"}),
    ],
)
def test_streaming_in_tiny_batches_gives_the_same_events(tmp_path, fmt, paths_, options):
    whole, streamed = Lake(str(tmp_path / "whole")), Lake(str(tmp_path / "streamed"))
    import_files(whole, paths_, fmt, **options)
    report = import_files(streamed, paths_, fmt, batch_rows=4, **options)
    batches = [p for p in report.files_written if p.startswith(paths.LANDING_EVENTS)]
    assert len(batches) == -(-report.events_written // 4) > 1
    assert landing(streamed).equals(landing(whole))
    for folder in (paths.LANDING_ITEMS, paths.LANDING_USERS):
        assert landing(streamed, folder).equals(landing(whole, folder))


def test_a_reimport_with_fewer_batches_removes_stale_landing_batches(tmp_path):
    lake = Lake(str(tmp_path))
    import_file(lake, REES46, "rees46", batch_rows=4)
    assert len(lake.list_files(paths.LANDING_EVENTS)) == 7
    import_file(lake, REES46, "rees46")
    assert len(lake.list_files(paths.LANDING_EVENTS)) == 1
    assert landing(lake).height == 27


def test_compressed_csv_gives_the_same_events(tmp_path):
    plain = FIXTURES / "yoochoose" / "clicks.txt"
    packed = tmp_path / "clicks.txt.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    first, second = Lake(str(tmp_path / "a")), Lake(str(tmp_path / "b"))
    import_file(first, str(plain), "yoochoose")
    report = import_file(second, str(packed), "yoochoose")
    assert "import-yoochoose-clicks-" in report.files_written[0]
    assert landing(second).equals(landing(first))


@pytest.mark.parametrize(
    ("fmt", "path", "options", "column"),
    [
        ("retailrocket", "retailrocket/events_without_visitorid.csv", {}, "visitorid"),
        ("rees46", "rees46/without_product_id.csv", {}, "product_id"),
        ("yoochoose", "yoochoose/without_time.txt", {}, "Time"),
        ("generic", "generic/without_visitor.csv", {"mapping": {"user_id": "visitor"}}, "visitor"),
        (
            "generic",
            "generic/without_visitor.csv",
            {"mapping": {"item_id": "product", "occurred_at": "ts"}},
            "user_id",
        ),
        (
            "generic",
            "generic/clicks.csv",
            {"mapping": GENERIC_MAPPING, "timestamp_unit": "s"},
            "ts",
        ),
    ],
)
def test_a_missing_or_unreadable_column_names_the_file_and_the_column(
    tmp_path, fmt, path, options, column
):
    lake = Lake(str(tmp_path))
    with pytest.raises(ContractError, match=rf"{Path(path).name}: .*column '{column}'"):
        import_file(lake, str(FIXTURES / path), fmt, **options)
    assert lake.list_files(paths.LANDING_EVENTS) == []


def test_a_file_that_cannot_be_parsed_names_the_file(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    broken = tmp_path / "broken.txt"
    broken.write_bytes(b"SessionId\tItemId\tTime\n1\t\xff\xfe\t1396860669\n")
    with pytest.raises(ContractError, match=r"broken\.txt: column 'ItemId'"):
        import_file(lake, str(broken), "yoochoose")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ContractError, match=r"empty\.csv: the file is empty"):
        import_file(lake, str(empty), "rees46")
    not_parquet = tmp_path / "events.parquet"
    not_parquet.write_text("user_id,item_id\n")
    with pytest.raises(ContractError, match=r"events\.parquet: cannot be read as Parquet"):
        import_file(lake, str(not_parquet), "generic")
    with pytest.raises(ValueError, match="generic format only"):
        import_file(lake, REES46, "rees46", mapping={"user_id": "visitor"})


def test_yoochoose_fixture_keeps_a_row_with_an_unreadable_time(tmp_path):
    lake = Lake(str(tmp_path))
    report = import_file(lake, str(FIXTURES / "yoochoose" / "clicks.txt"), "yoochoose")
    events = landing(lake)
    assert report.unreadable_values == {"occurred_at": 1}
    assert events.get_column("occurred_at")[0] == utc(2014, 4, 7, 8, 51, 9, 277_000)
    assert events.get_column("occurred_at")[6] == utc(2014, 4, 7, 12, 0, 2, 500_000)
    assert events.get_column("user_id").to_list() == events.get_column("session_id").to_list()
    assert events.get_column("user_id").to_list()[:3] == ["s1", "s1", "s2"]


@pytest.mark.skipif(not YOOCHOOSE_TEST.exists(), reason="shared YooChoose sample not present")
def test_yoochoose_real_sample_matches_its_provenance_and_lands_every_row(tmp_path):
    lake = Lake(str(tmp_path))
    report = import_file(lake, str(YOOCHOOSE_TEST), "yoochoose")
    events = landing(lake)
    # PROVENANCE.md, test file: 13,568 rows, 3,416 sessions, 1,771 items.
    assert report.rows_read == report.events_written == events.height == 13_568
    assert events.get_column("session_id").n_unique() == report.users_written == 3_416
    assert events.get_column("item_id").n_unique() == report.items_written == 1_771
    assert set(events.get_column("event_type")) == {"view"}
    assert events.get_column("occurred_at").min() >= utc(2014, 4, 6)
    assert events.get_column("occurred_at").max() < utc(2014, 4, 9)
    ingested = ingest_landing(lake, now=datetime.now(UTC))
    assert (ingested.events_landed, ingested.events_quarantined, ingested.held) == (13_568, 0, [])
    assert lake.read_table(paths.EVENTS).num_rows == 13_568
    assert (ingested.items_upserted, ingested.users_upserted) == (1_771, 3_416)


def test_cli_import_prints_what_it_wrote(tmp_path, capsys):
    lake_dir = str(tmp_path / "lake")
    argv = ["import", "--format", "generic", GENERIC, "--lake", lake_dir, "--batch-rows", "10"]
    argv += [f"--map={k}={v}" for k, v in GENERIC_MAPPING.items()]
    argv += ["--map-event", "checkout=purchase", "--timezone", "Europe/Berlin"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "23 events, 9 items, 8 users, 5 file(s)" in out
    assert "wrote landing/events/import-generic-clicks-" in out
    assert "'wishlist' ×1" in out and "Skipped 1 malformed row" in out
    assert len(Lake(lake_dir).list_files(paths.LANDING_EVENTS)) == 3

    assert cli.main(["import", "--format", "rees46", GENERIC, "--lake", lake_dir]) == 2
    assert "required column 'event_time' is missing" in capsys.readouterr().err


ORDER_LINES = """InvoiceNo,StockCode,Description,Quantity,InvoiceDate,UnitPrice,CustomerID
536365,85123A,WHITE HANGING HEART, 6,3/29/2026 0:30,2.55, 17850.0
536365,POST,POSTAGE,1,3/29/2026 0:30,18.00,17850.0
536366,85123A,white hanging heart,2,3/30/2026 9:05,2.65,13047.0
536366,71053,WHITE METAL LANTERN,6,3/30/2026 9:05,0.00,13047.0
536367,85123A,WHITE HANGING HEART,1,3/31/2026 10:00,2.75,17850
536368,71053,WHITE METAL LANTERN,2,4/1/2026 11:00,3.39,17850.0
536369,71053,damaged,-12,4/2/2026 12:00,0.00,
C536370,71053,WHITE METAL LANTERN,-1,4/2/2026 13:00,3.39,17850.0
536371,71053,WHITE METAL LANTERN,1,4/40/2026 13:00,3.39,13047.0
"""


def write_order_lines(tmp_path: Path) -> str:
    path = tmp_path / "orders.csv"
    path.write_text(ORDER_LINES)
    return str(path)


ORDER_LINES_MAPPING = {
    "occurred_at": "InvoiceDate",
    "user_id": "CustomerID",
    "item_id": "StockCode",
    "session_id": "InvoiceNo",
    "quantity": "Quantity",
    "price": "UnitPrice",
    "title": "Description",
}


def test_order_lines_import_with_one_event_type_a_time_pattern_and_fee_items(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    report = import_file(
        lake,
        write_order_lines(tmp_path),
        "generic",
        mapping=ORDER_LINES_MAPPING,
        event_type="purchase",
        timestamp_format="%m/%d/%Y %H:%M",
        timezone="Europe/London",
        not_recommendable=[" POST", "M"],
    )
    events = landing(lake)
    assert set(events.get_column("event_type")) == {"purchase"}
    # Float-written and padded ids are the shop's ids; London time before and after DST.
    assert (
        events.get_column("user_id").to_list()[:6]
        == ["17850", "17850", "13047", "13047"] + ["17850"] * 2
    )
    assert events.get_column("occurred_at").to_list()[:3] == [
        utc(2026, 3, 29, 0, 30),
        utc(2026, 3, 29, 0, 30),
        utc(2026, 3, 30, 8, 5),
    ]
    assert events.get_column("occurred_at")[8] is None  # April 40th: quarantined at ingestion
    # The dry run of ingestion's rules, per file.
    [check] = report.checks
    assert (check.rows, check.rows_to_land, check.rows_rejected) == (9, 6, 1)
    assert check.set_aside == {GUEST_REASON: 1, RETURN_REASON: 1}
    assert check.rejected == {"occurred_at is null": 1}
    assert len(check.holds) == 1  # 1 of 7 judged rows is far above the default 1%
    assert "make pipeline MAX_INVALID_SHARE=0.15" in check.holds[0].message()
    # The catalog comes from valid rows: the most frequent title, the latest positive price;
    # the guest's "damaged" adjustment, the return and the unreadable row set nothing.
    items = {
        row["item_id"]: row for row in landing(lake, paths.LANDING_ITEMS).iter_rows(named=True)
    }
    assert set(items) == {"85123A", "POST", "71053", "M"}
    assert (items["85123A"]["title"], items["85123A"]["price"]) == ("WHITE HANGING HEART", 2.75)
    assert (items["71053"]["title"], items["71053"]["price"]) == ("WHITE METAL LANTERN", 3.39)
    assert [items[i]["is_recommendable"] for i in ("POST", "M", "85123A")] == [False, False, None]
    users = landing(lake, paths.LANDING_USERS).get_column("user_id").to_list()
    assert users == ["13047", "17850"]

    ingested = ingest_landing(lake, now=NOW, max_invalid_share=0.2)
    assert (ingested.events_landed, ingested.events_set_aside, ingested.events_quarantined) == (
        6,
        2,
        1,
    )
    catalog = lake.read_frame(paths.ITEMS)
    assert dict(catalog.select("item_id", "is_recommendable").iter_rows()) == {
        "71053": None,
        "85123A": None,
        "M": False,
        "POST": False,
    }


def test_a_file_without_an_event_type_is_refused_with_the_way_forward(tmp_path):
    lake = Lake(str(tmp_path))
    source = str(FIXTURES / "generic" / "epoch_seconds.csv")
    mapping = {"user_id": "user", "item_id": "item", "occurred_at": "t"}
    with pytest.raises(ContractError, match="no event type") as refused:
        import_file(lake, source, "generic", mapping=mapping, timestamp_unit="s")
    assert "--event-type" in str(refused.value) and "--map event_type=" in str(refused.value)
    assert lake.list_files("landing") == []
    with pytest.raises(ValueError, match="not both"):
        import_file(lake, GENERIC, "generic", mapping=GENERIC_MAPPING, event_type="view")
    with pytest.raises(ValueError, match="not one of"):
        import_file(lake, source, "generic", mapping=mapping, event_type="buy")
    with pytest.raises(ContractError, match="--timestamp-format '%d.%m.%Y'"):
        import_file(
            lake,
            write_order_lines(tmp_path),
            "generic",
            mapping=ORDER_LINES_MAPPING,
            event_type="purchase",
            timestamp_format="%d.%m.%Y",
        )


def test_ids_written_as_floats_are_the_shops_ids_in_parquet_too(tmp_path):
    source = tmp_path / "export.parquet"
    pl.DataFrame(
        {
            "user_id": [" 17850.0", "12346.00", "A-7", "17850"],
            "item_id": [85123.0, None, 22.5, 7.0],  # typed floats: whole ones lose their `.0`
            "occurred_at": [datetime(2026, 1, 5, 10)] * 4,
            "event_type": ["purchase"] * 4,
        }
    ).write_parquet(source)
    lake = Lake(str(tmp_path / "lake"))
    import_file(lake, str(source), "generic")
    events = landing(lake)
    assert events.get_column("user_id").to_list() == ["17850", "12346", "A-7", "17850"]
    assert events.get_column("item_id").to_list() == ["85123", None, "22.5", "7"]
    assert normalize_ids([" 17850.0", "17850", "", "POST "]) == ["17850", "POST"]


def test_cli_import_reads_a_not_recommendable_file_and_says_what_will_land(tmp_path, capsys):
    lake_dir = str(tmp_path / "lake")
    fees = tmp_path / "fees.txt"
    fees.write_text("POST  # postage\n\nM\n")
    argv = ["import", "--format", "generic", write_order_lines(tmp_path), "--lake", lake_dir]
    argv += [f"--map={k}={v}" for k, v in ORDER_LINES_MAPPING.items()]
    argv += ["--event-type", "purchase", "--timestamp-format", "%m/%d/%Y %H:%M"]
    argv += ["--not-recommendable", f"@{fees}", "--not-recommendable", "DOT"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "9 event rows; 6 will land, 2 set aside, 1 invalid." in out
    assert f"set aside: {GUEST_REASON}: 1" in out and "invalid: occurred_at is null: 1" in out
    assert "Ingestion will hold this batch with the default threshold" in out
    assert "make pipeline MAX_INVALID_SHARE=0.15" in out
    items = landing(Lake(lake_dir), paths.LANDING_ITEMS)
    hidden = items.filter(
        pl.col("is_recommendable").not_(), pl.col("is_recommendable").is_not_null()
    )
    assert sorted(hidden.get_column("item_id")) == ["DOT", "M", "POST"]
    argv[-1] = "@missing.txt"
    assert cli.main(argv) == 2
    assert "missing.txt" in capsys.readouterr().err


def write_products(tmp_path: Path) -> str:
    """A small products file (the Complete Journey's columns) as typed Parquet."""
    path = tmp_path / "products.parquet"
    pl.DataFrame(
        {
            "product_id": [71053.0, 85123.0, 99.0, None],
            "department": ["GROCERY", "DRUG GM", " ", "GROCERY"],
            "product_category": ["BREAD", None, "FUEL", "MILK"],
            "product_type": ["BREAD: ITALIAN", "CANDLES", None, "WHOLE"],
            "brand": ["Private", "National", None, "National"],
            "price": [3.5, 0.0, None, 1.0],
        }
    ).write_parquet(path)
    return str(path)


PRODUCTS_MAPPING = {
    "item_id": "product_id",
    "category_id": "product_category",
    "category_path": "department,product_category,product_type",
}


def test_a_products_file_is_the_catalog_with_a_category_path_of_several_columns(tmp_path):
    lake = Lake(str(tmp_path / "lake"))
    orders = tmp_path / "orders.csv"
    orders.write_text(ORDER_LINES.replace("85123A", "85123"))
    mapping = {k: v for k, v in ORDER_LINES_MAPPING.items() if k not in ("title", "price")}
    report = import_files(
        lake,
        [str(orders)],
        "generic",
        mapping=mapping,
        event_type="purchase",
        timestamp_format="%m/%d/%Y %H:%M",
        timezone="Europe/London",
        catalog=write_products(tmp_path),
        catalog_mapping=PRODUCTS_MAPPING,
        not_recommendable=["POST"],
    )
    # The product without an id is counted, not landed (as is the order line of April 40th);
    # the events' import wrote placeholders only for the items the catalog does not describe.
    assert report.unreadable_values == {"item_id": 1, "occurred_at": 1}
    assert report.items_written == 3 + 1 and report.events_written == 9
    items = {
        row["item_id"]: row for row in landing(lake, paths.LANDING_ITEMS).iter_rows(named=True)
    }
    assert set(items) == {"71053", "85123", "99", "POST"}
    # Levels joined from the broadest; empty levels left out; a float-written id is the id.
    assert items["71053"]["category_path"] == "GROCERY > BREAD > BREAD: ITALIAN"
    assert items["85123"]["category_path"] == "DRUG GM > CANDLES"
    assert items["99"]["category_path"] == "FUEL"
    assert (items["71053"]["category_id"], items["85123"]["category_id"]) == ("BREAD", "unknown")
    assert (items["71053"]["brand"], items["99"]["brand"]) == ("Private", None)
    assert (items["71053"]["price"], items["85123"]["price"]) == (3.5, None)  # 0 is no price
    assert items["POST"]["is_recommendable"] is False

    ingested = ingest_landing(lake, now=NOW, max_invalid_share=0.2)
    assert ingested.events_landed == 6
    catalog = {row["item_id"]: row for row in lake.read_frame(paths.ITEMS).iter_rows(named=True)}
    assert set(catalog) == {"71053", "85123", "99", "POST"}
    assert catalog["71053"]["category_path"] == "GROCERY > BREAD > BREAD: ITALIAN"
    assert catalog["POST"]["category_id"] == "unknown"

    # Re-importing the same catalog overwrites its own landing file: no new rows.
    again = import_files(
        lake, [], "generic", catalog=write_products(tmp_path), catalog_mapping=PRODUCTS_MAPPING
    )
    assert again.items_written == 3 and again.events_written == 0
    assert len(lake.list_files(paths.LANDING_ITEMS)) == 1


def test_cli_imports_a_csv_catalog_beside_the_events_and_names_a_missing_column(tmp_path, capsys):
    lake_dir = str(tmp_path / "lake")
    products = tmp_path / "products.csv"
    products.write_text("sku;dept;cat;brand\n85123A;HOME;CANDLES;Acme\n71053;HOME;;\n")
    argv = ["import", "--format", "generic", write_order_lines(tmp_path), "--lake", lake_dir]
    argv += [f"--map={k}={v}" for k, v in ORDER_LINES_MAPPING.items() if k != "title"]
    argv += ["--event-type", "purchase", "--timestamp-format", "%m/%d/%Y %H:%M"]
    argv += ["--catalog", str(products), "--catalog-map", "item_id=sku"]
    argv += ["--catalog-map", "category_path=dept,cat", "--catalog-map", "category_id=cat"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "wrote landing/items/import-catalog-products-" in out
    items = {
        row["item_id"]: row
        for row in landing(Lake(lake_dir), paths.LANDING_ITEMS).iter_rows(named=True)
    }
    assert (items["85123A"]["category_path"], items["85123A"]["brand"]) == (
        "HOME > CANDLES",
        "Acme",
    )
    assert items["71053"]["category_path"] == "HOME"
    # The events' import carries prices; the catalog's items got no placeholders from it.
    assert set(items) == {"85123A", "71053", "POST"}

    # A catalog-only import; a wrong column is named with the file's columns.
    only = ["import", "--format", "generic", "--lake", lake_dir, "--catalog", str(products)]
    assert cli.main([*only, "--catalog-map", "item_id=sku"]) == 0
    assert cli.main([*only, "--catalog-map", "item_id=product_id"]) == 2
    err = capsys.readouterr().err
    assert "catalog column 'product_id' (mapped to item_id) is missing" in err
    assert "sku, dept, cat, brand" in err
    assert cli.main(["import", "--format", "generic", "--lake", lake_dir]) == 2
    assert "nothing to import" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only category_path may join several columns"):
        import_files(
            Lake(lake_dir),
            [],
            "generic",
            catalog=str(products),
            catalog_mapping={"item_id": "sku", "brand": "dept,cat"},
        )
