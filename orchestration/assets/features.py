import json
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from typing import Any

import dagster as dg
import polars as pl
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, dbt_assets

from models.attribution import attribution_markdown, attribution_totals
from models.cutoffs import plan_cutoffs
from models.drift import fallback_markdown, fallback_shares
from orchestration.dbt_project import dbt_project
from orchestration.resources import ShelfwiseResource
from shelfwise.home import prepare_home
from shelfwise.intake.ingest import ingested_dates
from shelfwise.lake import FEATURE_BUILD_MARKER, Lake, feature_table

ATTRIBUTION_MART = "feedback_attribution"
FALLBACK_MART = "fallback_levels"


class FeatureCutoffsConfig(dg.Config):
    """Which cutoffs the features are computed as of (see models/cutoffs.py)."""

    label_window_days: int = 7
    training_cutoffs: int = 3
    # ISO timestamp of the serving cutoff; empty: the midnight after the last ingested day. Set it
    # when the last day is only a sliver, or to replay the pipeline as of a past date.
    data_end: str = ""


class ShelfwiseDbtTranslator(DagsterDbtTranslator):
    def get_group_name(self, dbt_resource_props: dict[str, Any]) -> str | None:
        return "features"


@dbt_assets(
    manifest=dbt_project.manifest_path,
    project=dbt_project,
    dagster_dbt_translator=ShelfwiseDbtTranslator(),
)
def dbt_feature_tables(
    context: dg.AssetExecutionContext,
    dbt: DbtCliResource,
    shelfwise: ShelfwiseResource,
    config: FeatureCutoffsConfig,
) -> Iterator[Any]:
    """Point-in-time feature tables built by dbt as of every cutoff, exported to <lake>/features."""
    settings = shelfwise.settings()
    prepare_home(settings)
    lake = Lake(settings.lake_url)
    dates = ingested_dates(lake)
    if not dates:
        raise dg.Failure(f"No ingested events in {lake.uri('events')}; materialize raw_events.")
    if config.data_end:
        data_end = datetime.fromisoformat(config.data_end)
        data_end = data_end if data_end.tzinfo else data_end.replace(tzinfo=UTC)
    else:
        data_end = datetime.combine(dates[-1] + timedelta(days=1), time(), tzinfo=UTC)
    plan = plan_cutoffs(data_end, config.label_window_days, config.training_cutoffs)
    context.log.info(f"Feature cutoffs: {plan.as_dbt_vars()}")
    dbt_vars = {
        "lake": lake.url,
        "warehouse_path": str(settings.warehouse_path),
        "as_of": plan.as_dbt_vars(),
    }
    # Feedback published after this marker may not be in these features: the feedback sensor
    # counts it as new (a file dbt did read too is counted early, never missed).
    lake.write_json({"cutoffs": plan.as_dbt_vars()}, FEATURE_BUILD_MARKER)
    invocation = dbt.cli(["build", "--vars", json.dumps(dbt_vars)], context=context)
    for event in invocation.stream():
        yield _with_row_count(event, lake)


def _with_row_count(event: Any, lake: Lake) -> Any:
    """Adds the row count of an exported mart, read from its Parquet footer."""
    if not isinstance(event, dg.Output | dg.AssetMaterialization):
        return event
    unique_id = event.metadata.get("unique_id")
    model = str(getattr(unique_id, "value", unique_id) or "").rsplit(".", 1)[-1]
    relpath = feature_table(model)
    if not model or not lake.exists(relpath):
        return event
    rows = lake.parquet_rows(relpath)
    metadata = {
        **event.metadata,
        "dagster/row_count": rows,
        "path": dg.MetadataValue.path(lake.uri(relpath)),
    }
    if model == ATTRIBUTION_MART:
        totals = attribution_totals(lake.read_frame(relpath))
        metadata["online_results"] = dg.MetadataValue.md(attribution_markdown(totals))
        metadata["impressions"] = int(totals.get_column("impressions").sum())
    if model == FALLBACK_MART:
        metadata.update(_fallback_metadata(lake.read_frame(relpath)))
    return event.with_metadata(metadata)


def _fallback_metadata(daily: pl.DataFrame) -> dict[str, Any]:
    """/recommend's share of responses per fallback level: the last days as a table, and the
    latest day's shares as numbers, which the UI plots across materializations."""
    shares = fallback_shares(daily, "recommend")
    metadata: dict[str, Any] = {"fallback_shares": dg.MetadataValue.md(fallback_markdown(shares))}
    latest = shares.tail(1).to_dicts()
    if latest:
        metadata["latest_day"] = str(latest[0]["shown_on"])
        metadata["latest_day_responses"] = int(latest[0]["responses"])
        for name, value in latest[0].items():
            if name.startswith("level_"):
                metadata[f"fallback_{name}_share"] = float(value)
    return metadata
