"""A broken delivery stops the pipeline before features are built (blocking asset check)."""

from datetime import UTC, date, datetime, timedelta

import dagster as dg
import polars as pl
import pyarrow as pa

from orchestration.assets.features import dbt_feature_tables
from orchestration.assets.lake import VALID_BATCHES_CHECK, raw_events
from orchestration.definitions import defs
from orchestration.failed_checks import failed_checks
from orchestration.resources import ShelfwiseResource
from shelfwise.contracts import EVENTS_SCHEMA
from shelfwise.home import prepare_home
from shelfwise.intake.generate import ShopConfig, generate_shop, write_shop
from shelfwise.lake import (
    EVENTS,
    LANDING_EVENTS,
    Lake,
    dataset_file,
    feature_table,
    quarantine_file,
)
from shelfwise.settings import Settings


def broken_delivery(rows: int, broken_share: float) -> pa.Table:
    when = datetime.now(UTC) - timedelta(hours=1)
    broken = int(rows * broken_share)
    return pa.Table.from_pylist(
        [
            {
                "event_id": f"delivery-{i}",
                "occurred_at": when,
                "user_id": "u1",
                "session_id": "s-delivery",
                "item_id": "i1",
                "event_type": "teleport" if i < broken else "view",
                "quantity": 1,
                "price": 1.0,
                "rec_id": None,
                "source": "test",
            }
            for i in range(rows)
        ],
        schema=EVENTS_SCHEMA,
    )


DELIVERY = dataset_file(LANDING_EVENTS, "delivery")


def run_ingestion_and_features(
    tmp_path, broken_share: float, max_invalid_share: float, instance=None
):
    settings = Settings.from_env({"SHELFWISE_HOME": str(tmp_path)})
    prepare_home(settings)
    lake = Lake(settings.lake_url)
    shop = ShopConfig(users=200, items=150, days=21, events=8_000, seed=5, end_date=date.today())
    write_shop(generate_shop(shop), lake, seed=5)
    lake.write_parquet(broken_delivery(200, broken_share), DELIVERY)
    resources = {
        **defs.resources,
        "shelfwise": ShelfwiseResource(home=str(settings.home), lake_url=settings.lake_url),
    }
    config = {"ops": {"raw_events": {"config": {"max_invalid_share": max_invalid_share}}}}
    result = dg.materialize(
        [raw_events, dbt_feature_tables],
        resources=resources,
        run_config=config,
        raise_on_error=False,
        instance=instance,
    )
    return result, lake


def check_of(result):
    [evaluation] = [
        e for e in result.get_asset_check_evaluations() if e.check_name == VALID_BATCHES_CHECK
    ]
    return evaluation


def test_thirty_percent_broken_delivery_stops_the_pipeline_before_features(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    result, lake = run_ingestion_and_features(
        tmp_path, broken_share=0.30, max_invalid_share=0.10, instance=instance
    )
    assert not result.success
    evaluation = check_of(result)
    assert not evaluation.passed
    held = evaluation.metadata["held_batches"].value
    assert list(held) == [DELIVERY]
    batch = held[DELIVERY]
    assert (batch["invalid_share"], batch["rows_judged"]) == (0.3, 200)
    [reason] = batch["top_reasons"]
    assert reason["rows"] == 60 and reason["reason"].startswith("event_type not in")
    assert reason["example"]["event_type"] == "teleport"
    # What to do next, where the user looks: the check's description (the console) says it too.
    assert batch["ingest_anyway"] == "make pipeline MAX_INVALID_SHARE=0.3"
    assert "30.0% of 200 rows invalid" in evaluation.description
    assert "make pipeline MAX_INVALID_SHARE=0.3" in evaluation.description
    materialized = {e.asset_key.to_user_string() for e in result.get_asset_materialization_events()}
    assert "raw_events" in materialized
    assert "item_features" not in materialized and "stg_lake__events" not in materialized
    assert not lake.exists(feature_table("item_features"))
    assert lake.list_files(LANDING_EVENTS) == [DELIVERY]
    # What `make pipeline` prints last when the run fails.
    [(name, description)] = failed_checks(instance)
    assert name == "raw_events:valid_batches" and description == evaluation.description


def test_five_percent_broken_delivery_lands_and_features_are_built(tmp_path):
    instance = dg.DagsterInstance.ephemeral()
    result, lake = run_ingestion_and_features(
        tmp_path, broken_share=0.05, max_invalid_share=0.10, instance=instance
    )
    assert result.success
    assert failed_checks(instance) == []
    assert check_of(result).passed
    assert lake.read_frame(quarantine_file(EVENTS, "delivery")).height == 10
    assert lake.exists(feature_table("item_features"))
    assert lake.list_files(LANDING_EVENTS) == []
    # The UI shows what the run added per day of the lake.
    [landed] = [
        e.materialization
        for e in result.get_asset_materialization_events()
        if e.asset_key == dg.AssetKey("raw_events")
    ]
    by_date = {
        r.data["date"]: r.data["landed_rows"]
        for r in landed.metadata["landed_rows_by_date"].value.records
    }
    assert len(by_date) >= 21
    assert sum(by_date.values()) == landed.metadata["landed_rows"].value
    events = lake.read_frame(EVENTS)
    assert by_date == {day: events.filter(pl.col("date") == day).height for day in by_date}
