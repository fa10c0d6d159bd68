"""Features as of a cutoff never see what happened at or after it, and do not depend on which
other cutoffs a build computes (training and serving share one definition)."""

from datetime import UTC, date, datetime, timedelta

import duckdb
import polars as pl
import pytest
from polars.testing import assert_frame_equal

from models.artifacts import read_mart
from models.collaborative import collaborative_scores, fit_item_models
from shelfwise.contracts import EVENTS_SCHEMA
from shelfwise.home import prepare_home
from shelfwise.intake.generate import ShopConfig, generate_shop, write_shop
from shelfwise.intake.ingest import ingest_landing
from shelfwise.lake import EVENTS, Lake, partition_file
from shelfwise.settings import Settings
from tests.dbt_support import dbt

END = datetime(2026, 10, 22, tzinfo=UTC)
CUTOFF = END - timedelta(days=7)
LATER = END
FEATURE_MARTS = (
    "user_features",
    "item_features",
    "user_item_features",
    "user_category_features",
    "user_brand_features",
    "item_covisitation",
    "item_bought_together",
)

# The repeat-purchase signals (compared with the rest of their marts, and checked not vacuous).
REPEAT_COLUMNS = {
    "user_item_features": [
        "purchases_decayed_7d",
        "purchases_decayed_30d",
        "purchases_decayed_90d",
        "days_since_last_purchase",
        "purchase_occasions",
        "purchase_basket_share",
        "own_repurchase_interval_days",
        "item_repurchase_interval_days",
        "repurchase_due_ratio",
    ],
    "item_features": ["buyers", "rebuyer_share", "repurchase_interval_days"],
    "user_features": ["repeat_purchase_share"],
}


def assert_same(left: pl.DataFrame, right: pl.DataFrame) -> None:
    # Exactly: float sums are order-independent (`exact_sum`), so ties in the ranked marts cannot
    # swap places between builds either.
    assert_frame_equal(left, right, check_exact=True)


def marts_as_of(lake: Lake, cutoff: datetime) -> dict[str, pl.DataFrame]:
    frames = {}
    for mart in FEATURE_MARTS:
        frame = read_mart(lake, mart).filter(pl.col("as_of") == cutoff)
        frames[mart] = frame.sort(frame.columns)
    return frames


def collaborative_as_of(lake: Lake) -> dict[datetime, pl.DataFrame]:
    """Each cutoff's collaborative candidates for every user, from the lake's marts."""
    user_items = read_mart(lake, "user_item_features")
    models = fit_item_models(user_items)
    frames = {}
    for cutoff in (CUTOFF, LATER):
        queries = user_items.filter(pl.col("as_of") == cutoff).select("as_of", "user_id").unique()
        scores = collaborative_scores(queries, user_items, models, per_user=20)
        frames[cutoff] = scores.sort(scores.columns)
    return frames


@pytest.fixture(scope="module")
def shop_lake(tmp_path_factory):
    settings = Settings.from_env({"SHELFWISE_HOME": str(tmp_path_factory.mktemp("pit"))})
    prepare_home(settings)
    lake = Lake(settings.lake_url)
    config = ShopConfig(
        users=300, items=200, days=21, events=12_000, seed=21, end_date=date(2026, 10, 22)
    )
    write_shop(generate_shop(config), lake, seed=21)
    ingest_landing(lake, now=END)
    return settings, lake


