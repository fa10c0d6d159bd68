from datetime import UTC, datetime

import dagster as dg

from orchestration.resources import ShelfwiseResource
from shelfwise.contracts import DEFAULT_EARLIEST_EVENT_AT, parse_earliest
from shelfwise.intake.ingest import DEFAULT_MAX_INVALID_SHARE, ingest_landing
from shelfwise.lake import FEATURE_SAMPLES, IMPRESSIONS, ITEMS, USERS
from shelfwise.runtime.feedback import compact_feedback

VALID_BATCHES_CHECK = "valid_batches"


class IngestionConfig(dg.Config):
    """How much invalid input a landing batch may hold before it is held back, and from when on
    an event is plausible."""

    max_invalid_share: float = DEFAULT_MAX_INVALID_SHARE
    # ISO date or date-time, UTC when naive: events before it are rejected in landing batches
    # and quarantined from the service's log (default dates such as year 1 or the epoch). The
    # importers' dry run and the service use the same default (shelfwise.contracts).
    earliest_event_at: str = DEFAULT_EARLIEST_EVENT_AT.date().isoformat()


@dg.multi_asset(
    specs=[
        dg.AssetSpec(
            "raw_events",
            description="Validated user interactions in the lake, Parquet partitioned by date "
            "(events/date=YYYY-MM-DD/). Rejected rows go to quarantine/ with a reason.",
        ),
        dg.AssetSpec(
            "raw_impressions",
            description="What the service showed, one row per item of a response, compacted from "
            "its write-ahead log (impressions/date=YYYY-MM-DD/).",
        ),
        dg.AssetSpec(
            "live_feature_samples",
            description="The ranked candidates' feature rows of a sample of personalised "
            "/recommend requests (SHELFWISE_FEATURE_SAMPLE_RATE), compacted from the service's "
            "write-ahead log (feature_samples/date=YYYY-MM-DD/); the drift check reads them.",
        ),
        dg.AssetSpec("catalog_items", description="The item catalog (catalog/items/)."),
        dg.AssetSpec("catalog_users", description="Registered users (catalog/users/)."),
    ],
    check_specs=[
        dg.AssetCheckSpec(
            VALID_BATCHES_CHECK,
            asset="raw_events",
            blocking=True,
            description="Great Expectations row checks: no landing batch has a larger share of "
            "invalid rows than max_invalid_share. A failing batch is held in landing and "
            "nothing downstream is built.",
        )
    ],
    group_name="lake",
)
def raw_events(
    context: dg.AssetExecutionContext, shelfwise: ShelfwiseResource, config: IngestionConfig
):
    """Ingests what `shelfwise generate` or `shelfwise import` left in the lake's landing area,
    and the feedback (events, impressions, sampled feature rows) in the service's write-ahead
    log."""
    lake = shelfwise.lake()
    earliest = parse_earliest(config.earliest_event_at)
    feedback = compact_feedback(shelfwise.settings().wal_dir, lake, earliest)
    report = ingest_landing(
        lake,
        now=datetime.now(UTC),
        max_invalid_share=config.max_invalid_share,
        earliest=earliest,
    )
    events = lake.list_files("events")
    if not events and not report.held:
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
            # Guest checkouts and returns: quarantined with their reason, never counted invalid.
            "set_aside_rows": report.events_set_aside,
            "set_aside_by_reason": dg.MetadataValue.json(report.set_aside_by_reason),
            "duplicates_collapsed": report.duplicates_collapsed,
            "feedback_rows": feedback.events,
            # Implausible rows of the log (before earliest_event_at, absurd prices), quarantined.
            "feedback_quarantined_rows": sum(feedback.quarantined.values()),
            "dates_written": len(report.rows_by_date),
            # What this run added per day of the lake: the per-day view of incremental ingestion.
            "landed_rows_by_date": dg.MetadataValue.table(
                records=[
                    dg.TableRecord({"date": day, "landed_rows": rows})
                    for day, rows in report.rows_by_date.items()
                ],
                schema=dg.TableSchema(
                    columns=[
                        dg.TableColumn("date", "string"),
                        dg.TableColumn("landed_rows", "int"),
                    ]
                ),
            ),
            "files_in_lake": len(events),
            "lake": dg.MetadataValue.path(lake.uri("events")),
        },
    )
    yield dg.MaterializeResult(
        asset_key="raw_impressions",
        metadata={
            "compacted_rows": feedback.impressions,
            "files_in_lake": len(lake.list_files(IMPRESSIONS)),
            "lake": dg.MetadataValue.path(lake.uri(IMPRESSIONS)),
        },
    )
    yield dg.MaterializeResult(
        asset_key="live_feature_samples",
        metadata={
            "compacted_rows": feedback.feature_samples,
            "files_in_lake": len(lake.list_files(FEATURE_SAMPLES)),
            "lake": dg.MetadataValue.path(lake.uri(FEATURE_SAMPLES)),
        },
    )
    yield dg.MaterializeResult(
        asset_key="catalog_items",
        metadata={
            "upserted_rows": report.items_upserted,
            "stock_overrides_applied": report.stock_overrides,
            "lake": lake.uri(ITEMS),
        },
    )
    yield dg.MaterializeResult(
        asset_key="catalog_users",
        metadata={"upserted_rows": report.users_upserted, "lake": lake.uri(USERS)},
    )
    messages = [batch.message() for batch in report.held]
    for message in messages:
        context.log.error(message)
    yield dg.AssetCheckResult(
        asset_key="raw_events",
        check_name=VALID_BATCHES_CHECK,
        passed=not report.held,
        severity=dg.AssetCheckSeverity.ERROR,
        description=(
            f"{len(report.held)} landing batch(es) above {config.max_invalid_share:.1%} invalid "
            "rows held back with their delivery's catalog files:\n" + "\n".join(messages)
            if report.held
            else "every landing batch within the threshold"
        ),
        metadata={
            "checked_rows": report.events_checked,
            "quarantined_rows": report.events_quarantined,
            "quarantined_share": float(report.quarantined_share),
            "set_aside_rows": report.events_set_aside,
            "max_invalid_share": float(config.max_invalid_share),
            "held_batches": dg.MetadataValue.json(
                {batch.path: batch.to_metadata() for batch in report.held}
            ),
            "catalog_files_held": report.catalog_files_held,
            "expectations": dg.MetadataValue.json(report.expectations),
        },
    )
