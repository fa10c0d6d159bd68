from datetime import UTC, datetime

import dagster as dg

from orchestration.resources import ShelfwiseResource
from shelfwise.ingest import ingest_landing


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "raw_events",
            description="Validated user interactions in the lake, Parquet partitioned by date "
            "(events/date=YYYY-MM-DD/). Rejected rows go to quarantine/ with a reason.",
        ),
        dg.AssetSpec("catalog_items", description="The item catalog (catalog/items/)."),
        dg.AssetSpec("catalog_users", description="Registered users (catalog/users/)."),
    ],
    group_name="lake",
)
def raw_events(shelfwise: ShelfwiseResource):
    """Ingests what `shelfwise generate` or `shelfwise import` left in the lake's landing area."""
    lake = shelfwise.lake()
    report = ingest_landing(lake, now=datetime.now(UTC))
    events = lake.list_files("events")
    if not events:
        raise dg.Failure(
            f"The lake at {lake.url} holds no events: run `shelfwise generate` (demo shop) or "
            "`shelfwise import` (your data) first."
        )
    yield dg.MaterializeResult(
        asset_key="raw_events",
        metadata={
            "landed_rows": report.events_landed,
            "quarantined_rows": report.events_quarantined,
            "quarantined_share": float(report.quarantined_share),
            "new_dates": len(report.dates),
            "files_in_lake": len(events),
            "lake": dg.MetadataValue.path(lake.uri("events")),
        },
    )
    yield dg.MaterializeResult(
        asset_key="catalog_items",
        metadata={"upserted_rows": report.items_upserted, "lake": lake.uri("catalog/items")},
    )
    yield dg.MaterializeResult(
        asset_key="catalog_users",
        metadata={"upserted_rows": report.users_upserted, "lake": lake.uri("catalog/users")},
    )