def test_appended_and_edited_events_after_the_cutoff_change_no_feature(shop_lake, tmp_path):
    settings, lake = shop_lake
    dbt(settings, ["build", "--exclude", "resource_type:test"], [CUTOFF, LATER], tmp_path / "t1")
    before = marts_as_of(lake, CUTOFF)
    collaborative_before = collaborative_as_of(lake)
    later_before = marts_as_of(lake, LATER)
    assert all(frame.height for frame in before.values())
    for mart, columns in REPEAT_COLUMNS.items():
        for column in columns:
            assert before[mart].get_column(column).drop_nulls().ne(0).any(), (mart, column)

    events = lake.read_frame(EVENTS)
    # 1. Late-arriving edits: every event at or after the cutoff is rewritten in place.
    after_cutoff = pl.col("occurred_at") >= CUTOFF
    edited = events.with_columns(
        pl.when(after_cutoff)
        .then(pl.lit("purchase"))
        .otherwise(pl.col("event_type"))
        .alias("event_type"),
        pl.when(after_cutoff).then(pl.col("price") * 10).otherwise(pl.col("price")).alias("price"),
    )
    assert edited.filter(after_cutoff).height > 0
    for file in lake.list_files(EVENTS):
        lake.remove([file])
    for (day,), rows in edited.partition_by("date", as_dict=True).items():
        lake.write_parquet(
            rows.drop("date").to_arrow().cast(EVENTS_SCHEMA),
            partition_file(EVENTS, day, "rewritten"),
        )
    # 2. New events after the cutoff by users and for items that exist before it.
    known = events.filter(~after_cutoff).head(500)
    appended = known.with_columns(
        (pl.col("event_id") + "-late").alias("event_id"),
        (pl.lit(CUTOFF) + pl.duration(hours=pl.int_range(pl.len()) % 150)).alias("occurred_at"),
        pl.lit("add_to_cart").alias("event_type"),
    )
    lake.write_parquet(
        appended.drop("date").to_arrow().cast(EVENTS_SCHEMA),
        partition_file(EVENTS, CUTOFF.date(), "appended"),
    )

    dbt(settings, ["build", "--exclude", "resource_type:test"], [CUTOFF, LATER], tmp_path / "t2")
    after = marts_as_of(lake, CUTOFF)
    for mart in FEATURE_MARTS:
        assert_same(after[mart], before[mart])
    # The collaborative generator, fitted from every cutoff's rows at once, as the pipeline does.
    collaborative_after = collaborative_as_of(lake)
    assert collaborative_before[CUTOFF].height
    assert_same(collaborative_after[CUTOFF], collaborative_before[CUTOFF])
    # Not vacuous: the later cutoff's model, which sees the week after CUTOFF, proposes otherwise.
    assert (
        not collaborative_after[LATER]
        .drop("as_of")
        .equals(collaborative_after[CUTOFF].drop("as_of"))
    )
    # The same build did see the changes: features as of the later cutoff moved.
    later_after = marts_as_of(lake, LATER)
    assert not later_after["user_features"].equals(later_before["user_features"])
    # Including the repeat-purchase signals: the purchases after the cutoff count at the later one.
    for mart, columns in REPEAT_COLUMNS.items():
        for column in columns:
            moved = later_after[mart].get_column(column).sort(nulls_last=True)
            assert not moved.equals(later_before[mart].get_column(column).sort(nulls_last=True))


def test_features_for_a_cutoff_do_not_depend_on_the_other_cutoffs_built(shop_lake, tmp_path):
    settings, lake = shop_lake
    dbt(
        settings,
        ["build", "--exclude", "resource_type:test"],
        [CUTOFF - timedelta(days=7), CUTOFF, LATER],
        tmp_path / "t1",
    )
    in_a_training_build = marts_as_of(lake, CUTOFF)
    # A serving-style build computes only this cutoff ("as of now").
    dbt(settings, ["build", "--exclude", "resource_type:test"], [CUTOFF], tmp_path / "t2")
    alone = marts_as_of(lake, CUTOFF)
    for mart in FEATURE_MARTS:
        assert_same(alone[mart], in_a_training_build[mart])


def staged_events(settings: Settings) -> tuple[int, int]:
    """Rows and distinct event ids of the staging table in the dbt warehouse."""
    with duckdb.connect(str(settings.warehouse_path), read_only=True) as warehouse:
        query = "select count(*), count(distinct event_id) from stg_lake__events"
        [counts] = warehouse.execute(query).fetchall()
        return counts


def test_a_redelivered_batch_changes_no_feature(shop_lake, tmp_path):
    """At-least-once delivery: events published twice (in a second file) count once, because
    staging keeps one row per event_id."""
    settings, lake = shop_lake
    dbt(settings, ["build", "--exclude", "resource_type:test"], [LATER], tmp_path / "t1")
    staged_before = staged_events(settings)
    before = marts_as_of(lake, LATER)
    redelivered = lake.read_frame(EVENTS).filter(pl.col("occurred_at") < LATER).head(3000)
    assert redelivered.height == 3000
    written = [
        lake.write_parquet(
            rows.drop("date").to_arrow().cast(EVENTS_SCHEMA), partition_file(EVENTS, day, "again")
        )
        for (day,), rows in redelivered.partition_by("date", as_dict=True).items()
    ]
    try:
        dbt(settings, ["build", "--exclude", "resource_type:test"], [LATER], tmp_path / "t2")
        staged_after = staged_events(settings)
        after = marts_as_of(lake, LATER)
    finally:
        lake.remove(written)
    assert staged_after == staged_before and staged_after[0] == staged_after[1]
    for mart in FEATURE_MARTS:
        assert_same(after[mart], before[mart])
