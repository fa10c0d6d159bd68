"""The same commands against an S3 lake (moto's S3 server on 127.0.0.1, see conftest.py)."""

from datetime import UTC, datetime

from shelfwise.cli import main
from shelfwise.intake.ingest import ingest_landing, ingested_dates
from shelfwise.lake import EVENTS, ITEMS, Lake


def test_generate_and_ingest_write_the_same_layout_to_s3(s3_lake_url, tmp_path):
    arguments = [
        "generate",
        "--users",
        "80",
        "--items",
        "110",
        "--days",
        "6",
        "--events",
        "2000",
        "--end-date",
        "2026-11-01",
        "--seed",
        "3",
    ]
    assert main([*arguments, "--lake", s3_lake_url]) == 0
    assert main([*arguments, "--lake", str(tmp_path / "lake")]) == 0
    s3, local = Lake(s3_lake_url), Lake(str(tmp_path / "lake"))
    assert s3.list_files("landing") == local.list_files("landing")

    now = datetime(2026, 11, 2, tzinfo=UTC)
    s3_report, local_report = ingest_landing(s3, now), ingest_landing(local, now)
    assert s3_report.events_landed == local_report.events_landed > 0
    assert s3.list_files("landing") == []
    assert ingested_dates(s3) == ingested_dates(local)
    s3_events = s3.read_frame(EVENTS).sort("event_id")
    assert s3_events.equals(local.read_frame(EVENTS).sort("event_id"))
    assert s3.read_frame(ITEMS).height == 110


def test_parquet_streams_go_to_s3_atomically(s3_lake_url):
    from tests.test_lake_and_ingest import check_streamed_parquet

    lake = Lake(s3_lake_url)
    check_streamed_parquet(lake, lambda: [p for p in lake.fs.find(lake.path()) if "_tmp-" in p])
